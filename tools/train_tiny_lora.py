"""Train a style LoRA on the embedded tiny default: "inverted", the Fashion-MNIST garments drawn dark on a light
background, the opposite of what the default draws. LoRA features — refit, 8-bit refit quality
(tools/lora_refit_quality.py) — are then measured on a LoRA that does something real: random LoRA
weights on a trained model say little, as random models rank quantization methods wrongly.

PEFT LoRA (rank 8, alpha 8, Gaussian init of A, zero B) on the UNet's attention projections, feed-forward
layers and proj_in/proj_out; the text encoders and the base weights are frozen. Data: 8192 Fashion-MNIST
training images, inverted (255 - x), at the sizes and with the prompts the default was trained on
(tools/train_tiny_default.py); epsilon prediction with min-SNR-5 weights, AdamW, cosine decay. Seeded.

Writes weights/tiny-sdxl-loras/inverted.safetensors (diffusers/PEFT format, as diffusers' save_lora_weights
writes it, the LoRA config in its metadata) and inverted.json (settings, losses, and the check: the mean
brightness of the corners of images drawn with and without the LoRA, on our own pipeline, 20 steps, CFG 5).
About 7 minutes on 2 CPU cores.

    python tools/train_tiny_lora.py [--steps 2000] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tools")]
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_tiny_default as base  # noqa: E402  (data, prompts, noise schedule of the default's training)

MODEL = REPO / "weights" / "tiny-sdxl"
OUT = REPO / "weights" / "tiny-sdxl-loras"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
RANK = ALPHA = 8


def corner_brightness(rgb: np.ndarray) -> float:
    """Mean of the 8x8 corners of uint8 images [N, H, W, 3], in [0, 255]: the background."""
    corners = np.concatenate([rgb[:, :8, :8], rgb[:, :8, -8:], rgb[:, -8:, :8], rgb[:, -8:, -8:]], axis=1)
    return float(corners.mean())


def check(lora_file: Path) -> dict:
    """Images of the ten classes with and without the LoRA, by our own pipeline on the CPU."""
    from trt_sdxl import Generator, build

    prompts = [options[0] for options in base.class_prompts()]
    figures = {}
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for name, loras in (("without", None), ("with", [str(lora_file)])):
            folder = Path(tmp) / name
            build.build(MODEL, folder, engines=False, loras=loras)
            with Generator.load(folder, device="cpu") as g:
                rgb = np.stack([g.generate(p, steps=20, cfg=5.0, seed=i)[0].rgb for i, p in enumerate(prompts)])
            figures[f"corner_brightness_{name}_lora"] = round(corner_brightness(rgb), 1)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(MODEL / "vae")
    te1 = CLIPTextModel.from_pretrained(MODEL / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(MODEL / "text_encoder_2")
    tok1 = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(MODEL / "tokenizer_2")
    for model in (unet, vae, te1, te2):
        model.requires_grad_(False)

    g = torch.Generator().manual_seed(args.seed)
    images, labels = base.fashion_mnist("train")
    pick = torch.randperm(len(images), generator=g)[:args.images]
    images, labels = 255 - images[pick], labels[pick]  # the style: dark garments on a light background
    sides = torch.randint(base.SOURCE_SIDE, base.IMAGE_SIDE + 1, (len(images),), generator=g)
    pixels = base.upscale(images, sides)
    mean, std = base.encode(vae, pixels)
    scaling = vae.config.scaling_factor
    prompts = base.class_prompts()
    flat = [p for options in prompts for p in options]
    first = torch.tensor([sum(len(o) for o in prompts[:c]) for c in range(10)])
    count = torch.tensor([len(o) for o in prompts])
    with torch.no_grad():
        ids1 = tok1(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = tok2(flat, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        embeds, pooled = base.encode_prompts(te1, te2, ids1, ids2)  # [P, 77, 64], [P, 32]

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    params = [q for q in unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    settings = base.Settings(warmup_steps=50)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: base.lr_factor(i, settings, args.steps))
    alphas_cumprod = base.scaled_linear_alphas_cumprod()
    order = base.batches(len(images), args.batch, g)
    progress = base.Progress("lora", args.steps, every=50)
    unet.train()
    for step in range(1, args.steps + 1):
        idx = next(order)
        b = len(idx)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        t = torch.randint(0, len(alphas_cumprod), (b,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        label = labels[idx]
        prompt = first[label] + (torch.rand(b, generator=g) * count[label]).long()
        side = sides[idx].float()
        full = torch.full_like(side, base.IMAGE_SIDE)
        zero = torch.zeros_like(side)
        time_ids = torch.stack([side, side, zero, zero, full, full], dim=1)
        pred = unet(zt, t, embeds[prompt], added_cond_kwargs={"text_embeds": pooled[prompt], "time_ids": time_ids}).sample
        snr = (a / (1 - a)).view(b)
        loss = (snr.clamp(max=settings.min_snr_gamma) / snr * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress(step, loss=loss.item())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(out, weight_name="inverted.safetensors",
                                                unet_lora_layers={k: v.half() for k, v in  # fp16, as shipped LoRAs
                                                                  get_peft_model_state_dict(unet).items()},
                                                unet_lora_adapter_metadata=config.to_dict())
    lora_file = out / "inverted.safetensors"
    log = {"what": "style LoRA 'inverted' on weights/tiny-sdxl (dark garments on a light background)",
           "command": "python tools/train_tiny_lora.py" + "".join(f" {a}" for a in sys.argv[1:]),
           "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "images": args.images, "seed": args.seed, "losses": progress.history,
           "train_seconds": round(progress.seconds, 1), "torch": torch.__version__,
           "diffusers": __import__("diffusers").__version__, "peft": __import__("peft").__version__}
    log["check"] = check(lora_file)
    log["seconds"] = round(time.perf_counter() - started, 1)
    (out / "inverted.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {lora_file} ({lora_file.stat().st_size / 1024:.0f} KiB); corner brightness without / with the "
          f"LoRA: {log['check']['corner_brightness_without_lora']} / {log['check']['corner_brightness_with_lora']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
