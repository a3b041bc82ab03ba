"""Long prompts and AUTOMATIC1111's prompt-weighting syntax for SDXL's two CLIP text encoders: a prompt
becomes 77-token chunks with one weight per token, and the weights are applied to the encoders' outputs.

The flow for one prompt and one encoder:

1. `parse` reads A1111's syntax into (text, weight) fragments (`BREAK` is a marker fragment);
2. `chunks` tokenizes fragment by fragment and cuts the tokens into chunks of BOS + 75 + EOS + padding;
3. the caller runs the encoder on each chunk (every chunk is an ordinary 77-token input) and joins the
   chunks' hidden states along the token axis, [n, 77*k, C]; SDXL's pooled embedding is text_encoder_2's
   output for chunk 0 (A1111 and compel also pool one 77-token sequence, not the whole prompt);
4. `apply_weights` applies A1111's default emphasis ("Original") to that encoder's hidden states.

Prompt and negative prompt (and the two tokenizers, which can disagree: `tokenizer_2` makes every "!" a
token of its own) may need different numbers of chunks; `pad_chunks` appends empty-prompt chunks, as
A1111's "pad prompt/negative prompt" option and compel do.

Sources: A1111 modules/prompt_parser.py (`parse_prompt_attention`), modules/sd_hijack_clip.py
(`tokenize_line`, `process_tokens`), modules/sd_emphasis.py (`EmphasisOriginal`); compel 2.5
compel/embeddings_provider.py (`EmbeddingsProvider`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .errors import UserError
from .tokenizer import MAX_LENGTH, Tokenizer

CHUNK_TOKENS = MAX_LENGTH - 2  # prompt tokens per chunk: 77 positions less BOS and EOS
UP, DOWN = 1.1, 1 / 1.1  # "(x)" and "[x]"; A1111 multiplies by 1/1.1 (not divides by 1.1): the bits matter when merging
BREAK = ("BREAK", -1.0)  # A1111's marker fragment: "start a new chunk here"

# A1111's tokens, first match wins: an escape (\( \) \[ \] \\, or a lone backslash, which is dropped);
# an opening bracket; ":number)" closing a round bracket with that weight; a closing bracket; plain text;
# a colon that is not part of a weight.
SYNTAX = re.compile(r"""
    \\[()\[\]\\]?
  | [(\[]
  | :\s*([+-]?[.\d]+)\s*\)
  | [)\]]
  | [^\\()\[\]:]+
  | :
""", re.X)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(prompt: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: (text, weight) fragments, adjacent equal weights merged.

    `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:1.5)` by 1.5 (spaces around the number
    allowed: `( x : 0.5 )`); nesting multiplies. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters, a
    backslash before anything else is dropped. A closing bracket without its opening one is literal text,
    so is `:1.2)` outside round brackets; brackets still open at the end apply to the rest of the prompt
    (round ones first). The word `BREAK` (case-sensitive, whole word) in plain text becomes the marker
    fragment `BREAK` ("BREAK", -1.0) with the spaces around it removed; brackets around it scale that -1 as
    any weight, and then (as in A1111) it is no longer a marker but the text "BREAK". An empty prompt is
    [("", 1.0)]. A weight that is not a number (`(x:1.2.3)`) is a UserError; A1111 raises ValueError.
    """
    pieces: list[list] = []  # [text, weight]: weights change while brackets close
    round_open: list[int] = []  # index in `pieces` where each open bracket starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in SYNTAX.finditer(prompt):
        token, number = match.group(0), match.group(1)
        if token[0] == "\\":
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif number is not None and round_open:
            try:
                factor = float(number)
            except ValueError:
                raise UserError(f"prompt weight {token!r}: {number!r} is not a number (write a weight as "
                                "(text:1.2))") from None
            scale(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)

    merged: list[tuple[str, float]] = []
    for text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


class Chunks(NamedTuple):
    """One prompt for one tokenizer: `ids` int32 [n_chunks, 77], each row BOS, up to 75 prompt tokens,
    EOS, then `pad_id`; `weights` float32 [n_chunks, 77], 1.0 on BOS, EOS and padding; `dropped`: prompt
    tokens left out (only with long=False)."""
    ids: np.ndarray
    weights: np.ndarray
    dropped: int


def _to_arrays(tokenizer: Tokenizer, rows: list[list[tuple[int, float]]], dropped: int) -> Chunks:
    ids = np.full((len(rows), MAX_LENGTH), tokenizer.pad_id, np.int32)
    weights = np.ones((len(rows), MAX_LENGTH), np.float32)
    for r, row in enumerate(rows):
        ids[r, 0], ids[r, len(row) + 1] = tokenizer.bos_id, tokenizer.eos_id
        if row:
            ids[r, 1:len(row) + 1], weights[r, 1:len(row) + 1] = zip(*row)
    return Chunks(ids, weights, dropped)


def chunks(tokenizer: Tokenizer, prompt: str, weighted: bool = True, long: bool = True,
           max_chunks: int | None = None, comma_backtrack: int = 0) -> Chunks:
    """`prompt`'s chunks for `tokenizer`.

    weighted=True reads A1111's syntax (`parse`) and tokenizes fragment by fragment, each token taking its
    fragment's weight (as A1111 and compel do: "(red)dish" is the tokens of "red" then of "dish");
    weighted=False takes the prompt as plain text, weights all 1, `BREAK` an ordinary word (as diffusers;
    A1111's emphasis "None").

    Chunks are plain 75-token splits of the prompt's tokens, like compel with
    `split_long_text_mode=SplitLongTextMode.BRUTAL` (compel's default, SENTENCES, instead ends a chunk
    after the last "." of its 75 tokens, else the last of . , ; :, else the last word end). A `BREAK`
    marker ends the current chunk (an empty one too: a prompt starting with BREAK has an empty first
    chunk; one ending with BREAK gets no empty last chunk). An empty prompt is one chunk.

    comma_backtrack > 0 is A1111's "prompt word wrap length limit" (A1111's default 20; 0 here, so
    chunks match compel and diffusers): when a chunk is full and a non-comma token arrives, the tokens
    after the chunk's last comma move to the next chunk if that comma is at most `comma_backtrack`
    tokens from the chunk's end.

    long=False is diffusers' behaviour: only the first chunk is kept, `dropped` counts the other tokens
    (for a plain prompt: truncation to 75 tokens, the same ids as `tokenizer.encode`). With long=True and
    `max_chunks` set, a prompt needing more chunks is a UserError.
    """
    fragments = parse(prompt) if weighted else [(prompt, 1.0)]
    comma = tokenizer.vocab.get(",</w>")
    rows: list[list[tuple[int, float]]] = [[]]  # (id, weight) of each chunk's prompt tokens; the last one is open
    last_comma = -1  # index of the open chunk's last comma
    total = 0
    for text, weight in fragments:
        if (text, weight) == BREAK:
            rows.append([])
            last_comma = -1
            continue
        for token in tokenizer.tokenize(text):
            row = rows[-1]
            if token == comma:
                last_comma = len(row)
            elif (comma_backtrack and len(row) == CHUNK_TOKENS and last_comma >= 0
                  and CHUNK_TOKENS - last_comma <= comma_backtrack):
                rows[-1:] = [row[:last_comma + 1], row[last_comma + 1:]]
                last_comma = -1
            if len(rows[-1]) == CHUNK_TOKENS:
                rows.append([])
                last_comma = -1
            rows[-1].append((token, weight))
            total += 1
    if not rows[-1] and len(rows) > 1:
        rows.pop()

    if not long:
        return _to_arrays(tokenizer, rows[:1], total - len(rows[0]))
    if max_chunks is not None and len(rows) > max_chunks:
        breaks = " (BREAK starts a new chunk)" if weighted and any(f == BREAK for f in fragments) else ""
        raise UserError(f"the prompt has {total} tokens in {len(rows)} chunks of up to {CHUNK_TOKENS}{breaks}; the "
                        f"engines were built for {max_chunks} chunk(s), at most {max_chunks * CHUNK_TOKENS} tokens: "
                        "shorten the prompt or build the engines for more with `python -m trt_sdxl.build --prompt-chunks N`")
    return _to_arrays(tokenizer, rows, 0)


def pad_chunks(prompt_chunks: Chunks, n_chunks: int, tokenizer: Tokenizer) -> Chunks:
    """`prompt_chunks` with empty-prompt chunks (BOS, EOS, padding; weights 1) appended up to `n_chunks`.

    Prompt and negative prompt must have as many chunks for classifier-free guidance in one batch: pad
    both to the larger count (over both tokenizers). Encoding an empty chunk gives the empty prompt's
    embedding, which is what A1111 (`pad_cond_uncond`, off by default: A1111 otherwise runs the two
    through the UNet separately) and compel (`pad_conditioning_tensors_to_same_length`) append.
    """
    have = prompt_chunks.ids.shape[0]
    if n_chunks < have:
        raise ValueError(f"cannot pad {have} chunks to {n_chunks}")
    empty = _to_arrays(tokenizer, [[]] * (n_chunks - have), 0)
    return Chunks(np.concatenate([prompt_chunks.ids, empty.ids]),
                  np.concatenate([prompt_chunks.weights, empty.weights]), prompt_chunks.dropped)


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's default emphasis ("Original"): each token's hidden state times its weight, then each
    77-token chunk rescaled so that the mean over its 77*C values is what it was before weighting.

    `hidden` float32 [n, 77*k, C]: one encoder's output for n prompts of k chunks (`Chunks.ids` rows
    encoded and joined along the token axis); `weights` [n, 77*k] (`Chunks.weights` reshaped to one row).
    A1111 calls its emphasis once per chunk (sd_hijack_clip `process_tokens`) on the batch of texts it
    encodes together, which is one prompt (its scheduled variants; prompt editing is not supported here):
    so the mean is per prompt and per chunk. It does so for each text encoder on its own: call this once
    per encoder, before joining the two along C. The means are taken in float64 (A1111: the model's dtype).
    A chunk whose weights are all 1 comes back bit for bit; if all weights are 1, `hidden` itself does.
    """
    hidden = np.asarray(hidden, np.float32)
    weights = np.asarray(weights, np.float32)
    if hidden.ndim != 3 or hidden.shape[1] % MAX_LENGTH or weights.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {hidden.shape} and weights {weights.shape}: expected [n, 77*k, C] and [n, 77*k]")
    if np.all(weights == 1):
        return hidden
    n, length, width = hidden.shape
    z = hidden.reshape(n, length // MAX_LENGTH, MAX_LENGTH, width)  # [n, k, 77, C]
    w = weights.reshape(n, length // MAX_LENGTH, MAX_LENGTH, 1)
    weighted = z * w
    plain = np.all(w == 1, axis=(2, 3))  # [n, k]
    before = z.mean(axis=(2, 3), dtype=np.float64)
    after = weighted.mean(axis=(2, 3), dtype=np.float64)
    zero = ~plain & (after == 0)
    if zero.any():
        row, chunk = np.argwhere(zero)[0]
        raise UserError(f"prompt {row}, chunk {chunk}: the weights make the mean of the weighted hidden states 0, "
                        "so A1111's mean-restoring rescale is undefined; change the prompt weights")
    scale = np.where(plain, 1.0, before / np.where(plain, 1.0, after)).astype(np.float32)
    return (weighted * scale[:, :, None, None]).reshape(n, length, width)
