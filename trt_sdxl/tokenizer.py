"""SDXL's CLIP tokenizers: byte-level BPE over a `tokenizer/` folder's vocab.json and merges.txt.

It reproduces transformers' `CLIPTokenizer`, the one diffusers' SDXL pipeline calls, token for
token (`tests/test_tokenizer.py` checks it). A prompt goes through:

1. special tokens (BOS, EOS, pad, unk, any `added_tokens_decoder` entry) split out as they are
   written, before anything else; SDXL's `tokenizer_2` pads with "!", so there every "!" is a token
   of its own;
2. normalization: Unicode NFC, every whitespace run to one space, lowercase (per character);
3. CLIP's pattern cuts words: the contractions 's 't 're 've 'm 'll 'd, runs of letters, single
   digits, runs of anything else but whitespace;
4. each word's UTF-8 bytes become printable symbols (GPT-2's byte-to-unicode table), the last one
   marked `</w>`, and the lowest-ranked adjacent pair of merges.txt is merged until none applies.

`encode` wraps each prompt in BOS ... EOS and pads to 77 ids; a longer prompt is truncated to
75 tokens (diffusers does the same) with one warning saying how many were dropped.
"""

from __future__ import annotations

import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from .components import TOKENIZER_FOLDERS
from .errors import UserError
from .files import load_json

MAX_LENGTH = 77  # SDXL's text encoders read 77 positions
FOLDERS = TOKENIZER_FOLDERS
# transformers' CLIPTokenizer defaults, used where a folder's config names no token
DEFAULT_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}

WHITESPACE = regex.compile(r"\s+")
# CLIP's word pattern (transformers' CLIPTokenizer pre-tokenizer). Its special-token alternatives are
# left out: transformers' byte-level step re-splits such a word like this pattern does.
WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others get unused
    code points from 256 on, so every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def normalize(text: str) -> str:
    """NFC, whitespace runs to one space, lowercase character by character (no final-sigma rule,
    like transformers' normalizer)."""
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _token_content(value, where: str) -> tuple[str, bool]:
    """(content, normalized) of a special-token entry: a string, or an AddedToken object."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("normalized", False))
    raise UserError(f"{where}: expected a token string or an object with a \"content\" string, got {value!r}")


class Tokenizer:
    """One CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json [, special_tokens_map.json])."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.vocab = self._read_vocab(self.folder / "vocab.json")
        self.ranks = self._read_merges(self.folder / "merges.txt")
        self.max_length, special, added = self._read_config()
        ids = {}
        for key, (content, _) in special.items():
            if content not in self.vocab:
                raise UserError(f"{self.folder}: {key} {content!r} is not in vocab.json")
            ids[key] = self.vocab[content]
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        self.unk_id = ids["unk_token"]
        # Special tokens are matched where transformers matches them: in the text as written, or,
        # for tokens every mention of which says "normalized": true, in the normalized text.
        normalized = {}
        for content, norm in list(special.values()) + added:
            normalized[content] = normalized.get(content, True) and norm
        self.raw_special = self._alternation([c for c, n in normalized.items() if not n])
        self.normalized_special = self._alternation([c for c, n in normalized.items() if n])
        self.cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- files

    @staticmethod
    def _read_vocab(path: Path) -> dict[str, int]:
        vocab = load_json(path, "a JSON object mapping each token to its integer id")
        if not isinstance(vocab, dict) or not vocab or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
            raise UserError(f"{path}: expected a non-empty JSON object mapping each token to its integer id")
        missing = [s for s in byte_symbols() if s not in vocab]
        if missing:
            raise UserError(f"{path}: {len(missing)} of the 256 byte symbols are missing (e.g. {missing[0]!r}); "
                            "expected a byte-level BPE vocabulary (CLIP's)")
        return vocab

    def _read_merges(self, path: Path) -> dict[tuple[str, str], int]:
        if not path.is_file():
            raise UserError(f"{path}: missing (expected the BPE merges, one \"first second\" pair a line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e}); expected the BPE merges") from None
        ranks = {}
        for number, line in enumerate(lines, start=1):
            if (number == 1 and line.startswith("#version")) or not line.strip():
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise UserError(f"{path}, line {number}: {line!r} is not a merge (expected two symbols "
                                "separated by a space)")
            if pair[0] + pair[1] not in self.vocab:
                raise UserError(f"{path}, line {number}: the merge {line!r} makes {pair[0] + pair[1]!r}, which "
                                "vocab.json lacks (do merges.txt and vocab.json belong together?)")
            ranks.setdefault(pair, len(ranks))
        if not ranks:
            raise UserError(f"{path}: no merges (expected the BPE merges, one \"first second\" pair a line)")
        return ranks

    def _read_config(self):
        """(model_max_length, {bos_token/eos_token/pad_token/unk_token: (content, normalized)},
        [(content, normalized) of added_tokens_decoder]). special_tokens_map.json overrides the
        config unless the config carries `added_tokens_decoder`, as in transformers."""
        path = self.folder / "tokenizer_config.json"
        config = load_json(path, "the tokenizer's settings (special tokens, model_max_length)")
        if not isinstance(config, dict):
            raise UserError(f"{path}: expected a JSON object")
        entries = {key: (config[key], str(path)) for key in DEFAULT_SPECIAL if config.get(key) is not None}
        added = config.get("added_tokens_decoder")
        map_path = self.folder / "special_tokens_map.json"
        if added is None and map_path.is_file():
            special_map = load_json(map_path, "a JSON object of special tokens")
            if not isinstance(special_map, dict):
                raise UserError(f"{map_path}: expected a JSON object of special tokens")
            entries.update({key: (special_map[key], str(map_path)) for key in DEFAULT_SPECIAL
                            if special_map.get(key) is not None})
        special = {key: _token_content(entries[key][0], f"{entries[key][1]}: {key}") if key in entries
                   else (DEFAULT_SPECIAL[key], False) for key in DEFAULT_SPECIAL}
        if added is not None and not isinstance(added, dict):
            raise UserError(f"{path}: added_tokens_decoder: expected an object mapping ids to tokens")
        added_tokens = [_token_content(v, f"{path}: added_tokens_decoder[{k}]") for k, v in (added or {}).items()]
        for content, _ in added_tokens:
            if content not in self.vocab:
                raise UserError(f"{path}: added token {content!r} is not in vocab.json")
        max_length = config.get("model_max_length", MAX_LENGTH)
        if max_length != MAX_LENGTH:
            raise UserError(f"{path}: model_max_length is {max_length!r}, expected {MAX_LENGTH} "
                            "(SDXL's text encoders read 77 tokens)")
        return max_length, special, added_tokens

    @staticmethod
    def _alternation(tokens: list[str]):
        if not tokens:
            return None
        # Longest first, so a token that starts another does not cut it short.
        return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    # ---------------------------------------------------------------- tokenizing

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word, merged by rank (memoized: prompts repeat words)."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        table = byte_symbols()
        parts = [table[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            best_rank = min(ranked)[0]
            if best_rank == len(self.ranks):
                break
            first, second = next(pair for pair in zip(parts, parts[1:]) if self.ranks.get(pair) == best_rank)
            merged, i = [], 0
            while i < len(parts):  # every occurrence, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab.get(p, self.unk_id) for p in parts]
        self.cache[word] = ids
        return ids

    def _split(self, pattern, text: str):
        """(piece, is_special) in order: the matches of `pattern` and the text between them."""
        if pattern is None:
            yield text, False
            return
        start = 0
        for match in pattern.finditer(text):
            yield text[start:match.start()], False
            yield match.group(), True
            start = match.end()
        yield text[start:], False

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text`, without BOS, EOS or padding."""
        ids = []
        for raw, raw_special in self._split(self.raw_special, text):
            if raw_special:
                ids.append(self.vocab[raw])
                continue
            for piece, special in self._split(self.normalized_special, normalize(raw)):
                if special:
                    ids.append(self.vocab[piece])
                else:
                    for word in WORD.findall(piece):
                        ids.extend(self.bpe(word))
        return ids

    def encode(self, prompts: list[str], on_truncate=None) -> np.ndarray:
        """int32 [len(prompts), 77]: BOS, the prompt's tokens (at most 75), EOS, then padding.
        A longer prompt is truncated: `on_truncate(message)` hears of it (default: a warning)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        dropped = []
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise UserError(f"prompt {row}: expected a string, got {type(prompt).__name__}")
            ids = self.tokenize(prompt)
            if len(ids) > room:
                dropped.append((row, len(ids) - room))
                ids = ids[:room]
            out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        if dropped:
            detail = ", ".join(f"prompt {row}: {n}" for row, n in dropped)
            message = (f"prompts longer than {room} tokens were truncated; tokens dropped: {detail} "
                       f"(CLIP reads {self.max_length} positions, BOS and EOS included; generate --long-prompts encodes "
                       "longer prompts in 75-token chunks)")
            if on_truncate is None:
                warnings.warn(message, stacklevel=2)
            else:
                on_truncate(message)
        return out


def open_tokenizer(path, encoder: int = 1) -> Tokenizer:
    """The tokenizer of text encoder `encoder` (1 or 2): `path` is a diffusers pipeline folder (its
    `tokenizer/` or `tokenizer_2/`) or that tokenizer folder itself."""
    if encoder not in FOLDERS:
        raise UserError(f"encoder {encoder!r}: expected 1 or 2")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{p}: not a folder (expected a diffusers pipeline folder with {FOLDERS[encoder]}/, "
                        "or a tokenizer folder)")
    if (p / FOLDERS[encoder]).is_dir():
        p = p / FOLDERS[encoder]
    elif (p / "model_index.json").is_file():
        raise UserError(f"{p}: this pipeline folder has no {FOLDERS[encoder]}/ folder")
    return Tokenizer(p)
