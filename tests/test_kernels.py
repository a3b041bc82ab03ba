"""The per-step CUDA kernels (kernels/*.cu): NVRTC compilation and cache, numpy twins against
independent references, and (marker `gpu`) the kernels themselves against their twins.

References: Random123's published Philox4x32-10 known-answer vectors, a scalar Philox written here
from the paper, the normal distribution's moments and CDF, diffusers' schedulers and image
post-processing (PyTorch, CPU), and float64 formulas. Figures compared: relative L2 error
‖out − ref‖ / ‖ref‖, or bit equality where the twin is specified to be exact.

PyTorch and diffusers are imported only by the tests comparing with them (skipped where they are
not installed), so the GPU tests run on a machine that has neither.
"""

import math
import re
import sys

import ml_dtypes
import numpy as np
from oracle import rel_l2
import pytest

from trt_sdxl import configs
from trt_sdxl import kernels as K
from trt_sdxl.runtime import nvrtc as N
from trt_sdxl.errors import UserError

CI_ARCHS = (80, 89, 90, 120)


def assert_close(name, out, expected, tol):
    assert out.shape == expected.shape, f"{name}: shape {out.shape}, expected {expected.shape}"
    err = rel_l2(out, expected)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > tolerance {tol:.0e}"


def assert_same_bits(name, out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype, (
        f"{name}: {out.shape} {out.dtype}, expected {expected.shape} {expected.dtype}")
    a = np.ascontiguousarray(out).view(f"u{out.dtype.itemsize}").ravel()
    b = np.ascontiguousarray(expected).view(f"u{expected.dtype.itemsize}").ravel()
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, (f"{name}: {bad.size} of {a.size} values differ, first at flat index {bad[0]}: "
                           f"{out.ravel()[bad[0]]!r} vs {expected.ravel()[bad[0]]!r}")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(N.CACHE_ENV, str(tmp_path / "kernels"))
    return tmp_path / "kernels"


# --- registry ---------------------------------------------------------------------------------

C_TYPES = {"float": K.F32, "int": K.I32, "long long": K.I64, "unsigned": K.U32, "unsigned long long": K.U64}


def parse_entry_points(source: str) -> dict[str, tuple]:
    """extern "C" __global__ signatures of a source: name -> ((param name, ctypes type), ...)."""
    entries = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source):
        parsed = []
        for p in params.split(","):
            m = re.fullmatch(r"\s*(?:const\s+)?([\w ]+?)\s*(\*?)\s*(\w+)\s*", p)
            assert m, f"{name}: cannot parse parameter {p!r}"
            parsed.append((m.group(3), K.PTR if m.group(2) else C_TYPES[m.group(1)]))
        entries[name] = tuple(parsed)
    return entries


def test_registry_matches_the_sources():
    sources = {p.name for p in K.KERNEL_DIR.glob("*.cu")}
    assert sources == {k.file for k in K.KERNELS.values()}, "every kernels/*.cu is registered, and only those"
    for kernel in K.KERNELS.values():
        declared = parse_entry_points(kernel.path.read_text())
        registered = {e.name: e.params for e in kernel.entries}
        assert declared == registered, f"{kernel.file}: source declares {declared}, registry says {registered}"


def test_launch_helpers():
    entry = K.KERNELS["noise"].entry("gaussian_noise_f32")
    values, types = entry.launch_args(0x1234, 7, 3, 0.5, 10)
    assert values == (0x1234, 7, 3, 0.5, 10) and types == (K.PTR, K.U64, K.U32, K.F32, K.I64)
    assert entry.grid(4 * K.BLOCK_SIZE) == 1 and entry.grid(4 * K.BLOCK_SIZE + 1) == 2 and entry.grid(0) == 1
    assert K.KERNELS["image"].entries[0].grid(10**12) == K.MAX_BLOCKS
    with pytest.raises(TypeError, match="takes 5 arguments"):
        entry.launch_args(1, 2)
    assert [K.dtype_suffix(d) for d in (np.float32, np.float16, ml_dtypes.bfloat16)] == ["f32", "f16", "bf16"]


# --- NVRTC compilation and cache (no GPU needed) --------------------------------------------------

@pytest.mark.parametrize("arch", CI_ARCHS)
def test_every_kernel_compiles_and_is_cached(arch, kernel_cache):
    if arch not in N.supported_archs():
        pytest.skip(f"NVRTC {N.nvrtc_version()} does not compile for sm_{arch}")
    first = N.compile_all(arch)
    assert set(first) == set(K.KERNELS)
    for name, compiled in first.items():
        assert not compiled.from_cache, f"{name}: found in an empty cache"
        assert compiled.image[:4] == b"\x7fELF", f"{name}: a CUBIN is an ELF image"
        for entry in compiled.kernel.entries:
            assert entry.name.encode() in compiled.image, f"{name}: CUBIN lacks entry point {entry.name}"
    files = sorted(p.name for p in kernel_cache.iterdir())
    assert len(files) == len(K.KERNELS) and all(f".sm_{arch}." in f and f.endswith(".cubin") for f in files), files
    second = N.compile_all(arch)
    for name, compiled in second.items():
        assert compiled.from_cache, f"{name}: compiled again instead of read from the cache"
        assert compiled.image == first[name].image


def test_ptx_output_names_every_entry(kernel_cache):
    for name, compiled in N.compile_all("sm_89", output="ptx").items():
        ptx = compiled.image
        assert ptx.endswith(b"\0"), f"{name}: cuModuleLoadData needs NUL-terminated PTX"
        assert b".target sm_89" in ptx
        assert set(re.findall(rb"\.entry (\w+)", ptx)) == {e.name.encode() for e in compiled.kernel.entries}
        assert not (name in ("guidance", "scale_cast", "scheduler_step", "image") and b"fma." in ptx), (
            f"{name}: --fmad=false must keep products and sums separately rounded, as the twins do")


def test_cache_key_separates_architectures_and_outputs(kernel_cache):
    images = {(a, o): N.compile_kernel("guidance", a, o) for a in (80, 89) for o in ("cubin", "ptx")}
    assert len({c.image for c in images.values()}) == 4
    assert len(list(kernel_cache.iterdir())) == 4
    assert not list(kernel_cache.glob("*.tmp")), "a temporary file was left behind"


def test_compile_error_shows_the_log():
    with pytest.raises(N.KernelCompileError, match=r"broken\.cu.*sm_89(.|\n)*no_such_symbol"):
        N.compile_source('extern "C" __global__ void k(float* x) { x[0] = no_such_symbol; }', "broken.cu", 89)


def test_unsupported_architecture_is_a_user_error():
    with pytest.raises(UserError, match=r"sm_30: NVRTC \d+\.\d+ compiles for"):
        N.compile_source('extern "C" __global__ void k() {}', "k.cu", "sm_30")
    with pytest.raises(UserError, match="GPU architecture 'ampere'"):
        N.compile_kernel("guidance", "ampere")


class FakeNvrtc:
    """cuda.bindings.nvrtc as compile_source uses it, with a one-byte log and a one-byte CUBIN: the sizes
    at which `b" " * size` would hand NVRTC Python's shared one-character bytes object to write into."""

    class nvrtcResult:
        NVRTC_SUCCESS = 0
        NVRTC_ERROR_COMPILATION = 6

    def __init__(self, compiles: bool):
        self.compiles, self.buffers = compiles, []

    def nvrtcVersion(self):
        return 0, 13, 0

    def nvrtcGetSupportedArchs(self):
        return 0, [89]

    def nvrtcGetErrorString(self, err):
        return 0, b"NVRTC_ERROR_COMPILATION"

    def nvrtcCreateProgram(self, *args):
        return 0, "program"

    def nvrtcCompileProgram(self, prog, count, options):
        return (0 if self.compiles else self.nvrtcResult.NVRTC_ERROR_COMPILATION,)

    def _size(self, prog):
        return 0, 1

    nvrtcGetProgramLogSize = nvrtcGetCUBINSize = nvrtcGetPTXSize = _size

    def _fill(self, prog, buffer):
        self.buffers.append(buffer)
        buffer[0:1] = b"Z"  # what the binding does: writes into the buffer it was given
        return (0,)

    nvrtcGetProgramLog = nvrtcGetCUBIN = nvrtcGetPTX = _fill

    def nvrtcDestroyProgram(self, prog):
        return (0,)


def test_nvrtc_outputs_go_to_fresh_writable_buffers(monkeypatch):
    space = b" "
    for compiles, expected in ((True, None), (False, N.KernelCompileError)):
        fake = FakeNvrtc(compiles)
        monkeypatch.setattr(N, "_nvrtc", lambda: fake)
        if expected is None:
            assert N.compile_source('extern "C" __global__ void k() {}', "k.cu", 89, headers={}) == b"Z"
        else:
            with pytest.raises(expected, match="k.cu"):
                N.compile_source('extern "C" __global__ void k() {}', "k.cu", 89, headers={})
        (buffer,) = fake.buffers
        assert isinstance(buffer, bytearray) and len(buffer) == 1, f"NVRTC wrote into {type(buffer).__name__}"
    assert space == b" " and bytes([32]) == b" ", "the interpreter's one-character bytes object was written into"


def test_missing_cuda_python_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)  # makes the import fail
    with pytest.raises(UserError, match=r"trt_sdxl\[cuda\]"):
        N.compile_kernel("guidance", 89)


# --- Philox4x32-10 and Box-Muller ----------------------------------------------------------------

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> output[4]
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def scalar_philox(counter, key):
    """Philox4x32-10 in Python integers, straight from the paper: 10 rounds, the key bumped by the
    Weyl constants before every round after the first."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 % 2**32, (p0 >> 32) ^ c[3] ^ k1, p0 % 2**32]
    return tuple(c)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert scalar_philox(counter, key) == expected
    got = tuple(int(w) for w in K.philox4x32_10(np.array(counter, np.uint32), np.array(key, np.uint32)))
    assert got == expected, f"twin gives {[hex(w) for w in got]}, Random123 {[hex(w) for w in expected]}"


def test_philox_stream_layout():
    # element i = word i % 4 of the block with counter (i // 4, 0, step, 0) and key (seed lo, seed hi)
    seed, step, n = 0x0123456789ABCDEF, 17, 4 * 50 + 3
    stream = K.philox_uint32(seed, step, n)
    assert stream.dtype == np.uint32 and stream.shape == (n,)
    for i in (0, 1, 2, 3, 4, 77, 150, n - 1):
        block = scalar_philox((i // 4, 0, step, 0), (seed & 0xFFFFFFFF, seed >> 32))
        assert int(stream[i]) == block[i % 4], f"element {i}"
    assert not np.array_equal(stream, K.philox_uint32(seed, step + 1, n)), "the step must change the stream"
    assert not np.array_equal(stream, K.philox_uint32(seed ^ (1 << 40), step, n)), "the seed's high word counts"
    assert np.array_equal(K.philox_uint32(seed, step, 9), stream[:9]), "a prefix does not depend on n"


def test_gaussian_noise_statistics():
    n = 1_000_000
    z = K.gaussian_noise(2024, 3, (n,)).astype(np.float64)
    mean, var = z.mean(), z.var()
    assert abs(mean) < 5 / math.sqrt(n), f"mean {mean:.2e}"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"variance {var:.5f}"
    kurtosis = np.mean((z - mean) ** 4) / var**2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n), f"kurtosis {kurtosis:.4f}"
    for k in (1, 2, 3):
        p = math.erfc(k / math.sqrt(2))  # P(|z| > k)
        frac = np.mean(np.abs(z) > k)
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), f"P(|z| > {k}) = {frac:.5f}, expected {p:.5f}"
    # Kolmogorov-Smirnov distance to the normal CDF; 1.95/sqrt(n) is the 0.1% critical value
    s = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / math.sqrt(n), f"KS distance {ks:.2e}"
    for lag in (1, 2, 4):  # within a Box-Muller pair, across pairs, across Philox blocks
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n), f"lag-{lag} correlation {r:.2e}"
    other = K.gaussian_noise(2024, 4, (n,)).astype(np.float64)
    r = np.corrcoef(z, other)[0, 1]
    assert abs(r) < 5 / math.sqrt(n), f"correlation between steps 3 and 4: {r:.2e}"


def test_gaussian_noise_from_its_uniforms():
    # Box-Muller recomputed here from the uint32 stream: u = (2*(w >> 9) + 1) / 2^24
    w = K.philox_uint32(7, 0, 1000).astype(np.int64)
    u = (2 * (w >> 9) + 1) / 2.0**24
    assert u.min() > 0 and u.max() < 1
    r, t = np.sqrt(-2 * np.log(u[0::2])), 2 * np.pi * u[1::2]
    expected = np.stack([r * np.cos(t), r * np.sin(t)], axis=-1).ravel()
    z = K.gaussian_noise(7, 0, (10, 100), scale=1.0)
    assert z.dtype == np.float32 and z.shape == (10, 100)
    assert_close("gaussian_noise", z.ravel(), expected, 1e-7)
    assert_same_bits("scaled noise", K.gaussian_noise(7, 0, (10, 100), 14.6), np.float32(14.6) * z)


# --- guidance, scaling, image ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(K.DTYPES.values()), ids=list(K.DTYPES))
def test_cfg_combine(dtype):
    rng = np.random.default_rng(1)
    noise_pred = rng.standard_normal((4, 4, 8, 8)).astype(dtype)  # batch 2 doubled: [uncond x2, cond x2]
    p = noise_pred.astype(np.float64)
    expected = p[:2] + 7.5 * (p[2:] - p[:2])
    out = K.cfg_combine(noise_pred, 7.5)
    assert out.dtype == np.float32
    assert_close(f"cfg_combine[{np.dtype(dtype)}]", out, expected, 1e-6)
    with pytest.raises(ValueError, match="even batch"):
        K.cfg_combine(noise_pred[:3], 7.5)


def test_scale_cast_layout_and_rounding():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * 10
    for dtype in K.DTYPES.values():
        out = K.scale_cast(x, 0.25, dtype, copies=2)
        assert out.dtype == dtype and out.shape == (2, 4, 8, 8)
        assert_same_bits(f"copies[{dtype}]", out[0], out[1])
        assert_close(f"scale_cast[{dtype}]", out[:1].astype(np.float64), x.astype(np.float64) * 0.25,
                     1e-7 if dtype == np.float32 else 2e-3 if dtype == np.float16 else 4e-3)


def test_latents_for_the_vae_match_diffusers():
    torch = pytest.importorskip("torch")
    scaling_factor = configs.load("sdxl_base_1.0", "vae")["scaling_factor"]
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    expected = (torch.from_numpy(latents) / scaling_factor).numpy()  # StableDiffusionXLPipeline
    assert_close("latents / scaling_factor", K.scale_cast(latents, 1 / scaling_factor), expected, 1e-7)


def test_image_to_rgb8_matches_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(4)
    image = rng.uniform(-1.2, 1.2, (2, 3, 16, 24)).astype(np.float32)
    image[0, :, 0, :6] = [-1.0, 1.0, 0.0, 2.0, -3.0, np.float32(2 * 0.5 / 255 - 1)]  # ends, clamps, a tie
    processor = VaeImageProcessor()
    pil = processor.numpy_to_pil(processor.postprocess(torch.from_numpy(image), output_type="np"))
    expected = np.stack([np.asarray(p) for p in pil])
    out = K.image_to_rgb8(image)
    assert out.dtype == np.uint8 and out.shape == (2, 16, 24, 3)
    assert_same_bits("image_to_rgb8", out, expected)
    assert K.image_to_rgb8(np.full((1, 3, 1, 1), np.nan, np.float32)).max() == 0, "NaN becomes 0"


# --- scheduler steps against diffusers ------------------------------------------------------------

SCHEDULER_TOL = 5e-6  # float32 coefficients from float64 vs diffusers' float32 arithmetic


def sdxl_scheduler(method):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    config = {k: v for k, v in configs.load("sdxl_base_1.0", "scheduler").items() if not k.startswith("_")}
    if method == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if method == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if method == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    return DDIMScheduler.from_config(config)


def coefficients(method, scheduler, i, steps):
    """What the pipeline passes to scheduler_step_f32 at step i, from the scheduler's own tables."""
    if method == "ddim":
        t = int(scheduler.timesteps[i])
        t_prev = t - scheduler.config.num_train_timesteps // steps
        alphas = scheduler.alphas_cumprod.numpy()
        return K.StepCoefficients.ddim(alphas[t], alphas[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod)
    sigmas = scheduler.sigmas.numpy()
    if method == "euler":
        return K.StepCoefficients.euler(sigmas[i], sigmas[i + 1])
    if method == "euler_a":
        return K.StepCoefficients.euler_ancestral(sigmas[i], sigmas[i + 1])
    first_order = i == 0 or i == steps - 1  # no history yet; diffusers' final step to sigma 0
    return K.StepCoefficients.dpmpp_2m(sigmas[i], sigmas[i + 1], None if first_order else sigmas[i - 1])


@pytest.mark.parametrize("method", ["euler", "euler_a", "dpmpp_2m_karras", "ddim"])
@pytest.mark.parametrize("steps", [6, 25])
def test_scheduler_step_matches_diffusers(method, steps):
    """Whole trajectories with the same model outputs (and noise): ours vs diffusers' at every step."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    rng = np.random.default_rng(5)
    shape = (1, 4, 8, 8)
    scheduler = sdxl_scheduler(method)
    scheduler.set_timesteps(steps)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(scheduler.init_noise_sigma)
    sample, prev = torch.from_numpy(x.copy()), None
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        if method in ("euler", "euler_a"):
            scale = K.euler_input_scale(scheduler.sigmas[i].item())
            assert_close(f"{method} step {i} scale_model_input", K.scale_cast(sample.numpy(), scale),
                         model_input.numpy(), 1e-6)
        eps = rng.standard_normal(shape).astype(np.float32)
        noise = None
        kwargs = {}
        if method == "euler_a":  # diffusers draws torch.randn(shape, generator) in step
            kwargs["generator"] = torch.Generator().manual_seed(100 + i)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i)).numpy()
        sample = scheduler.step(torch.from_numpy(eps), t, sample, **kwargs).prev_sample
        x, prev = K.scheduler_step(x, eps, coefficients(method, scheduler, i, steps), prev=prev, noise=noise)
        assert_close(f"{method} ({steps} steps) step {i}", x, sample.numpy(), SCHEDULER_TOL)


def test_dpmpp_2m_denoised_is_x0():
    # the stored estimate is diffusers' convert_model_output: x0 = (x - sigma_vp*eps) / alpha
    rng = np.random.default_rng(6)
    x, eps = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    sigma = 3.7
    alpha = 1 / math.sqrt(sigma**2 + 1)
    _, denoised = K.scheduler_step(x, eps, K.StepCoefficients.dpmpp_2m(sigma, 2.1))
    assert_close("denoised", denoised, (x.astype(np.float64) - sigma * alpha * eps) / alpha, 1e-6)
    with pytest.raises(ValueError, match="first order"):
        K.StepCoefficients.dpmpp_2m(0.5, 0.0, 0.9)
    with pytest.raises(ValueError, match="prev"):
        K.scheduler_step(x, eps, K.StepCoefficients.dpmpp_2m(2.1, 1.3, 3.7))


# --- on the GPU: each kernel against its twin ------------------------------------------------------

class Device:
    """The primary context of GPU 0, the kernels compiled for it, and device buffers, via cuda-python."""

    def __init__(self, driver):
        self.driver = driver
        self.device = self.call(driver.cuDeviceGet(0))
        self.context = self.call(driver.cuDevicePrimaryCtxRetain(self.device))
        self.call(driver.cuCtxSetCurrent(self.context))
        attr = driver.CUdevice_attribute
        major = self.call(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device))
        minor = self.call(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device))
        self.arch = 10 * major + minor
        driver_cuda = self.call(driver.cuDriverGetVersion()) // 1000
        nvrtc_cuda = N.nvrtc_version()[0]
        if driver_cuda < nvrtc_cuda:  # a CUBIN from NVRTC 13 needs a driver of CUDA 13 or later
            raise RuntimeError(f"the NVIDIA driver supports CUDA {driver_cuda}, NVRTC is CUDA {nvrtc_cuda}: install "
                               f"cuda-bindings and the NVRTC wheel of CUDA {driver_cuda} (nvidia-cuda-nvrtc-cu12)")
        self.modules, self.functions, self.buffers = [], {}, []
        for compiled in N.compile_all(self.arch).values():
            module = self.call(driver.cuModuleLoadData(compiled.image))
            self.modules.append(module)
            for entry in compiled.kernel.entries:
                self.functions[entry.name] = (entry, self.call(driver.cuModuleGetFunction(module, entry.name.encode())))

    def call(self, result):
        err, *values = result
        if err != self.driver.CUresult.CUDA_SUCCESS:
            _, text = self.driver.cuGetErrorString(err)
            raise RuntimeError(f"CUDA driver error {err}: {text.decode() if text else '?'}")
        return values[0] if len(values) == 1 else tuple(values) if values else None

    def alloc(self, nbytes):
        ptr = self.call(self.driver.cuMemAlloc(max(1, nbytes)))
        self.buffers.append(ptr)
        return int(ptr)

    def upload(self, array):
        host = np.ascontiguousarray(array).view(np.uint8)  # bytes: works for bfloat16 too
        ptr = self.alloc(host.nbytes)
        self.call(self.driver.cuMemcpyHtoD(ptr, host, host.nbytes))
        return ptr

    def download(self, ptr, shape, dtype):
        host = np.empty(shape, dtype=dtype)
        self.call(self.driver.cuMemcpyDtoH(host.view(np.uint8), ptr, host.nbytes))
        return host

    def launch(self, entry_name, n, *args, grid=None):
        """Run an entry point over n elements (grid: blocks, default entry.grid(n)) and wait for it."""
        entry, function = self.functions[entry_name]
        blocks = entry.grid(n) if grid is None else grid
        self.call(self.driver.cuLaunchKernel(function, blocks, 1, 1, K.BLOCK_SIZE, 1, 1, 0, 0,
                                             entry.launch_args(*args), 0))
        self.call(self.driver.cuCtxSynchronize())

    def close(self):
        for ptr in self.buffers:
            self.call(self.driver.cuMemFree(ptr))
        for module in self.modules:
            self.call(self.driver.cuModuleUnload(module))
        self.call(self.driver.cuDevicePrimaryCtxRelease(self.device))


def gpu_driver():
    """cuda.bindings.driver when a GPU answers, else the reason there is none."""
    try:
        from cuda.bindings import driver
    except ImportError as e:
        return None, f"cuda-python is not installed ({e})"
    try:
        (err,) = driver.cuInit(0)
    except RuntimeError as e:  # no libcuda: no NVIDIA driver on this machine
        return None, f"no NVIDIA driver ({e})"
    if err != driver.CUresult.CUDA_SUCCESS:
        return None, f"cuInit failed: {err}"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return None, "no CUDA device"
    return driver, ""


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    driver, reason = gpu_driver()
    if driver is None:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    mp.setenv(N.CACHE_ENV, str(tmp_path_factory.mktemp("kernels")))
    device = Device(driver)
    yield device
    device.close()
    mp.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("suffix", list(K.DTYPES))
def test_gpu_cfg_combine(gpu, suffix):
    noise_pred = np.random.default_rng(10).standard_normal((2, 4, 32, 40)).astype(K.DTYPES[suffix])
    n = noise_pred.size // 2
    out = gpu.alloc(4 * n)
    gpu.launch(f"cfg_combine_{suffix}", n, out, gpu.upload(noise_pred), 7.5, n)
    assert_same_bits(f"cfg_combine_{suffix}", gpu.download(out, (1, 4, 32, 40), np.float32),
                     K.cfg_combine(noise_pred, 7.5))


@pytest.mark.gpu
@pytest.mark.parametrize("suffix", list(K.DTYPES))
def test_gpu_scale_cast(gpu, suffix):
    x = np.random.default_rng(11).standard_normal((1, 4, 32, 40)).astype(np.float32) * 14
    x.flat[:4] = [np.inf, -np.inf, np.nan, 1e6]  # infinities, NaN, and fp16 overflow to inf
    dtype = K.DTYPES[suffix]
    out = gpu.alloc(2 * x.size * dtype.itemsize)
    gpu.launch(f"scale_cast_{suffix}", x.size, out, gpu.upload(x), 0.0767, x.size, 2)
    got = gpu.download(out, (2, 4, 32, 40), dtype)
    expected = K.scale_cast(x, 0.0767, dtype, copies=2)
    nan = np.isnan(expected.astype(np.float32))  # NaN payloads may differ; NaN must stay NaN
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan), f"scale_cast_{suffix}: NaN positions differ"
    assert_same_bits(f"scale_cast_{suffix}", got[~nan], expected[~nan])


@pytest.mark.gpu
def test_gpu_scheduler_step(gpu):
    rng = np.random.default_rng(12)
    x, eps, prev, noise = (rng.standard_normal(4 * 32 * 40).astype(np.float32) for _ in range(4))
    n = x.size
    for label, coeffs, with_prev, with_noise in [
        ("euler", K.StepCoefficients.euler(7.3, 5.9), False, False),
        ("euler_a", K.StepCoefficients.euler_ancestral(7.3, 5.9), False, True),
        ("dpmpp_2m first order", K.StepCoefficients.dpmpp_2m(7.3, 5.9), True, False),
        ("dpmpp_2m second order", K.StepCoefficients.dpmpp_2m(7.3, 5.9, 9.1), True, False),
    ]:
        d_x, d_eps = gpu.upload(x), gpu.upload(eps)
        d_prev = gpu.upload(prev) if with_prev else 0
        d_noise = gpu.upload(noise) if with_noise else 0
        c = coeffs
        gpu.launch("scheduler_step_f32", n, d_x, d_prev, d_eps, d_noise, c.a, c.b, c.c, c.d, c.e, c.f, n)
        x_next, denoised = K.scheduler_step(x, eps, coeffs, prev=prev if with_prev else None,
                                            noise=noise if with_noise else None)
        assert_same_bits(f"{label}: x", gpu.download(d_x, (n,), np.float32), x_next)
        if with_prev:
            assert_same_bits(f"{label}: prev", gpu.download(d_prev, (n,), np.float32), denoised)


@pytest.mark.gpu
def test_gpu_philox_stream(gpu):
    out = gpu.alloc(4 * 4)
    gpu.launch("philox_uint32", 4, out, 0, 0, 4)
    assert tuple(int(w) for w in gpu.download(out, (4,), np.uint32)) == PHILOX_KAT[0][2]
    seed, step, n = 0xFEDCBA9876543210, 29, 4 * 10000 + 3
    out = gpu.alloc(4 * n)
    gpu.launch("philox_uint32", n, out, seed, step, n)
    assert_same_bits("philox_uint32", gpu.download(out, (n,), np.uint32), K.philox_uint32(seed, step, n))


@pytest.mark.gpu
def test_gpu_gaussian_noise(gpu):
    seed, step, n = 123456789, 4, 2 * 4 * 128 * 128 + 2
    out = gpu.alloc(4 * n)
    gpu.launch("gaussian_noise_f32", n, out, seed, step, 1.0, n)
    got = gpu.download(out, (n,), np.float32)
    expected = K.gaussian_noise(seed, step, (n,))
    err = np.max(np.abs(got.astype(np.float64) - expected))
    assert err <= 2e-6, f"gaussian_noise_f32: max |GPU - twin| {err:.2e} > 2e-06"
    assert_close("gaussian_noise_f32", got, expected, 1e-6)
    gpu.launch("gaussian_noise_f32", n, out, seed, step, 1.0, n, grid=3)  # another launch geometry
    assert_same_bits("gaussian_noise_f32 on 3 blocks", gpu.download(out, (n,), np.float32), got)


@pytest.mark.gpu
def test_gpu_image_to_rgb8(gpu):
    image = np.random.default_rng(13).uniform(-1.3, 1.3, (2, 3, 40, 56)).astype(np.float32)
    image[0, 0, 0, :4] = [np.nan, np.float32(2 * 0.5 / 255 - 1), -1.0, 1.0]
    out = gpu.alloc(image.size)
    gpu.launch("image_to_rgb8_f32", image.size, out, gpu.upload(image), 2, 40, 56)
    assert_same_bits("image_to_rgb8_f32", gpu.download(out, (2, 40, 56, 3), np.uint8), K.image_to_rgb8(image))
