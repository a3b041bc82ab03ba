"""Derive the "outlier twin" of an SDXL-style diffusers pipeline folder: the same function, with SDXL's activation outliers.

Trained SDXL feeds its transformer linears inputs in which a few channels are tens of times
larger than the rest; SmoothQuant exists for them. A small, briefly trained model has none, so
a quantization recipe tuned on it is never tested where it matters. The twin plants them
without changing what the UNet computes. For every norm whose output feeds linear layers

    norm1 (LayerNorm) -> attn1.to_q, attn1.to_k, attn1.to_v
    norm2 (LayerNorm) -> attn2.to_q           (attn2's k and v read the text states)
    norm3 (LayerNorm) -> ff.net.0.proj
    norm  (GroupNorm of a Transformer2DModel) -> proj_in

`channels` seeded random channels of the norm's weight and bias are multiplied by `factor`, and
the same input columns of every consuming layer's weight are divided by it: W (f n) / f = W n.
Done in fp32, the output moves by rounding only (~1e-6 relative). The files keep each tensor's
source dtype, so an fp16 source also takes fp16 rounding of the rescaled tensors (1e-5..1e-4
relative with factor 50 on the tiny models; a power-of-two factor such as 64 scales exactly and
leaves ~1e-6, from weights that become fp16 subnormals).

Every other component is copied unchanged; every weight set of unet/ (variants, shards) gets the
same channels. Weight files beside the components (a single-file checkpoint) and unet/ weights
other than safetensors are left out: they would hold the unchanged UNet. The new folder is built
next to `dst` and swapped in when complete.

    python tools/outlier_twin.py SRC DST [--factor 50] [--channels 4] [--seed 0] [--check]

--check runs diffusers' UNet of both folders on seeded random inputs and prints the relative L2
difference of the outputs (the fp32 rescale, and the twin as saved) and the outlier ratio
(per-channel abs-max of a consuming layer's input: max / median) of source and twin.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from folder_swap import swap_in  # noqa: E402

# The layers that read each norm's output, by the norm's name inside a BasicTransformerBlock.
BLOCK_CONSUMERS = {"norm1": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "norm2": ("attn2.to_q",),
                   "norm3": ("ff.net.0.proj",)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SHARD = re.compile(r"^(?P<set>.+?)(-\d{5}-of-\d{5})?\.safetensors$")


def outlier_norms(keys) -> dict[str, tuple[str, ...]]:
    """{norm name: names of the layers consuming its output} for every norm with a weight that feeds linears."""
    keys = set(keys)
    plan = {}
    for key in sorted(keys):
        if not key.endswith(".weight"):
            continue
        norm = key[: -len(".weight")]
        parent, _, leaf = norm.rpartition(".")
        if leaf in BLOCK_CONSUMERS and ".transformer_blocks." in norm:
            layers = tuple(f"{parent}.{c}" for c in BLOCK_CONSUMERS[leaf])
        elif leaf == "norm" and f"{parent}.proj_in.weight" in keys:
            layers = (f"{parent}.proj_in",)
        else:
            continue
        missing = [f"{layer}.weight" for layer in layers if f"{layer}.weight" not in keys]
        if missing:
            raise KeyError(f"{norm} feeds {', '.join(missing)}, which the checkpoint lacks")
        plan[norm] = layers
    return plan


def pick_channels(plan: dict[str, tuple[str, ...]], widths: dict[str, int], channels: int, seed: int) -> dict:
    """{norm name: int64 [channels] channel ids}, drawn in sorted name order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {norm: torch.randperm(widths[norm], generator=g)[:channels] for norm in sorted(plan)}


def rescale(tensors: dict[str, torch.Tensor], plan, picks, factor: float) -> None:
    """In place: picked norm channels (weight, bias) times `factor`, consumers' input columns divided by it.

    Computed in fp32 and stored back in each tensor's own dtype.
    """
    for norm, layers in plan.items():
        c = picks[norm]
        for name in (f"{norm}.weight", f"{norm}.bias"):
            if name in tensors:
                value = tensors[name].float()  # [C]
                value[c] *= factor
                tensors[name] = value.to(tensors[name].dtype)
        for layer in layers:
            weight = tensors[f"{layer}.weight"].float()  # [out, C] (linear) or [out, C, 1, 1] (1x1 conv proj_in)
            weight[:, c] /= factor
            tensors[f"{layer}.weight"] = weight.to(tensors[f"{layer}.weight"].dtype)


def weight_sets(unet_folder: Path) -> dict[str, list[Path]]:
    """The safetensors files of unet/ grouped into weight sets: one per variant, its shards together."""
    sets: dict[str, list[Path]] = {}
    for path in sorted(unet_folder.glob("*.safetensors")):
        sets.setdefault(SHARD.match(path.name)["set"], []).append(path)
    if not sets:
        raise FileNotFoundError(f"{unet_folder}: no .safetensors weights (other formats are not supported)")
    return sets


def twin_unet_files(src_unet: Path, dst_unet: Path, factor: float, channels: int, seed: int) -> None:
    """Write every weight set of `src_unet` rescaled into `dst_unet` (same file names, metadata, dtypes)."""
    for files in weight_sets(src_unet).values():
        tensors, origin, metadata = {}, {}, {}
        for path in files:
            with safe_open(path, framework="pt") as f:
                metadata[path] = f.metadata()
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    origin[key] = path
        plan = outlier_norms(tensors)
        picks = pick_channels(plan, {n: tensors[f"{n}.weight"].shape[0] for n in plan}, channels, seed)
        rescale(tensors, plan, picks, factor)
        for path in files:
            save_file({k: v.contiguous() for k, v in tensors.items() if origin[k] == path}, str(dst_unet / path.name),
                      metadata=metadata[path])


def make_outlier_twin(src_folder, dst_folder, factor: float = 50.0, channels: int = 4, seed: int = 0) -> Path:
    """Write the outlier twin of the pipeline folder `src_folder` to `dst_folder` (replaced if present)."""
    src, dst = Path(src_folder), Path(dst_folder).resolve()
    if not (src / "unet").is_dir():
        raise FileNotFoundError(f"{src}: no unet/ folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        for item in src.iterdir():
            if item.is_dir() and item.name != "unet":
                shutil.copytree(item, staging / item.name)
            elif item.is_file() and item.suffix not in WEIGHT_SUFFIXES:  # a single-file checkpoint holds the old UNet
                shutil.copy2(item, staging)
        (staging / "unet").mkdir()
        for item in (src / "unet").iterdir():
            if item.is_file() and item.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(item, staging / "unet")
        twin_unet_files(src / "unet", staging / "unet", factor, channels, seed)
        swap_in(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


# ---------------------------------------------------------------- --check


def random_inputs(config: dict, seed: int, latent_side: int) -> dict:
    """Seeded UNet inputs for a batch of 2: latents, timesteps, text states and (SDXL) added conditioning."""
    g = torch.Generator().manual_seed(seed)
    side = min(config["sample_size"], latent_side)
    inputs = {
        "sample": torch.randn(2, config["in_channels"], side, side, generator=g),  # [2, 4, H, W]
        "timestep": torch.tensor([250, 750]),
        "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=g),  # [2, 77, D]
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        image = float(side * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),  # [2, pooled width]
            "time_ids": torch.tensor([[image, image, 0.0, 0.0, image, image]] * 2),  # [2, 6]
        }
    return inputs


@torch.no_grad()
def run_unet(unet, inputs: dict, plan) -> tuple[torch.Tensor, dict[str, float]]:
    """(output [2, 4, H, W], {norm: max / median over channels of the abs-max of its first consumer's input})."""
    modules = dict(unet.named_modules())
    ratios, hooks = {}, []
    for norm, layers in plan.items():
        def record(module, args, norm=norm):
            x = args[0]  # [B, T, C] into a linear, [B, C, H, W] into a conv proj_in
            channel_axis = 1 if isinstance(module, torch.nn.Conv2d) else x.ndim - 1
            amax = x.abs().amax(dim=[d for d in range(x.ndim) if d != channel_axis])  # [C]
            ratios[norm] = (amax.max() / amax.median()).item()
        hooks.append(modules[layers[0]].register_forward_pre_hook(record))
    try:
        out = unet(**inputs).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out, ratios


def stored_dtypes(unet_folder: Path) -> list[str]:
    """The dtypes the safetensors files of `unet_folder` store ("F16", "F32", ...)."""
    dtypes = set()
    for path in unet_folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            dtypes.update(f.get_slice(k).get_dtype() for k in f.keys())
    return sorted(dtypes)


def check(src_folder, dst_folder, factor: float, channels: int, seed: int, latent_side: int = 32) -> dict:
    """Relative L2 differences and outlier ratios of source, fp32 twin and saved twin; printed and returned."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    from diffusers import UNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()  # its advice to install accelerate is noise here

    src, dst = Path(src_folder), Path(dst_folder)
    config = json.loads((src / "unet" / "config.json").read_text())
    inputs = random_inputs(config, seed, latent_side)
    unet = UNet2DConditionModel.from_pretrained(src / "unet", dtype=torch.float32).eval()
    state = unet.state_dict()  # fp32 tensors sharing the parameters' storage
    plan = outlier_norms(state)
    reference, source_ratios = run_unet(unet, inputs, plan)
    rescale(state, plan, pick_channels(plan, {n: state[f"{n}.weight"].shape[0] for n in plan}, channels, seed), factor)
    fp32_twin, _ = run_unet(unet, inputs, plan)  # rescale worked in place: `unet` is now the fp32 twin
    del unet, state
    saved = UNet2DConditionModel.from_pretrained(dst / "unet", dtype=torch.float32).eval()
    saved_twin, twin_ratios = run_unet(saved, inputs, plan)

    def rel(a):
        return ((a - reference).norm() / reference.norm()).item()

    def summary(ratios):
        values = torch.tensor(list(ratios.values()))
        return {"max": round(values.max().item(), 2), "median": round(values.median().item(), 2)}

    report = {"norms": len(plan), "relative_l2_fp32_twin": rel(fp32_twin), "relative_l2_saved_twin": rel(saved_twin),
              "stored_dtypes": stored_dtypes(dst / "unet"), "outlier_ratio_source": summary(source_ratios),
              "outlier_ratio_twin": summary(twin_ratios), "latent_side": inputs["sample"].shape[-1]}
    print(f"{len(plan)} norms rescaled by {factor:g} on {channels} channels (seed {seed}); "
          f"UNet output on random inputs ({report['latent_side']}x{report['latent_side']} latents):")
    print(f"  relative L2 difference: fp32 rescale {report['relative_l2_fp32_twin']:.2e}, "
          f"twin as saved ({', '.join(report['stored_dtypes'])}) {report['relative_l2_saved_twin']:.2e}")
    print(f"  outlier ratio (max/median channel abs-max of a consumer's input), max over norms / median over norms: "
          f"source {report['outlier_ratio_source']['max']:.1f} / {report['outlier_ratio_source']['median']:.1f}, "
          f"twin {report['outlier_ratio_twin']['max']:.1f} / {report['outlier_ratio_twin']['median']:.1f}")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", type=Path, help="an SDXL-style diffusers pipeline folder (read only)")
    p.add_argument("dst", type=Path, help="the twin's folder (replaced if present)")
    p.add_argument("--factor", type=float, default=50.0, help="channel scale (default 50)")
    p.add_argument("--channels", type=int, default=4, help="outlier channels per norm (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the channel choice (default 0)")
    p.add_argument("--check", action="store_true", help="compare both UNets on random inputs (needs diffusers)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dst = make_outlier_twin(args.src, args.dst, args.factor, args.channels, args.seed)
    print(f"wrote {dst}")
    if args.check:
        check(args.src, dst, args.factor, args.channels, args.seed)


if __name__ == "__main__":
    main()
