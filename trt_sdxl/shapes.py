"""Shape profiles: which image sizes, batch sizes and prompt lengths one set of engines serves.

An `ImageProfile` is what the user asks for, in the terms of a request: images per prompt, image
height and width in pixels, and prompt length in 77-token chunks (75 tokens each between BOS and
EOS), each a `Range` (lo, opt, hi). The build turns each into one TensorRT optimization profile
per engine (the models say which input axis each range drives: trt_sdxl.models.*.input_profile);
the manifest records both, and `generate` and the API check a request against them before any
work. A profile whose ranges are all one value is a static engine, as every engine was before
profiles existed.

`--resolutions` takes a range of sides (`768-1344`: every height and width from 768 to 1344 that is
a multiple of the UNet's 32 px), a list of sizes, width first as A1111 writes them
(`1024x1024,832x1216`), or `sdxl-buckets` (SDXL's training aspect buckets near one megapixel).
A profile's height and width ranges are independent (TensorRT's profiles are boxes), so a list of
sizes serves every size inside its bounding box; the opt point, whose shapes TensorRT tunes its
kernels for, is the first size listed (a range's: the model's default side where it lies inside,
else the middle).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# SDXL's aspect-ratio buckets around 1024^2 px, (width, height), as SDXL's report (Podell et al. 2023,
# appendix) lists them and A1111/ComfyUI users pick them; the square first: the opt point.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))
BUCKETS_NAME = "sdxl-buckets"
CHUNK_TOKENS = 75  # prompt tokens per 77-position chunk (BOS and EOS around them)


@dataclass(frozen=True)
class Range:
    """lo <= opt <= hi."""

    lo: int
    opt: int
    hi: int

    def __post_init__(self):
        if not 1 <= self.lo <= self.opt <= self.hi:
            raise ValueError(f"range {self.lo}/{self.opt}/{self.hi}: expected 1 <= lo <= opt <= hi")

    @classmethod
    def one(cls, value: int) -> Range:
        return cls(value, value, value)

    def __contains__(self, value: int) -> bool:
        return self.lo <= value <= self.hi

    def scaled(self, factor: int) -> Range:
        return Range(self.lo * factor, self.opt * factor, self.hi * factor)

    def divided(self, factor: int) -> Range:
        return Range(self.lo // factor, self.opt // factor, self.hi // factor)

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi

    def text(self) -> str:
        return str(self.lo) if self.fixed else f"{self.lo}-{self.hi}"

    def to_json(self) -> list[int]:
        return [self.lo, self.opt, self.hi]

    @classmethod
    def from_json(cls, value) -> Range:
        lo, opt, hi = (int(v) for v in value)
        return cls(lo, opt, hi)


@dataclass(frozen=True)
class ImageProfile:
    """One optimization profile in request terms: `batch` images per prompt, `height`/`width` in
    pixels, `chunks` of 75 prompt tokens; `resolutions` is what --resolutions said, `sizes` the
    listed (width, height) sizes (None for a range of sides)."""

    batch: Range
    height: Range
    width: Range
    chunks: Range
    resolutions: str
    sizes: tuple[tuple[int, int], ...] | None = None

    @property
    def static(self) -> bool:
        return all(r.fixed for r in (self.batch, self.height, self.width, self.chunks))

    def allows(self, batch: int, height: int, width: int, chunks: int = 1) -> bool:
        return (slice_batch(self.batch, batch) is not None and height in self.height and width in self.width
                and chunks in self.chunks)

    def describe(self) -> str:
        """'batch 1-4, 640-1536 x 640-1536 px (width x height; sdxl-buckets), prompts up to 225 tokens'."""
        size = f"{self.width.text()} x {self.height.text()} px (width x height"
        size += f"; {self.resolutions})" if self.resolutions and self.resolutions != f"{self.width.lo}x{self.height.lo}" \
            else ")"
        batch = self.batch.text() + (" (or a multiple)" if self.batch.fixed else " (or a multiple of one)")
        return (f"batch {batch}, {size}, prompts up to {self.chunks.hi * CHUNK_TOKENS} tokens"
                + (f" ({self.chunks.hi} chunks of {CHUNK_TOKENS})" if self.chunks.hi > 1 else ""))

    def to_json(self) -> dict:
        out = {"batch": self.batch.to_json(), "height": self.height.to_json(), "width": self.width.to_json(),
               "prompt_chunks": self.chunks.to_json(), "resolutions": self.resolutions}
        if self.sizes is not None:
            out["sizes"] = [f"{w}x{h}" for w, h in self.sizes]
        return out

    @classmethod
    def from_json(cls, value: dict) -> ImageProfile:
        sizes = value.get("sizes")
        return cls(Range.from_json(value["batch"]), Range.from_json(value["height"]), Range.from_json(value["width"]),
                   Range.from_json(value.get("prompt_chunks", [1, 1, 1])), str(value.get("resolutions", "")),
                   None if sizes is None else tuple(_size(s, "--resolutions") for s in sizes))


def slice_batch(batch: Range, images: int) -> int | None:
    """Images per engine call for a request of `images`: all of them where the range holds them, else the
    largest size in the range that divides them (the runtimes run equal slices), else None."""
    if images in batch:
        return images
    return next((b for b in range(min(batch.hi, images), batch.lo - 1, -1) if images % b == 0), None)


def _size(text: str, flag: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{flag} {text}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024")
    return int(parts[0]), int(parts[1])


def parse_resolutions(spec: str, multiple: int, default_side: int) -> tuple[Range, Range, tuple | None]:
    """(height range, width range, listed (width, height) sizes or None) of a --resolutions value; every
    side a positive multiple of `multiple` (the UNet's: 32 px for SDXL)."""
    flag = "--resolutions"
    text = spec.strip().lower()
    if not text:
        raise UserError(f"{flag}: empty; expected a range like 768-1344, sizes like 1024x1024,832x1216, "
                        f"or {BUCKETS_NAME}")
    if text == BUCKETS_NAME:
        sizes = SDXL_BUCKETS
    elif "x" in text:
        sizes = tuple(_size(part.strip(), flag) for part in text.split(","))
    else:
        bounds = text.split("-")
        if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
            raise UserError(f"{flag} {spec}: expected a range of sides like 768-1344, sizes like "
                            f"1024x1024,832x1216, or {BUCKETS_NAME}")
        lo, hi = (int(b) for b in bounds)
        for side in (lo, hi):
            _check_side(side, multiple, f"{flag} {spec}")
        if lo > hi:
            raise UserError(f"{flag} {spec}: the range goes down; expected LOW-HIGH")
        opt = default_side if lo <= default_side <= hi else (lo + hi) // 2 // multiple * multiple
        return Range(lo, max(opt, lo), hi), Range(lo, max(opt, lo), hi), None
    for w, h in sizes:
        _check_side(w, multiple, f"{flag} {spec}: width {w}")
        _check_side(h, multiple, f"{flag} {spec}: height {h}")
    heights, widths = [h for _, h in sizes], [w for w, _ in sizes]
    return (Range(min(heights), sizes[0][1], max(heights)), Range(min(widths), sizes[0][0], max(widths)), sizes)


def _check_side(side: int, multiple: int, what: str) -> None:
    if side <= 0 or side % multiple:
        raise UserError(f"{what}: expected a positive multiple of {multiple} (8 for the VAE times the UNet's "
                        f"{multiple // 8}x downsampling)")


def parse_range(spec, flag: str) -> Range:
    """`4` or `1-4` (opt: the low end, the common case) as a Range of positive integers."""
    text = str(spec).strip()
    parts = text.split("-")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{flag} {spec}: expected a positive integer or a range like 1-4")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1 or hi < lo:
        raise UserError(f"{flag} {spec}: expected a positive integer or a rising range like 1-4")
    return Range(lo, lo, hi)


def parse_chunks(spec) -> Range:
    """--prompt-chunks N: prompts of 1 to N chunks of 75 tokens (every prompt is at least one)."""
    text = str(spec).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--prompt-chunks {spec}: expected a positive integer (prompts up to N x {CHUNK_TOKENS} "
                        "tokens)")
    return Range(1, 1, int(text))


def image_profiles(resolutions, batch, chunks, multiple: int, default_side: int, height: int | None = None,
                   width: int | None = None) -> list[ImageProfile]:
    """The profiles of a build: one per --resolutions value (none given: the one size `height` x `width`,
    default the model's side), each with the --batch and --prompt-chunks ranges."""
    batch_range, chunk_range = parse_range(batch, "--batch"), parse_chunks(chunks)
    if not resolutions:
        h, w = default_side if height is None else height, default_side if width is None else width
        for flag, side in (("--height", h), ("--width", w)):
            _check_side(side, multiple, f"{flag} {side}")
        return [ImageProfile(batch_range, Range.one(h), Range.one(w), chunk_range, f"{w}x{h}", ((w, h),))]
    if height is not None or width is not None:
        raise UserError("--height/--width and --resolutions: give one or the other (the opt size of a "
                        "--resolutions list is its first size)")
    found = []
    for spec in resolutions:
        h, w, sizes = parse_resolutions(spec, multiple, default_side)
        found.append(ImageProfile(batch_range, h, w, chunk_range, spec.strip().lower(), sizes))
    return found


def choose(profiles: list[ImageProfile], batch: int, height: int, width: int, chunks: int = 1,
           multiple: int = 8, where: str = "these engines") -> int:
    """Index of the profile that serves a request (the first whose ranges hold it; for several,
    the one whose opt size is nearest); a UserError naming every allowed range otherwise."""
    if height % multiple or width % multiple:
        raise UserError(f"--width {width} --height {height}: expected multiples of {multiple} px")
    fits = [i for i, p in enumerate(profiles) if p.allows(batch, height, width, chunks)]
    if fits:
        return min(fits, key=lambda i: abs(profiles[i].height.opt - height) + abs(profiles[i].width.opt - width))
    asked = f"batch {batch}, {width}x{height} px, {chunks * CHUNK_TOKENS} prompt tokens ({chunks} chunk" \
            + ("s)" if chunks > 1 else ")")
    allowed = "; or ".join(p.describe() for p in profiles)
    raise UserError(f"{asked} is outside the profiles of {where} ({allowed}); build engines for it with "
                    "--resolutions/--batch/--prompt-chunks")


def box(*axes) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of an input whose axes are each a Range or a fixed int."""
    return tuple(tuple(a if isinstance(a, int) else getattr(a, k) for a in axes) for k in ("lo", "opt", "hi"))


def text_rows(profile: ImageProfile) -> Range:
    """Rows a text encoder call takes: images per prompt x 77-token chunks."""
    b, c = profile.batch, profile.chunks
    return Range(b.lo * c.lo, b.opt * c.opt, b.hi * c.hi)
