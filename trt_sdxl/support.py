"""The recipe matrix: backend x GPU architecture x `--precision` -> what is built, or why not.

One table (`MATRIX`), read by the build (`resolve`) and rendered into the README
(`markdown_table`; tests/test_support.py keeps the two equal). What decides it:

- TensorRT for RTX runs on SM75, SM86, SM89 and SM120 only, and of 8-bit arithmetic it has FP8
  GEMMs (SM89+) and weight-only INT8 GEMMs; no INT8 activations, no FP8 convolutions (its
  support matrix and "Working with Quantized Types"). So there `--precision fp8` builds the
  GEMM-only recipe `fp8_gemm` (the linear layers of NVIDIA's level-4 set; convolutions and
  attention stay FP16), and W8A8 INT8 is refused.
- NVIDIA TensorRT 10.x / 11.x run every recipe on SM75 and newer; FP8 needs FP8 tensor cores
  (SM89: Ada; SM90: Hopper; SM100/SM120: Blackwell). Our networks are strongly typed, so
  TensorRT 11's removal of the builder precision flags changes nothing here.
- `--precision auto`: the fastest valid recipe for the target, from NVIDIA's measurements of its
  own SDXL recipes (ModelOpt's diffusers benchmark, TensorRT 9.3: RTX 4090 INT8 1.20x / FP8 1.14x;
  RTX 6000 Ada 1.43x / 1.45x; L40S 1.25x / 1.35x; H100 1.08x / 1.07x) and our roofline
  (`tools/roofline.py`, BENCHMARKS.md): INT8 on GeForce cards (Ada, Blackwell), whose FP8 with
  FP32 accumulation runs at their FP16-with-FP16-accumulation rate, not twice it; FP8 on the
  pro and data-centre parts (L40S, RTX 6000 Ada, RTX PRO, Hopper, B200), where it does. Only
  with the GPU present is its name known; ahead of time for SM89/SM120 `auto` takes INT8.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .quant.recipe import RECIPES

TRT_INSTALL = "install NVIDIA TensorRT (pip install -e .[trt])"
ARCHS = {  # compute capability -> architecture, example GPUs
    "SM75": "Turing (RTX 2080 Ti, T4)",
    "SM80": "Ampere (A100)",
    "SM86": "Ampere (RTX 3090, A6000)",
    "SM89": "Ada (RTX 4090, L40S, RTX 6000 Ada)",
    "SM90": "Hopper (H100, H200)",
    "SM100": "Blackwell (B200)",
    "SM120": "Blackwell (RTX 5090, RTX PRO 6000)",
    "SM121": "Blackwell (GB10)",
}
BACKENDS = ("tensorrt 10.x", "tensorrt 11.x", "tensorrt_rtx")
PRECISIONS = ("fp16", "int8", "fp8", "nvidia_modelopt", "nvidia_modelopt_fp8")
# the other recipes (for comparisons) follow their format's column: int8_level3 int8's, fp8_gemm fp8's
OTHER_RECIPES = tuple(r for r in RECIPES if r not in PRECISIONS)
RTX_ARCHS = ("SM75", "SM86", "SM89", "SM120", "SM121")  # its support matrix (1.5 added SM121)
FP8_ARCHS = ("SM89", "SM90", "SM100", "SM120", "SM121")
# Pro / data-centre parts of the GeForce architectures (SM89, SM120): their FP8 with FP32
# accumulation runs at twice their FP16 rate; a GeForce card's does not
FP8_FULL_RATE = ("L40", "L4", "RTX 6000 Ada", "RTX 5000 Ada", "RTX 4500 Ada", "RTX 4000 Ada", "RTX PRO")


@dataclass(frozen=True)
class Cell:
    """What `--precision` builds for (backend, arch): a recipe (None for the FP16 UNet) or a refusal."""

    recipe: str | None
    refusal: str | None = None
    note: str = ""


def _cell(backend: str, arch: str, precision: str) -> Cell:
    rtx = backend == "tensorrt_rtx"
    if rtx and arch not in RTX_ARCHS:
        return Cell(None, f"TensorRT for RTX does not run on {arch} ({ARCHS[arch]}); {TRT_INSTALL}")
    fp8_ok = arch in FP8_ARCHS
    if precision == "fp16":
        return Cell("fp16")
    if precision in ("int8", "nvidia_modelopt"):
        if rtx:
            alternative = "use --precision fp8 (GEMMs only)" if fp8_ok else "use --precision fp16"
            return Cell(None, f"INT8 activations are not supported by TensorRT for RTX (its INT8 is weight-only "
                              f"GEMMs); {alternative} or {TRT_INSTALL}")
        return Cell(precision, note="W8A8: convolutions, feed-forward, attention q/k/v")
    if not fp8_ok:
        alternative = "--precision fp16" if rtx else "--precision int8"
        return Cell(None, f"{arch} ({ARCHS[arch]}) has no FP8 tensor cores (they need SM89 or newer); use "
                          f"{alternative}")
    if rtx:
        if precision == "nvidia_modelopt_fp8":
            return Cell(None, "NVIDIA's FP8 recipe quantizes convolutions and attention, which TensorRT for RTX "
                              "runs in FP8 only for GEMMs; use --precision fp8 (GEMMs only)")
        return Cell("fp8_gemm", note="FP8 GEMMs only: convolutions and attention stay FP16")
    return Cell(precision, note="FP8 convolutions, GEMMs and fused attention")


def _auto(backend: str, arch: str, gpu_name: str | None) -> str:
    """The precision `auto` picks (a valid one: `_cell` accepts it). Roofline (fused, 1024x1024):
    RTX 4090 int8 2.09x / fp8 1.79x, RTX 5090 2.18x / 1.83x; RTX 6000 Ada 1.44x / 1.63x, L40S
    1.42x / 1.61x, H100 1.49x / 1.58x, H200 1.53x / 1.63x. Against an FP16 baseline that
    accumulates in FP16 — which NVIDIA's measured 4090 FP16 step (82 ms, under the 96 ms an
    FP32-accumulating UNet call needs) implies — the 4090 models INT8 1.21x / FP8 1.04x (measured
    1.20x / 1.14x): a GeForce card's FP8 runs at its FP16-accumulate rate, so TensorRT for RTX's
    GEMM-only FP8 (fp8_gemm, 1.41x over an FP32-accumulate FP16) buys little there; `auto` takes it
    on the pro parts only."""
    full_rate = bool(gpu_name) and any(n in gpu_name for n in FP8_FULL_RATE)
    if backend == "tensorrt_rtx":
        return "fp8" if arch in FP8_ARCHS and full_rate else "fp16"
    if arch in ("SM90", "SM100"):
        return "fp8"
    if arch in ("SM89", "SM120") and full_rate:
        return "fp8"
    return "int8"


MATRIX = {(b, a, p): _cell(b, a, p) for b in BACKENDS for a in ARCHS for p in PRECISIONS}


def backend_row(name: str, version: str) -> str:
    """The matrix row of an installed backend ('tensorrt', '10.13.0.35') -> 'tensorrt 10.x'."""
    if name == "tensorrt_rtx":
        return "tensorrt_rtx"
    major = int(version.split(".")[0])
    return "tensorrt 11.x" if major >= 11 else "tensorrt 10.x"


@dataclass(frozen=True)
class Resolution:
    precision: str  # what the user asked for, `auto` resolved
    recipe: str  # what is built: 'fp16' or a quantization recipe
    note: str


def resolve(precision: str, backend_name: str, backend_version: str, target: str, gpu_name: str | None = None,
            engines: bool = True) -> Resolution:
    """What `--precision` builds for this backend and target ('SM89'; 'native' needs `gpu_name`'s arch
    resolved by the caller), or a UserError naming the alternative. Without engines (`--no-engines`)
    every recipe is defined and calibrated as asked, whatever the backend could run."""
    if precision != "auto" and precision not in PRECISIONS + OTHER_RECIPES:
        raise UserError(f"--precision {precision}: expected auto or one of {', '.join(PRECISIONS + OTHER_RECIPES)}")
    row = backend_row(backend_name, backend_version)
    if precision in OTHER_RECIPES and target in ARCHS and engines:
        fmt = RECIPES[precision]["format"]
        cell = MATRIX[(row, target, fmt)]
        if cell.refusal or cell.recipe not in (fmt, precision):  # TensorRT for RTX: of FP8, fp8_gemm only
            why = cell.refusal or f"{backend_name} builds FP8 GEMMs only: use --precision {cell.recipe}"
            raise UserError(f"--precision {precision} on {target} with {backend_name} {backend_version}: {why}")
        return Resolution(precision, precision, "")
    if target not in ARCHS:
        if precision == "auto":
            return Resolution("int8", "int8", f"{target}: not in the recipe matrix; auto takes INT8")
        return Resolution(precision, precision, f"{target}: not in the recipe matrix")
    asked = _auto(row, target, gpu_name) if precision == "auto" else precision
    if not engines:
        return Resolution(asked, asked, "no engines built: the networks are defined and calibrated as asked")
    cell = MATRIX[(row, target, asked)]
    if cell.refusal:
        raise UserError(f"--precision {asked} on {target} with {backend_name} {backend_version}: {cell.refusal}"
                        + ("; --no-engines still defines, calibrates and writes the folder" if asked != "fp16"
                           else ""))
    return Resolution(asked, cell.recipe, cell.note)


def markdown_table() -> str:
    """The matrix as the README shows it: one row per (backend, arch), one column per precision;
    TensorRT 10.x and 11.x share a row where they agree."""
    head = "| backend | GPU | " + " | ".join(f"`{p}`" for p in PRECISIONS) + " | `auto` |"
    lines = [head, "|" + "---|" * (len(PRECISIONS) + 3)]

    def cells(b: str, a: str) -> list[str]:
        out = []
        for p in PRECISIONS:
            cell = MATRIX[(b, a, p)]
            if cell.refusal and "does not run" in cell.refusal:
                out.append("—")
            elif cell.refusal:
                out.append("refused")
            else:
                out.append(f"`{cell.recipe}`" if cell.recipe != p else "yes")
        if MATRIX[(b, a, "fp16")].refusal:
            out.append("—")
        else:
            auto = _auto(b, a, None)
            built = MATRIX[(b, a, auto)].recipe
            text = f"`{auto}`" + (f" → `{built}`" if built != auto else "")
            if a in ("SM89", "SM120", "SM121") and a in FP8_ARCHS:
                pro = " (`fp8` on L40S / RTX 6000 Ada)" if a == "SM89" else " (`fp8` on RTX PRO)"
                if b == "tensorrt_rtx":
                    pro = pro.replace("`fp8`", "`fp8` → `fp8_gemm`")
                text += pro if a != "SM121" else ""
            out.append(text)
        return out

    rows = {b: {a: cells(b, a) for a in ARCHS} for b in BACKENDS}
    shared = all(rows["tensorrt 10.x"][a] == rows["tensorrt 11.x"][a] for a in ARCHS)
    shown = (("tensorrt 10.x, 11.x", "tensorrt 10.x"), ("tensorrt_rtx", "tensorrt_rtx")) if shared else \
        tuple((b, b) for b in BACKENDS)
    for label, b in shown:
        for a in ARCHS:
            lines.append(f"| {label} | {a} {ARCHS[a]} | " + " | ".join(rows[b][a]) + " |")
    return "\n".join(lines)
