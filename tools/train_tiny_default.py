"""Train the embedded tiny default model on Fashion-MNIST: a tiny SDXL pipeline that draws clothes a person recognizes.

Every component is one of SDXL's own classes, so `diffusers.StableDiffusionXLPipeline.from_pretrained`
loads the folder, offline, and the package reads it like any SDXL checkpoint:

- `unet/`: UNet2DConditionModel with SDXL's topology (DownBlock2D + two CrossAttnDownBlock2D,
  transformer depths 1/1/2, linear projections, "text_time" added conditioning), widths 32/64/64,
  1/2/2 heads, cross-attention width 64, fp16; sample_size 8 (the latent side);
- `vae/`: AutoencoderKL with four blocks like SDXL's (x8 downscale, 4 latent channels), fp32,
  force_upcast as SDXL's config, scaling_factor = 1/std of the trained latents (SDXL's 0.13025
  is the same statistic); sample_size 64 (the image side);
- `text_encoder/` (CLIPTextModel) and `text_encoder_2/` (CLIPTextModelWithProjection): hidden
  width 32 each, so their penultimate states concatenate to the UNet's 64; projection 32 (the
  pooled `text_embeds`); trained jointly with the UNet; fp32 like SDXL's own text encoder files,
  since transformers loads a model in its stored dtype and diffusers the UNet in fp32, and a
  plain `from_pretrained(folder)` must give one dtype throughout;
- `tokenizer/`, `tokenizer_2/`: a CLIP BPE vocabulary learned from the training prompts, so every
  prompt word is one token, in the published SDXL file layout (`tokenizer_2` pads with "!");
- `scheduler/`: SDXL base's EulerDiscreteScheduler config; `model_index.json` as SDXL's;
- `calibration_prompts.txt`: the prompts an 8-bit build calibrates on (its own domain's);
- `training_log.json`: settings, losses, timings, library versions, recognizability figures.

Data: Fashion-MNIST (H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017; Copyright (c) 2017 Zalando SE,
MIT license), 28x28 grayscale pictures of 10 kinds of clothing, read from Debian's package
(`apt-get install dataset-fashion-mnist`, files /usr/share/datasets/fashion-mnist/*-ubyte.gz).

Stages (about 25 minutes on one CPU thread):
1. images: 28 px -> s px -> 64 px (bilinear), s the SDXL "original size" micro-conditioning,
   drawn from 28..64 per image; gray replicated to 3 channels, in [-1, 1];
2. VAE: L1 reconstruction + a small KL term;
3. latents: posterior mean/std of the UNet's training images, scaled by scaling_factor;
4. UNet + both text encoders: epsilon prediction on SDXL's scaled-linear betas (0.00085..0.012,
   1000 steps), min-SNR-5 loss weights (Hang et al. 2023, arXiv:2303.09556), 10% of prompts
   dropped to zero embeddings (what force_zeros_for_empty_prompt feeds the unconditional branch
   of CFG), EMA of the weights;
5. evaluation: the saved folder is loaded by diffusers' pipeline and draws a grid (10 classes x 4
   seeds, 30 Euler steps, CFG 5); a small CNN trained on real 64 px images scores real test
   images, VAE reconstructions and generated images (label = prompted class).

Seeded with deterministic data order: the same versions of torch/diffusers/transformers write the
same files. The folder is built next to the target and swapped in only when complete.

    python tools/train_tiny_default.py [--out FOLDER] [--samples PNG] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tools")]  # the package, test helpers, tools
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local; set before huggingface_hub is imported

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from folder_swap import swap_in  # noqa: E402
import tiny_clip  # noqa: E402  (the BPE learner and GPT-2 byte table the test tokenizers are made with)
from trt_sdxl import configs  # noqa: E402

TARGET = REPO / "weights" / "tiny-sdxl"
DATA = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIDE = 64
LATENT_SIDE = IMAGE_SIDE // 8
SOURCE_SIDE = 28
TEXT_WIDTH = 32  # each encoder's hidden width; concatenated: the UNet's cross-attention width 64
POOLED_WIDTH = 32  # text_encoder_2's projection: the UNet's `text_embeds`
TIME_EMBED_WIDTH = 8  # addition_time_embed_dim: each of the 6 time ids is embedded to this width
MAX_TOKENS = 77

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
CLASS_PHRASES = (("a t-shirt", "a top"), ("a trouser", "a pair of trousers"), ("a pullover", "a sweater"),
                 ("a dress",), ("a coat",), ("a sandal",), ("a shirt",), ("a sneaker",), ("a bag", "a handbag"),
                 ("an ankle boot",))
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "a black and white photo of {}",
             "a black and white picture of {}", "a small picture of {}", "{} on a black background")


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    train_images: int = 30_000  # a seeded subset of the 60k: encoding each image to a latent costs ~2 ms
    vae_steps: int = 1_200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5  # on the per-image KL sum (256 latent values) against the mean L1 per pixel
    unet_steps: int = 2_000
    unet_batch: int = 64
    lr: float = 1e-3  # UNet and both text encoders
    warmup_steps: int = 100
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    drop_prompt: float = 0.1
    classifier_images: int = 60_000
    classifier_epochs: int = 2
    eval_per_class: int = 20
    eval_steps: int = 30
    eval_cfg: float = 5.0
    grid_seeds: int = 4


QUICK = dict(train_images=512, vae_steps=4, unet_steps=4, warmup_steps=2, classifier_images=512,
             classifier_epochs=1, eval_per_class=4, eval_steps=4)


class Progress:
    """One line every `every` steps: the mean of each figure since the last line, elapsed time, ETA."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0
        self.history: list[dict] = []

    def __call__(self, step: int, **figures: float) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if step % self.every and step != self.total:
            return
        means = {k: v / self.count for k, v in self.sums.items()}
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        self.history.append({"step": step, **{k: round(v, 6) for k, v in means.items()}})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
        print(f"{self.name} {step:>5}/{self.total}  {shown}  {elapsed:6.0f} s  ETA {eta:5.0f} s", flush=True)
        self.sums, self.count = {}, 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def batches(n: int, batch: int, generator: torch.Generator):
    """Endless index batches over range(n), one seeded permutation per epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


# ---------------------------------------------------------------- data


def read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (the MNIST format): 0, 0, type 0x08 (uint8), ndim, ndim big-endian uint32 sizes, data."""
    data = gzip.decompress(path.read_bytes())
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path}: not a uint8 idx file (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split "train" (60k) or "test" (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(DATA / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def upscale(images: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> uint8 [N, 64, 64]: each image resized to its `sides[i]` px, then to 64 px.

    An SDXL training image of original size s was stored at s px and resized to the training size;
    the two bilinear steps reproduce that for a 28 px source shown at s px.
    """
    out = torch.empty(len(images), IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    pixels = images[:, None].float()  # [N, 1, 28, 28]
    for side in sides.unique().tolist():
        pick = sides == side
        x = F.interpolate(pixels[pick], size=side, mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(x, size=IMAGE_SIDE, mode="bilinear", antialias=True, align_corners=False)
        out[pick] = x[:, 0].round().clamp(0, 255).to(torch.uint8)
    return out


def to_pixels(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, channels, H, W] in [-1, 1] (gray repeated)."""
    return (images.float() / 127.5 - 1)[:, None].expand(-1, channels, -1, -1).contiguous()


# ---------------------------------------------------------------- prompts and tokenizers


def class_prompts() -> list[list[str]]:
    """Every training prompt of each class: each template with each of the class's phrases."""
    return [[t.format(p) for t in TEMPLATES for p in phrases] for phrases in CLASS_PHRASES]


def tokenizer_vocab(prompts: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's id order: 256 byte symbols, the same with `</w>`, the merges learned
    from `prompts` until none is left (every prompt word one token), then BOS and EOS (the largest
    ids, so that the legacy `eos_token_id` 2 of SDXL's encoder configs pools at input_ids.argmax())."""
    merges = tiny_clip.learn_merges("\n".join(prompts), num_merges=100_000)
    base = list(tiny_clip.bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [tiny_clip.BOS, tiny_clip.EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError(f"{len(tokens) - len(vocab)} merges repeat a token; the vocabulary would have gaps")
    return vocab, merges


def save_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as SDXL's published folders have them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special = {"bos_token": {"content": tiny_clip.BOS, **token}, "eos_token": {"content": tiny_clip.EOS, **token},
               "unk_token": {"content": tiny_clip.EOS, **token}}
    config = {"add_prefix_space": False, **{k: {"__type": "AddedToken", **v} for k, v in special.items()},
              "pad_token": pad_token, "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
              "model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}, indent=2) + "\n",
                                                    encoding="utf-8")


def make_tokenizers(folder: Path, prompts: list[str]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Write `tokenizer/` (pads with EOS) and `tokenizer_2/` (pads with "!", as SDXL's) and load them back
    with transformers, checking that every prompt word is one known token."""
    vocab, merges = tokenizer_vocab(prompts)
    save_tokenizer(folder / "tokenizer", vocab, merges, tiny_clip.EOS)
    save_tokenizer(folder / "tokenizer_2", vocab, merges, "!")
    tokenizers = CLIPTokenizer.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    words = sorted({w for p in prompts for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", p.lower())})
    for tokenizer in tokenizers:
        split = {w: tokenizer.tokenize(w) for w in words}
        unknown = {w: t for w, t in split.items() if len(t) != 1 or t[0] not in vocab}
        if unknown:
            raise RuntimeError(f"prompt words that are not one token: {unknown}")
    return tokenizers


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """int64 [P, 77], padded as diffusers' encode_prompt pads."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------- models


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=(8, 16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=IMAGE_SIDE, force_upcast=True)


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIDE, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),  # as in SDXL's config, these are head counts
        use_linear_projection=True, cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED_WIDTH,
    )


def text_encoder_config(encoder: int, vocab_size: int) -> CLIPTextConfig:
    """Encoder 1 CLIP ViT-L-like (quick_gelu), encoder 2 OpenCLIP bigG-like (gelu, with projection);
    the token ids 0/1/2 are the legacy values SDXL's configs carry."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=POOLED_WIDTH,
        hidden_act="quick_gelu" if encoder == 1 else "gelu", layer_norm_eps=1e-5,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )


def encode_prompts(text_encoder, text_encoder_2, ids_1, ids_2) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' SDXL encode_prompt computes: ([P, 77, 64] penultimate states of both, [P, 32] text_embeds)."""
    states_1 = text_encoder(ids_1, output_hidden_states=True).hidden_states[-2]  # [P, 77, 32]
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([states_1, out_2.hidden_states[-2]], dim=-1), out_2.text_embeds


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """[1000] cumulative alphas of SDXL's training schedule (scaled_linear betas 0.00085..0.012)."""
    config = configs.load("sdxl_base_1.0", "scheduler")
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def lr_factor(step: int, s: Settings, steps: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - s.warmup_steps) / max(1, steps - s.warmup_steps)))


# ---------------------------------------------------------------- training


def train_vae(images: torch.Tensor, s: Settings) -> tuple[AutoencoderKL, Progress]:
    """L1 + kl_weight * KL on `images` (uint8 [N, 64, 64])."""
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, s, s.vae_steps))
    order = batches(len(images), s.vae_batch, torch.Generator().manual_seed(s.seed + 1))
    progress = Progress("vae ", s.vae_steps, every=50)
    for step in range(1, s.vae_steps + 1):
        x = to_pixels(images[next(order)])  # [B, 3, 64, 64]
        posterior = vae.encode(x).latent_dist  # [B, 4, 8, 8] mean and std
        recon = vae.decode(posterior.sample()).sample  # [B, 3, 64, 64]
        l1, kl = (recon - x).abs().mean(), posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        (l1 + s.kl_weight * kl).backward()
        optimizer.step()
        schedule.step()
        progress(step, l1=l1.item(), kl=kl.item())
    return vae.eval(), progress


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std), each [N, 4, 8, 8], of uint8 [N, 64, 64] images."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(to_pixels(images[i:i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(latent_mean, latent_std, labels, sides, prompt_ids, prompt_first, prompt_count, vocab_size: int,
               s: Settings):
    """UNet and both text encoders, jointly, on scaled latents (mean + std * noise); returns the EMA models.

    prompt_ids: ([P, 77], [P, 77]) token ids of every prompt for each tokenizer; the prompts of
    class c are rows prompt_first[c] .. prompt_first[c] + prompt_count[c] - 1.
    """
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_encoder_config(1, vocab_size))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(2, vocab_size))
    models = (unet, text_encoder, text_encoder_2)
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, s, s.unet_steps))
    ema = [p.detach().clone() for p in params]
    alphas_cumprod = scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(s.seed + 2)
    order = batches(len(latent_mean), s.unet_batch, g)
    progress = Progress("unet", s.unet_steps, every=50)
    for step in range(1, s.unet_steps + 1):
        idx = next(order)
        b = len(idx)
        mean = latent_mean[idx]  # [B, 4, 8, 8]
        z0 = mean + latent_std[idx] * torch.randn(mean.shape, generator=g)
        t = torch.randint(0, len(alphas_cumprod), (b,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise

        label = labels[idx]
        prompt = prompt_first[label] + (torch.rand(b, generator=g) * prompt_count[label]).long()  # [B]
        unique, inverse = prompt.unique(return_inverse=True)  # encode each distinct prompt once
        embeds, pooled = encode_prompts(text_encoder, text_encoder_2, prompt_ids[0][unique], prompt_ids[1][unique])
        keep = (torch.rand(b, generator=g) >= s.drop_prompt).float()
        embeds = embeds[inverse] * keep.view(b, 1, 1)  # [B, 77, 64]
        pooled = pooled[inverse] * keep.view(b, 1)  # [B, 32]
        side = sides[idx].float()
        target = torch.full_like(side, IMAGE_SIDE)
        crop = torch.zeros_like(side)
        time_ids = torch.stack([side, side, crop, crop, target, target], dim=1)  # [B, 6]: original, crop, target size

        pred = unet(zt, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = (a / (1 - a)).view(b)
        loss = (snr.clamp(max=s.min_snr_gamma) / snr * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))  # diffusers EMAModel's warmup of the decay
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        progress(step, loss=loss.item())
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return [m.eval() for m in models], progress


# ---------------------------------------------------------------- saving


def write_calibration_prompts(folder: Path) -> None:
    """`calibration_prompts.txt`, which `python -m trt_sdxl.build --precision int8|fp8` calibrates on:
    72 training prompts, the ten classes in turn (so the last 8, held aside for tuning, are 8 classes)."""
    options = class_prompts()
    prompts = [options[i % 10][(i // 10) % len(options[i % 10])] for i in range(72)]
    header = ("# Calibration prompts of the embedded default (python -m trt_sdxl.build --precision int8 reads them):\n"
              "# its training prompts, the ten classes in turn; the last eight are held aside for tuning.\n")
    (folder / "calibration_prompts.txt").write_text(header + "\n".join(prompts) + "\n")


def model_index() -> dict:
    """The model_index.json diffusers writes for a StableDiffusionXLPipeline (SDXL base's entries)."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_models(folder: Path, vae: AutoencoderKL, unet, text_encoder, text_encoder_2) -> None:
    """Each model by its own save_pretrained (the UNet fp16, the others fp32: see the module docstring);
    the scheduler config as SDXL base publishes it."""
    vae.save_pretrained(folder / "vae")
    unet.to(torch.float16).save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    published = {k: v for k, v in configs.load("sdxl_base_1.0", "scheduler").items() if not k.startswith("_")}
    scheduler = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__, **published}
    (folder / "scheduler").mkdir()
    for path, obj in ((folder / "scheduler" / "scheduler_config.json", scheduler), (folder / "model_index.json", model_index())):
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- evaluation


def classifier() -> torch.nn.Sequential:
    """[B, 1, 64, 64] -> [B, 10] logits: three stride-2 convolutions and a linear layer."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, stride=2, padding=1), torch.nn.ReLU(),  # [B, 16, 32, 32]
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),  # [B, 32, 16, 16]
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),  # [B, 64, 8, 8]
        torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(64 * 8 * 8, 10),
    )


def train_classifier(images: torch.Tensor, labels: torch.Tensor, s: Settings) -> tuple[torch.nn.Module, Progress]:
    """The CNN on real training images (uint8 [N, 28, 28]) shown at 64 px like the model's training images."""
    model = classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = 128
    steps = s.classifier_epochs * (len(images) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = batches(len(images), batch, torch.Generator().manual_seed(s.seed + 3))
    full_size = torch.full((batch,), IMAGE_SIDE)
    progress = Progress("cnn ", steps, every=200)
    for step in range(1, steps + 1):
        idx = next(order)
        logits = model(to_pixels(upscale(images[idx], full_size), channels=1))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress(step, loss=loss.item())
    return model.eval(), progress


@torch.no_grad()
def predict(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Class ids [N] of gray images [N, 1, 64, 64] in [-1, 1]."""
    return torch.cat([model(pixels[i:i + 500]).argmax(1) for i in range(0, len(pixels), 500)])


def accuracy_figures(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """Overall and per-class accuracy, and the confusion matrix (rows: true/prompted class)."""
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {"accuracy": round((predicted == labels).float().mean().item(), 4),
            "per_class": {CLASS_NAMES[c]: round(per_class[c].item(), 3) for c in range(10)},
            "confusion": confusion.tolist()}


def evaluation_prompts(per_class: int) -> tuple[list[str], list[int], torch.Tensor]:
    """(prompts, seeds, labels): seeds 0..per_class-1 for each class, its prompts taken in turn."""
    prompts, seeds, labels = [], [], []
    for c, options in enumerate(class_prompts()):
        for seed in range(per_class):
            prompts.append(options[seed % len(options)])
            seeds.append(seed)
            labels.append(c)
    return prompts, seeds, torch.tensor(labels)


@torch.no_grad()
def generate(folder: Path, prompts: list[str], seeds: list[int], s: Settings) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [0, 1] drawn by diffusers' StableDiffusionXLPipeline from the saved folder,
    loaded as a user would (no dtype given: everything fp32)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), 50):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[i:i + 50]]
        images.append(pipe(prompt=prompts[i:i + 50], num_inference_steps=s.eval_steps, guidance_scale=s.eval_cfg,
                           generator=generators, output_type="pt").images)
    return torch.cat(images)


def sample_grid(images: torch.Tensor, labels: torch.Tensor, seeds: list[int], columns: int, scale: int = 2):
    """PIL image: one row per class (its name on the left), its first `columns` seeds, each `scale`x enlarged."""
    side, margin = IMAGE_SIDE * scale, 90
    grid = Image.new("RGB", (margin + columns * side, 10 * side), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(10):
        draw.text((4, c * side + side // 2 - 6), CLASS_NAMES[c], fill="black")
        picks = [i for i in range(len(seeds)) if labels[i] == c and seeds[i] < columns]
        for col, i in enumerate(picks):
            pixels = (images[i].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # [64, 64, 3]
            tile = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
            grid.paste(tile, (margin + col * side, c * side))
    return grid


def evaluate(folder: Path, vae: AutoencoderKL, samples: Path, s: Settings) -> dict:
    """The grid PNG and the classifier figures on real test images, VAE reconstructions and generated images."""
    train_images, train_labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(s.seed + 4))[:s.classifier_images]
    model, progress = train_classifier(train_images[pick], train_labels[pick], s)
    real = to_pixels(upscale(test_images, torch.full((len(test_images),), IMAGE_SIDE)), channels=1)  # [10k, 1, 64, 64]
    with torch.no_grad():
        recon = vae.decode(vae.encode(real[:1000].expand(-1, 3, -1, -1)).latent_dist.mean).sample  # [1k, 3, 64, 64]
    start = time.perf_counter()
    prompts, seeds, labels = evaluation_prompts(s.eval_per_class)
    generated = generate(folder, prompts, seeds, s)  # [N, 3, 64, 64] in [0, 1]
    generation_seconds = time.perf_counter() - start
    sample_grid(generated, labels, seeds, s.grid_seeds).save(samples)
    gray = generated.mean(1, keepdim=True) * 2 - 1  # [N, 1, 64, 64] in [-1, 1]
    return {
        "classifier": {"architecture": str(classifier()), "train_images": len(pick), "epochs": s.classifier_epochs,
                       "losses": progress.history, "seconds": round(progress.seconds, 1)},
        "real_test": accuracy_figures(predict(model, real), test_labels),
        "vae_reconstructions_of_test": accuracy_figures(predict(model, recon.mean(1, keepdim=True).clamp(-1, 1)),
                                                        test_labels[:1000]),
        "generated": {**accuracy_figures(predict(model, gray), labels), "images": len(prompts),
                      "steps": s.eval_steps, "cfg": s.eval_cfg, "seconds": round(generation_seconds, 1),
                      "prompts_of_class_0": prompts[:s.eval_per_class]},
    }


# ---------------------------------------------------------------- the whole run


def build(folder: Path, samples: Path, s: Settings) -> dict:
    """Train and write the pipeline into `folder` (exists, empty) and the grid to `samples`; returns the log."""
    torch.manual_seed(s.seed)
    timings = {}
    start = time.perf_counter()
    per_class = class_prompts()
    all_prompts = [p for prompts in per_class for p in prompts]
    tokenizers = make_tokenizers(folder, all_prompts)
    prompt_ids = tuple(token_ids(t, all_prompts) for t in tokenizers)  # 2 x [P, 77]
    prompt_count = torch.tensor([len(p) for p in per_class])
    prompt_first = torch.cumsum(prompt_count, 0) - prompt_count

    images, labels = fashion_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(s.seed))[:s.train_images]
    images, labels = images[pick], labels[pick]
    sides = torch.randint(SOURCE_SIDE, IMAGE_SIDE + 1, (len(images),), generator=torch.Generator().manual_seed(s.seed))
    images = upscale(images, sides)  # uint8 [N, 64, 64]
    timings["data_s"] = round(time.perf_counter() - start, 1)

    vae, vae_progress = train_vae(images, s)
    timings["vae_s"] = round(vae_progress.seconds, 1)
    t0 = time.perf_counter()
    latent_mean, latent_std = encode(vae, images)  # [N, 4, 8, 8] each
    latent_rms = (latent_mean.var() + latent_std.pow(2).mean()).sqrt().item()  # std of sampled latents
    vae.register_to_config(scaling_factor=round(1 / latent_rms, 5))
    scale = vae.config.scaling_factor
    timings["encode_s"] = round(time.perf_counter() - t0, 1)
    print(f"latents: std {latent_rms:.4f}, mean {latent_mean.mean().item():+.4f} -> scaling_factor {scale}", flush=True)

    (unet, text_encoder, text_encoder_2), unet_progress = train_unet(
        latent_mean * scale, latent_std * scale, labels, sides, prompt_ids, prompt_first, prompt_count,
        len(tokenizers[0]), s)
    timings["unet_s"] = round(unet_progress.seconds, 1)
    save_models(folder, vae, unet, text_encoder, text_encoder_2)
    write_calibration_prompts(folder)

    t0 = time.perf_counter()
    figures = evaluate(folder, vae, samples, s)
    timings["evaluation_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "settings": dataclasses.asdict(s),
        "data": {"source": "Fashion-MNIST (Zalando SE, MIT license), " + str(DATA), "class_names": CLASS_NAMES,
                 "templates": TEMPLATES, "class_phrases": CLASS_PHRASES, "original_sides": [SOURCE_SIDE, IMAGE_SIDE]},
        "vae": {"losses": vae_progress.history, "scaling_factor": scale, "latent_std": round(latent_rms, 5),
                "latent_mean": round(latent_mean.mean().item(), 5)},
        "unet": {"losses": unet_progress.history, "final_loss": unet_progress.history[-1]["loss"]},
        "evaluation": figures,
        "timings": timings,
        "file_sizes": {**sizes, "total": sum(sizes.values())},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=TARGET, help="folder to (re)make (default: weights/tiny-sdxl)")
    p.add_argument("--samples", type=Path, default=None, help="the sample grid PNG (default: OUT/samples.png)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage, to check the code")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for library in (transformers, diffusers):  # the progress lines above are the report
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    settings = Settings(**(QUICK if args.quick else {}))
    target = args.out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        samples = args.samples.resolve() if args.samples else staging / "samples.png"
        log = build(staging, samples, settings)
        (staging / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    figures = log["evaluation"]
    print(f"accuracy: real test {figures['real_test']['accuracy']:.3f}, VAE reconstructions "
          f"{figures['vae_reconstructions_of_test']['accuracy']:.3f}, generated {figures['generated']['accuracy']:.3f}")
    print(f"{log['file_sizes']['total']:,d} bytes in {target}; {log['timings']['total_s']:.0f} s in total")


if __name__ == "__main__":
    main()
