"""The small per-step CUDA kernels of kernels/*.cu: their registry and their numpy twins.

Kernels (one source file each; all arithmetic in fp32, 16-bit values converted with round-half-even):

    guidance.cu        cfg_combine_{f32,f16,bf16}(out, noise_pred, guidance_scale, n)
    scale_cast.cu      scale_cast_{f32,f16,bf16}(out, x, scale, n, copies)
    scheduler_step.cu  scheduler_step_f32(x, prev, eps, noise, a, b, c, d, e, f, n)
    noise.cu           philox_uint32(out, seed, step, n), gaussian_noise_f32(out, seed, step, scale, n)
    image.cu           image_to_rgb8_f32(out, image, batch, height, width)

Each has a numpy twin here with the same operations in the same order (the kernels are compiled
with --fmad=false, so float32 products and sums round exactly as numpy's do), used by the tests and
usable as a CPU fallback. The scheduler kernel is one linear combination whose per-step
coefficients the host computes from the scheduler's sigma or alpha tables (StepCoefficients).

Compiling them (NVRTC, with an on-disk cache) is trt_sdxl.runtime.nvrtc's job; this module is the
registry (files, entry points, argument types) and the twins, and needs no CUDA.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
BLOCK_SIZE = 256
MAX_BLOCKS = 65535  # the kernels loop with a grid stride, so fewer blocks than elements is fine

# dtype suffix of an entry point -> numpy dtype of its 16/32-bit tensor argument
DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}


# --- registry ---------------------------------------------------------------------------------

PTR = ctypes.c_void_p  # a device address, passed as a Python int (0 for null)
F32, I32, I64, U32, U64 = ctypes.c_float, ctypes.c_int, ctypes.c_longlong, ctypes.c_uint, ctypes.c_ulonglong


@dataclass(frozen=True)
class EntryPoint:
    """One `extern "C" __global__` function: its name and parameters as (name, ctypes type)."""

    name: str
    params: tuple[tuple[str, type], ...]
    elements_per_thread: int = 1

    def launch_args(self, *values) -> tuple[tuple, tuple]:
        """`kernelParams` for cuda.bindings.driver.cuLaunchKernel: (values, ctypes types)."""
        if len(values) != len(self.params):
            names = ", ".join(name for name, _ in self.params)
            raise TypeError(f"{self.name} takes {len(self.params)} arguments ({names}), got {len(values)}")
        return tuple(int(v) if t is PTR else v for v, (_, t) in zip(values, self.params)), tuple(
            t for _, t in self.params
        )

    def grid(self, n: int) -> int:
        """Blocks of BLOCK_SIZE threads for `n` elements (at least 1, at most MAX_BLOCKS)."""
        threads = -(-n // self.elements_per_thread)
        return max(1, min(MAX_BLOCKS, -(-threads // BLOCK_SIZE)))


@dataclass(frozen=True)
class Kernel:
    """One source file under kernels/ and the entry points it defines."""

    name: str
    file: str
    entries: tuple[EntryPoint, ...]

    @property
    def path(self) -> Path:
        return KERNEL_DIR / self.file

    def entry(self, name: str) -> EntryPoint:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"{self.file} has no entry point {name!r}; it has {', '.join(e.name for e in self.entries)}")


KERNELS = {
    k.name: k
    for k in (
        Kernel("guidance", "guidance.cu", tuple(
            EntryPoint(f"cfg_combine_{s}", (("out", PTR), ("noise_pred", PTR), ("guidance_scale", F32), ("n", I64)))
            for s in DTYPES
        )),
        Kernel("scale_cast", "scale_cast.cu", tuple(
            EntryPoint(f"scale_cast_{s}", (("out", PTR), ("x", PTR), ("scale", F32), ("n", I64), ("copies", I32)))
            for s in DTYPES
        )),
        Kernel("scheduler_step", "scheduler_step.cu", (
            EntryPoint("scheduler_step_f32", (
                ("x", PTR), ("prev", PTR), ("eps", PTR), ("noise", PTR),
                ("a", F32), ("b", F32), ("c", F32), ("d", F32), ("e", F32), ("f", F32), ("n", I64),
            )),
        )),
        Kernel("noise", "noise.cu", (
            EntryPoint("philox_uint32", (("out", PTR), ("seed", U64), ("step", U32), ("n", I64)), 4),
            EntryPoint("gaussian_noise_f32", (("out", PTR), ("seed", U64), ("step", U32), ("scale", F32), ("n", I64)), 4),
        )),
        Kernel("image", "image.cu", (
            EntryPoint("image_to_rgb8_f32", (("out", PTR), ("image", PTR), ("batch", I32), ("height", I32), ("width", I32))),
        )),
    )
}


def dtype_suffix(dtype) -> str:
    """The entry-point suffix for an engine tensor's dtype: float32 -> "f32", float16 -> "f16", bfloat16 -> "bf16"."""
    dt = np.dtype(dtype)
    for suffix, d in DTYPES.items():
        if d == dt:
            return suffix
    raise ValueError(f"no kernel variant for dtype {dt}; expected one of {', '.join(map(str, DTYPES.values()))}")


# --- numpy twins: guidance, scaling, image ------------------------------------------------------

def cfg_combine(noise_pred: np.ndarray, guidance_scale: float) -> np.ndarray:
    """Twin of cfg_combine_*: [2B, ...] (unconditional half first) -> [B, ...] float32."""
    p = np.asarray(noise_pred).astype(np.float32)
    if p.shape[0] % 2:
        raise ValueError(f"noise_pred has {p.shape[0]} rows; classifier-free guidance needs an even batch")
    uncond, cond = p[: p.shape[0] // 2], p[p.shape[0] // 2:]
    return uncond + np.float32(guidance_scale) * (cond - uncond)


def scale_cast(x: np.ndarray, scale: float, dtype=np.float32, copies: int = 1) -> np.ndarray:
    """Twin of scale_cast_*: cast(x * scale) repeated `copies` times along axis 0."""
    with np.errstate(over="ignore"):  # beyond the 16-bit range is inf, as the kernel's conversion gives
        y = (np.asarray(x, dtype=np.float32) * np.float32(scale)).astype(dtype)
    return np.concatenate([y] * copies, axis=0)


def image_to_rgb8(image: np.ndarray) -> np.ndarray:
    """Twin of image_to_rgb8_f32: [B, 3, H, W] float32 in [-1, 1] -> [B, H, W, 3] uint8."""
    v = np.asarray(image, dtype=np.float32) * np.float32(0.5) + np.float32(0.5)
    v = np.fmin(np.fmax(v, np.float32(0)), np.float32(1))  # fmax/fmin: NaN -> 0, as fmaxf on the GPU
    return np.rint(v * np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)


# --- scheduler step: coefficients and twin ------------------------------------------------------

@dataclass(frozen=True)
class StepCoefficients:
    """Host-computed scalars of one scheduler_step_f32 launch:

        x_next   = a*x + b*eps + c*prev + d*noise
        denoised = e*x + f*eps          (stored into `prev` for the next step, where a method needs it)

    Each constructor below derives them from the formulas of the matching diffusers scheduler
    (epsilon prediction), in float64; the kernel receives them rounded to float32.
    """

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 0.0
    f: float = 0.0

    @classmethod
    def euler(cls, sigma: float, sigma_next: float) -> StepCoefficients:
        """EulerDiscreteScheduler (s_churn = 0): x0 = x - sigma*eps, derivative (x - x0)/sigma = eps,
        x_next = x + (sigma_next - sigma) * eps."""
        return cls(a=1.0, b=float(sigma_next) - float(sigma))

    @classmethod
    def euler_ancestral(cls, sigma: float, sigma_next: float) -> StepCoefficients:
        """EulerAncestralDiscreteScheduler:
        sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
        sigma_down = sqrt(sigma_next^2 - sigma_up^2),
        x_next = x + (sigma_down - sigma) * eps + sigma_up * noise."""
        s, sn = float(sigma), float(sigma_next)
        sigma_up = math.sqrt(sn * sn * (s * s - sn * sn) / (s * s))
        sigma_down = math.sqrt(sn * sn - sigma_up * sigma_up)
        return cls(a=1.0, b=sigma_down - s, d=sigma_up)

    @classmethod
    def dpmpp_2m(cls, sigma: float, sigma_next: float, sigma_prev: float | None = None) -> StepCoefficients:
        """DPMSolverMultistepScheduler, algorithm dpmsolver++, solver_order 2, midpoint solver.

        Sigmas are the scheduler's (Karras) sigmas; the sample lives in VP space, where
        alpha(s) = 1/sqrt(s^2 + 1), sigma_vp(s) = s*alpha(s), lambda = log(alpha/sigma_vp) = -log s.
        Denoised D0 = (x - sigma_vp*eps)/alpha = sqrt(s^2 + 1)*x - s*eps (the e, f pair), and with
        h = lambda_next - lambda, so exp(-h) = sigma_next/sigma, and phi = alpha_next*(exp(-h) - 1):
        - first order (sigma_prev None; diffusers' first step and final step):
              x_next = (sigma_vp_next/sigma_vp)*x - phi*D0
        - second order, with the previous denoised m1 in `prev`, r0 = h_0/h,
          h_0 = lambda - lambda_prev = log(sigma_prev/sigma):
              x_next = (sigma_vp_next/sigma_vp)*x - phi*D0 - 0.5*phi*(D0 - m1)/r0
        D0 substituted: a = A - k*e, b = -k*f, c = 0.5*phi/r0, with k = phi*(1 + 0.5/r0) (k = phi first order).
        """
        s, sn = float(sigma), float(sigma_next)
        alpha, alpha_next = 1.0 / math.sqrt(s * s + 1.0), 1.0 / math.sqrt(sn * sn + 1.0)
        e, f = math.sqrt(s * s + 1.0), -s
        ratio = (sn * alpha_next) / (s * alpha)  # sigma_vp_next / sigma_vp
        phi = alpha_next * (sn / s - 1.0)
        if sigma_prev is None:
            return cls(a=ratio - phi * e, b=-phi * f, e=e, f=f)
        if sn == 0.0:
            raise ValueError("DPM++ 2M: the step to sigma 0 is first order (diffusers' final step); pass sigma_prev=None")
        r0 = math.log(float(sigma_prev) / s) / math.log(s / sn)
        k = phi * (1.0 + 0.5 / r0)
        return cls(a=ratio - k * e, b=-k * f, c=0.5 * phi / r0, e=e, f=f)

    @classmethod
    def ddim(cls, alpha_prod: float, alpha_prod_prev: float) -> StepCoefficients:
        """DDIMScheduler, eta = 0: x0 = (x - sqrt(1 - at)*eps)/sqrt(at),
        x_next = sqrt(ap)*x0 + sqrt(1 - ap)*eps, so a = sqrt(ap/at), b = sqrt(1 - ap) - sqrt(ap (1 - at)/at)."""
        at, ap = float(alpha_prod), float(alpha_prod_prev)
        return cls(a=math.sqrt(ap / at), b=math.sqrt(1.0 - ap) - math.sqrt(ap * (1.0 - at) / at))


def euler_input_scale(sigma: float) -> float:
    """Euler / Euler ancestral `scale_model_input`: the UNet sees x / sqrt(sigma^2 + 1)."""
    return 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)


def scheduler_step(x, eps, coefficients: StepCoefficients, prev=None, noise=None) -> tuple[np.ndarray, np.ndarray]:
    """Twin of scheduler_step_f32: (x_next, denoised) in float32, term by term in the kernel's order."""
    k = {name: np.float32(getattr(coefficients, name)) for name in "abcdef"}
    x, eps = np.asarray(x, dtype=np.float32), np.asarray(eps, dtype=np.float32)
    x_next = k["a"] * x + k["b"] * eps
    if k["c"] != 0:
        if prev is None:
            raise ValueError("coefficient c is non-zero: the step needs the previous denoised estimate `prev`")
        x_next = x_next + k["c"] * np.asarray(prev, dtype=np.float32)
    if noise is not None:
        x_next = x_next + k["d"] * np.asarray(noise, dtype=np.float32)
    return x_next, k["e"] * x + k["f"] * eps


# --- noise: Philox4x32-10 and Box-Muller ---------------------------------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011, as Random123): counter [..., 4], key [..., 2] uint32 -> [..., 4] uint32."""
    ctr = np.asarray(counter, dtype=np.uint64)
    k = np.asarray(key, dtype=np.uint64)
    c0, c1, c2, c3 = (ctr[..., j] for j in range(4))
    k0, k1 = k[..., 0], k[..., 1]
    m0, m1, mask = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1]), np.uint64(MASK32)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & mask, (k1 + np.uint64(PHILOX_W[1])) & mask
        p0, p1 = m0 * c0, m1 * c2  # exact: both factors < 2^32
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def _philox_blocks(seed: int, step: int, n: int) -> np.ndarray:
    """[ceil(n/4), 4] uint32: block g has counter (g lo, g hi, step, 0) and key (seed lo, seed hi)."""
    if not 0 <= seed < 2**64 or not 0 <= step < 2**32:
        raise ValueError(f"seed {seed} must fit 64 bits and step {step} 32 bits, unsigned")
    g = np.arange(-(-n // 4), dtype=np.uint64)
    counter = np.stack([g & np.uint64(MASK32), g >> np.uint64(32), np.full_like(g, step), np.zeros_like(g)], axis=-1)
    return philox4x32_10(counter, np.array([seed & MASK32, seed >> 32], dtype=np.uint64))


def philox_uint32(seed: int, step: int, n: int) -> np.ndarray:
    """Twin of philox_uint32: element i is word i % 4 of the block for i // 4."""
    return _philox_blocks(seed, step, n).reshape(-1)[:n]


def gaussian_noise(seed: int, step: int, shape, scale: float = 1.0) -> np.ndarray:
    """Twin of gaussian_noise_f32, float32 of `shape`. Box-Muller is evaluated in float64 and rounded,
    so this is the correctly rounded value; the kernel's fp32 logf/sqrtf/sincospif stay within a few ulp."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    w = _philox_blocks(seed, step, n)
    u = ((w >> np.uint32(9)).astype(np.float64) * 2.0 + 1.0) * 2.0**-24  # exact, in (0, 1)
    radius = np.sqrt(-2.0 * np.log(u[:, 0::2]))  # [groups, 2]: pairs (w0, w1) and (w2, w3)
    theta = 2.0 * np.pi * u[:, 1::2]
    z = np.empty(w.shape, dtype=np.float32)
    z[:, 0::2] = (radius * np.cos(theta)).astype(np.float32)
    z[:, 1::2] = (radius * np.sin(theta)).astype(np.float32)
    return (np.float32(scale) * z.reshape(-1)[:n]).reshape(shape)
