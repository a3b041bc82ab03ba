"""The picture in the README: what the embedded default draws, through our own pipeline.

One row per Fashion-MNIST class ("a photo of a sneaker", ...), `--seeds` images each, made by
trt_sdxl.Generator on the CPU with the defaults of `python -m trt_sdxl.generate` (30 Euler steps,
CFG 5), from an engines folder (`--engines`, the networks its engines were built from) or the
checkpoint's FP16 networks. Writes docs/default_samples.png (uses Pillow for the row labels).

    python tools/default_samples.py [--engines DIR] [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402

from trt_sdxl import Generator  # noqa: E402
from trt_sdxl.components import DEFAULT_MODEL  # noqa: E402

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def main(argv=None) -> int:
    from PIL import Image, ImageDraw

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=None, help="an engines folder (default: the checkpoint's FP16 networks)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--scale", type=int, default=2, help="enlargement of each image (default 2)")
    p.add_argument("--out", default=str(REPO / "docs" / "default_samples.png"))
    args = p.parse_args(argv)
    g = Generator.load(args.engines, device="cpu") if args.engines else Generator.from_model(DEFAULT_MODEL)
    side, margin = g.width * args.scale, 110
    grid = Image.new("RGB", (margin + args.seeds * side, len(CLASSES) * side), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(CLASSES):
        article = "an" if name[0] in "aeiou" else "a"
        prompt = f"a photo of {article} {name}"
        draw.text((4, row * side + side // 2 - 6), prompt.removeprefix("a photo of "), fill="black")
        for col, image in enumerate(g.generate(prompt, seed=row * 100, batch=args.seeds)):
            tile = Image.fromarray(np.ascontiguousarray(image.rgb)).resize((side, side), Image.NEAREST)
            grid.paste(tile, (margin + col * side, row * side))
        print(f"{prompt}: seeds {row * 100}..{row * 100 + args.seeds - 1}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
