"""Tiny SDXL text components for tests: a BPE vocabulary learned from a small built-in English
text, and two small CLIP text encoders, saved by transformers itself so the layout is the real one.

Test-only: imports torch and transformers. The vocabulary is built like CLIP's: the 256 byte
symbols of GPT-2's byte-to-unicode table, the same with `</w>` (end of word), the results of the
merges learned here, then `<|startoftext|>` and `<|endoftext|>` (the largest ids, as in CLIP, so
that `input_ids.argmax()` finds the end of text). Encoder weights are re-drawn from a seeded
generator: matrices ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.2^2), biases and embeddings
~ N(0, 0.1^2).
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is offline; set before huggingface_hub is imported

import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

transformers.utils.logging.set_verbosity_error()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_HIDDEN = 32  # both encoders: their penultimate states concatenate to the tiny UNets' width 64
TINY_PROJECTION = 32  # tiny_models.TINY_POOLED_DIM
NUM_MERGES = 300

CORPUS = """
A photograph of an astronaut riding a horse on the moon, highly detailed, dramatic lighting.
The old lighthouse stands on the rocky coast while the waves crash against the stones below.
A cozy living room with a fireplace, a sleeping cat and warm light from the window at sunset.
Portrait of a young woman with red hair, oil painting, in the style of the great masters.
There is a small village in the mountains where the people grow apples and make cheese.
The children were playing in the garden and their mother was reading a book under the tree.
A futuristic city at night with neon signs, flying cars and rain on the streets, cinematic.
Landscape with green hills, a river, blue sky and white clouds, watercolor, soft colors.
She said that they would meet again in the spring, when the flowers open and the birds sing.
A bowl of fresh fruit on a wooden table: oranges, grapes, pears and a green apple, still life.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte to a printable character (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    table = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    split = {}
    for word, count in words.items():
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        split[tuple(symbols)] = count
    merges = []
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for symbols, count in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        split = merged
    return merges


def tiny_vocab(num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's id order."""
    base = list(bytes_to_unicode().values())
    merges = learn_merges(CORPUS, num_merges)
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def save_tiny_tokenizer(folder, pad_token: str = EOS, layout: str = "hub") -> Path:
    """Write a tiny CLIP tokenizer folder; `pad_token` "!" gives SDXL's `tokenizer_2`.

    layout "hub": vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json in the
    format of the published SDXL folders (special tokens as AddedToken objects, no tokenizer.json).
    layout "transformers": transformers' CLIPTokenizer built from the vocabulary and saved with
    `save_pretrained` (tokenizer.json and its own tokenizer_config.json), plus vocab.json and merges.txt.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    if layout == "transformers":
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
        tokenizer.save_pretrained(folder)
        return folder
    special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS), "unk_token": _added_token(EOS),
               "pad_token": pad_token}
    config = {"add_prefix_space": False, **special, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special_map = {k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
                   for k, v in special.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    return folder


def tiny_text_config(encoder: int, eos_token_id: int = 2) -> CLIPTextConfig:
    """Encoder 1 is CLIP ViT-L-like (quick_gelu), encoder 2 OpenCLIP bigG-like (gelu, projection).

    eos_token_id=2 is the legacy value SDXL's configs carry (pool at input_ids.argmax());
    the real EOS id gives transformers' newer rule (pool at the first EOS).
    """
    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=2,  # head size 16 != number of heads
        max_position_embeddings=77,
        hidden_act="quick_gelu" if encoder == 1 else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=TINY_PROJECTION,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=eos_token_id,
    )


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter from a generator seeded with `seed` (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embedding" in name or p.ndim < 2:
                value = 1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise
            else:
                value = noise / p.shape[1] ** 0.5
            p.copy_(value)
    return model


def tiny_text_encoder(encoder: int, seed: int = 0, eos_token_id: int = 2):
    """Tiny `CLIPTextModel` (encoder 1) or `CLIPTextModelWithProjection` (encoder 2), float32, eval mode."""
    cls = CLIPTextModel if encoder == 1 else CLIPTextModelWithProjection
    return randomize(cls(tiny_text_config(encoder, eos_token_id)), seed).eval()


def save_tiny_text_components(folder, seed: int = 0, eos_token_id: int = 2, tokenizer_layout: str = "hub") -> Path:
    """Save `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/` into `folder` and list them
    in its `model_index.json` (created, or merged into an existing one); returns `folder`."""
    folder = Path(folder)
    tiny_text_encoder(1, seed, eos_token_id).save_pretrained(folder / "text_encoder")
    tiny_text_encoder(2, seed + 1, eos_token_id).save_pretrained(folder / "text_encoder_2")
    save_tiny_tokenizer(folder / "tokenizer", EOS, tokenizer_layout)
    save_tiny_tokenizer(folder / "tokenizer_2", "!", tokenizer_layout)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"_class_name": "StableDiffusionXLPipeline"}
    index.update({
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    })
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
