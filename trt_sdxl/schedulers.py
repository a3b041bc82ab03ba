"""The denoising schedulers (Euler, Euler ancestral, DPM++ 2M Karras, DDIM) in numpy, matching diffusers'.

`create(name, num_inference_steps, config=None)` builds one from a diffusers scheduler config
(SDXL base's packaged one by default), read the way diffusers' `from_config` reads it: the
keys the method uses, diffusers' own defaults for the keys missing, everything else ignored.
A setting we do not implement is a `UserError` naming the key, never a silent difference.

Numerics follow diffusers closely enough that whole trajectories agree to float32 rounding:
the training tables (betas, cumulative alphas, sigmas) are built in float32 exactly as PyTorch
builds them, the per-step tables (`timesteps`, `sigmas`) in diffusers' dtypes; the per-step
scalar coefficients are computed in float64 from those tables and applied to float32 arrays.

Notation: ᾱ_t is the cumulative product of (1 − β) over the training steps; σ_t =
√((1 − ᾱ_t) / ᾱ_t) is the noise level of the variance-exploding view, in which a noisy latent
is x = x₀ + σ ε. The Euler samplers work in that view (their latents start at σ_max scale and
the model sees x / √(σ² + 1)); DPM-Solver++ and DDIM work in the variance-preserving view
x = √ᾱ x₀ + √(1 − ᾱ) ε.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import configs
from .errors import UserError

NAMES = ("euler", "euler_a", "dpmpp_2m_karras", "ddim")

# diffusers' constructor defaults for the keys every method reads.
_COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}

# Settings diffusers offers that we do not implement: each must keep the value given here.
_COMMON_FIXED = {"rescale_betas_zero_snr": False}


def create(name: str, num_inference_steps: int, config: dict | None = None) -> Scheduler:
    """The scheduler `name` (one of NAMES) for `num_inference_steps` steps, from `config` or SDXL base's."""
    if name not in _CLASSES:
        raise UserError(f"unknown scheduler {name!r}: expected one of {', '.join(NAMES)}")
    if config is None:
        config = configs.load("sdxl_base_1.0", "scheduler")
    return _CLASSES[name](num_inference_steps, config)


class Scheduler:
    """What every scheduler has; subclasses set the tables and implement `step`.

    Attributes: `name`; `settings` (the config values the method uses, after defaults);
    `num_inference_steps`; `timesteps` (the model's timestep input per step, numpy, in
    diffusers' dtype); `sigmas` (noise level per step plus the final one, float32; None where
    the method has none); `init_noise_sigma` (the initial latent is a standard normal draw
    times this); `order` (model evaluations per step, as diffusers' `order`); `needs_noise`
    (whether `step` takes a standard normal draw).
    """

    name = ""
    order = 1
    needs_noise = False
    sigmas: np.ndarray | None = None
    init_noise_sigma = 1.0
    _defaults: dict = {}
    _fixed: dict = {}
    _choices: dict = {}
    _overrides: dict = {}

    def __init__(self, num_inference_steps: int, config: dict):
        self.settings = _read_settings(self.name, config, self._defaults, self._fixed, self._choices, self._overrides)
        self.num_inference_steps = _check_steps(num_inference_steps, self.settings["num_train_timesteps"])
        self.alphas_cumprod = _alphas_cumprod(self.settings)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """The UNet's input at step `step_index` (the latent itself unless the method rescales it)."""
        return sample

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """The latent after step `step_index`, from the model output at it; in model_output's dtype."""
        raise NotImplementedError


class _SigmaScheduler(Scheduler):
    """Shared by the Euler samplers: the variance-exploding view with σ interpolated at the timesteps."""

    def __init__(self, num_inference_steps: int, config: dict):
        super().__init__(num_inference_steps, config)
        s = self.settings
        timesteps = _spaced_timesteps(s["timestep_spacing"], self.num_inference_steps,
                                      s["num_train_timesteps"], s["steps_offset"]).astype(np.float32)
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        # σ at the (possibly fractional) timesteps by linear interpolation of the training table.
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if s.get("use_karras_sigmas"):
            sigmas = _karras_sigmas(s["sigma_min"] if s["sigma_min"] is not None else sigmas[-1],
                                    s["sigma_max"] if s["sigma_max"] is not None else sigmas[0],
                                    self.num_inference_steps)
            timesteps = _sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [_final_sigma(s, train_sigmas)]]).astype(np.float32)
        sigma_max = float(self.sigmas.max())
        # diffusers' convention: with "leading" spacing the latent starts at unit variance in the VP
        # view (std √(σ_max² + 1), 1 after scale_model_input), with the other spacings at σ_max.
        self.init_noise_sigma = (
            sigma_max if s["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
        )

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """x / √(σ² + 1): the variance-preserving latent the UNet was trained on."""
        sigma = float(self.sigmas[step_index])
        return sample / math.sqrt(sigma * sigma + 1.0)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        """x₀ predicted from the model output at noise level σ (v: Salimans & Ho 2022, in the σ view)."""
        kind = self.settings["prediction_type"]
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / math.sqrt(sigma * sigma + 1.0)) + sample / (sigma * sigma + 1.0)
        return model_output


class Euler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space
    of Diffusion-Based Generative Models", Algorithm 2 without the second-order correction; as
    diffusers' EulerDiscreteScheduler and k-diffusion's `sample_euler`).

    With D = x₀ predicted at σ_i, the ODE's derivative is d = (x − D) / σ_i and
    x_{i+1} = x_i + d · (σ_{i+1} − σ_i); σ_N is 0 ("zero") or σ of t = 0 ("sigma_min").
    """

    name = "euler"
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                 "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None,
                 "timestep_type": "discrete", "final_sigmas_type": "zero"}
    _fixed = {**_COMMON_FIXED, "interpolation_type": "linear", "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "timestep_type": "discrete"}
    _choices = {"prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
                "final_sigmas_type": ("zero", "sigma_min")}

    def step(self, model_output, step_index, sample, noise=None):
        """One Euler step; deterministic, so `noise` is ignored."""
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        sample = sample.astype(np.float32)
        denoised = self._denoised(model_output, sample, sigma)
        derivative = (sample - denoised) / sigma
        return (sample + derivative * (sigma_next - sigma)).astype(model_output.dtype)


class EulerAncestral(_SigmaScheduler):
    """Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`, as diffusers'
    EulerAncestralDiscreteScheduler): an Euler step of the ODE down to σ_down, then fresh noise of
    standard deviation σ_up, splitting the move σ_i → σ_{i+1} so the marginal variance is right
    (the ancestral step of DDPM, Ho et al. 2020, in the σ parametrisation of Karras et al. 2022):

        σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),  σ_down = √(σ_{i+1}² − σ_up²)
        x_{i+1} = x_i + d · (σ_down − σ_i) + σ_up · z,  d = (x_i − D) / σ_i,  z ~ N(0, I)
    """

    name = "euler_a"
    needs_noise = True
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace"}
    _fixed = dict(_COMMON_FIXED)
    _choices = {"prediction_type": ("epsilon", "v_prediction")}

    def step(self, model_output, step_index, sample, noise=None):
        """One ancestral step; `noise` (standard normal, sample's shape) is required unless σ_up is 0."""
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        sample = sample.astype(np.float32)
        denoised = self._denoised(model_output, sample, sigma)
        derivative = (sample - denoised) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        if sigma_up > 0:
            if noise is None:
                raise ValueError(f"euler_a step {step_index} adds noise (sigma_up={sigma_up:.4g}): pass `noise`")
            prev_sample = prev_sample + noise.astype(np.float32) * sigma_up
        return prev_sample.astype(model_output.dtype)


class DPMSolverPP2MKarras(Scheduler):
    """DPM-Solver++(2M) with the Karras noise schedule, A1111's "DPM++ 2M Karras" (Lu et al. 2022,
    "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
    Algorithm 2; as diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++",
    solver_order 2, use_karras_sigmas True).

    Noise levels: σ_i = (σ_max^{1/ρ} + i/(N−1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7 (Karras et
    al. 2022, eq. 5), σ_min/σ_max the ends of the training table; each step's timestep is the t
    whose log σ matches, interpolated in the training table and rounded. In the VP view
    α_i = 1/√(1 + σ_i²), s_i = σ_i α_i, λ_i = log(α_i / s_i), h = λ_{i+1} − λ_i. With x₀
    predictions D_i and D_{i−1} of this and the previous step, r = (λ_i − λ_{i−1}) / h:

        first order:  x_{i+1} = (s_{i+1}/s_i) x_i − α_{i+1} (e^{−h} − 1) D_i
        second order ("midpoint"): the same − ½ α_{i+1} (e^{−h} − 1) · (D_i − D_{i−1}) / r
        ("heun"):                   the same + α_{i+1} ((e^{−h} − 1)/h + 1) · (D_i − D_{i−1}) / r

    The first step (no history) is first order, and so is the last when σ_N = 0
    (`final_sigmas_type` "zero"), `euler_at_final`, or `lower_order_final` with N < 15 — then,
    with σ_N = 0, x_N = D_{N−1}. The previous x₀ prediction is kept from one `step` call to the
    next and used only if that call was step i − 1 (it is dropped after the last step), so a
    trajectory, from step 0 or from mid-schedule, runs its steps in order.
    """

    name = "dpmpp_2m_karras"
    solver_order = 2
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "solver_type": "midpoint",
                 "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
                 "sigma_min": None, "sigma_max": None}
    _fixed = {**_COMMON_FIXED, "thresholding": False, "variance_type": None, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "use_flow_sigmas": False}
    _choices = {"prediction_type": ("epsilon", "v_prediction", "sample"),
                "solver_type": ("midpoint", "heun"), "final_sigmas_type": ("zero", "sigma_min")}
    # What the name means, whatever the config says (diffusers: from_config(config, **these)).
    _overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}

    def __init__(self, num_inference_steps: int, config: dict):
        super().__init__(num_inference_steps, config)
        s = self.settings
        train_sigmas = _train_sigmas(self.alphas_cumprod)
        sigmas = _karras_sigmas(s["sigma_min"] if s["sigma_min"] is not None else train_sigmas[0],
                                s["sigma_max"] if s["sigma_max"] is not None else train_sigmas[-1],
                                self.num_inference_steps)
        self.timesteps = _sigma_to_t(sigmas, np.log(train_sigmas)).round().astype(np.int64)
        self.sigmas = np.concatenate([sigmas, [_final_sigma(s, train_sigmas)]]).astype(np.float32)
        self._previous = None  # (step_index, x₀ prediction) of the last step taken

    def _alpha_sigma_lambda(self, index: int) -> tuple[float, float, float]:
        """(α, s, λ) of the VP view at sigmas[index]; λ = +inf at σ = 0."""
        sigma = float(self.sigmas[index])
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return alpha, sigma * alpha, (math.log(alpha / (sigma * alpha)) if sigma > 0 else math.inf)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, step_index: int) -> np.ndarray:
        alpha, sigma_t, _ = self._alpha_sigma_lambda(step_index)
        kind = self.settings["prediction_type"]
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha
        if kind == "v_prediction":
            return alpha * sample - sigma_t * model_output
        return model_output

    def step(self, model_output, step_index, sample, noise=None):
        """One DPM-Solver++ step; deterministic, so `noise` is ignored."""
        s = self.settings
        last = step_index == self.num_inference_steps - 1
        lower_order_final = last and (
            s["euler_at_final"] or (s["lower_order_final"] and self.num_inference_steps < 15)
            or s["final_sigmas_type"] == "zero"
        )
        if self._previous is not None and self._previous[0] != step_index - 1:
            self._previous = None  # a fresh trajectory (step 0, or a start mid-schedule as in img2img)
        sample = sample.astype(np.float32)
        denoised = self._denoised(model_output.astype(np.float32), sample, step_index)
        alpha_next, sigma_t_next, lambda_next = self._alpha_sigma_lambda(step_index + 1)
        _, sigma_t, lambda_ = self._alpha_sigma_lambda(step_index)
        h = lambda_next - lambda_
        # e^{−h} − 1; −1 exactly at the σ = 0 end, where x_{i+1} = D_i.
        expm1 = math.expm1(-h) if math.isfinite(h) else -1.0
        prev_sample = (sigma_t_next / sigma_t) * sample - (alpha_next * expm1) * denoised
        # h = 0 (σ_{i+1} = σ_i: the "sigma_min" end after Karras' σ_min) leaves x unchanged at any order.
        if self._previous is not None and not lower_order_final and h > 0:
            _, _, lambda_prev = self._alpha_sigma_lambda(step_index - 1)
            r = (lambda_ - lambda_prev) / h
            d1 = (denoised - self._previous[1]) / r
            if s["solver_type"] == "midpoint":
                prev_sample = prev_sample - (0.5 * alpha_next * expm1) * d1
            else:
                prev_sample = prev_sample + (alpha_next * (expm1 / h + 1.0)) * d1
        self._previous = None if last else (step_index, denoised)
        return prev_sample.astype(model_output.dtype)


class DDIM(Scheduler):
    """DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 and 16; as diffusers'
    DDIMScheduler). From timestep t to prev = t − T // N, with ᾱ_prev = 1 (`set_alpha_to_one`)
    or ᾱ_0 past the start:

        x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t   (clipped to ±clip_sample_range if `clip_sample`)
        σ_t = η √((1 − ᾱ_prev) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_prev)
        x_prev = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z

    η = `eta` (0 by default: deterministic, `noise` ignored; > 0 needs `noise`, z ~ N(0, I)).
    """

    name = "ddim"
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True,
                 "clip_sample_range": 1.0, "set_alpha_to_one": True}
    _fixed = {**_COMMON_FIXED, "thresholding": False}
    _choices = {"prediction_type": ("epsilon", "v_prediction", "sample")}

    def __init__(self, num_inference_steps: int, config: dict, eta: float = 0.0):
        super().__init__(num_inference_steps, config)
        s = self.settings
        self.eta = float(eta)
        self.needs_noise = self.eta > 0
        self.timesteps = _spaced_timesteps(s["timestep_spacing"], self.num_inference_steps,
                                           s["num_train_timesteps"], s["steps_offset"]).round().astype(np.int64)
        self.final_alpha_cumprod = 1.0 if s["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def step(self, model_output, step_index, sample, noise=None):
        """One DDIM step; `noise` is used only when eta > 0."""
        s = self.settings
        t = int(self.timesteps[step_index])
        prev_t = t - s["num_train_timesteps"] // self.num_inference_steps
        alpha_t = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1.0 - alpha_t
        model_output32 = model_output.astype(np.float32)
        sample = sample.astype(np.float32)
        kind = s["prediction_type"]
        if kind == "epsilon":
            denoised = (sample - math.sqrt(beta_t) * model_output32) / math.sqrt(alpha_t)
            epsilon = model_output32
        elif kind == "v_prediction":
            denoised = math.sqrt(alpha_t) * sample - math.sqrt(beta_t) * model_output32
            epsilon = math.sqrt(alpha_t) * model_output32 + math.sqrt(beta_t) * sample
        else:
            denoised = model_output32
            epsilon = (sample - math.sqrt(alpha_t) * denoised) / math.sqrt(beta_t)
        if s["clip_sample"]:
            denoised = np.clip(denoised, -s["clip_sample_range"], s["clip_sample_range"])
        variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
        std_dev = self.eta * math.sqrt(variance)
        prev_sample = math.sqrt(alpha_prev) * denoised + math.sqrt(1.0 - alpha_prev - std_dev**2) * epsilon
        if self.eta > 0:
            if noise is None:
                raise ValueError(f"ddim with eta={self.eta} adds noise at step {step_index}: pass `noise`")
            prev_sample = prev_sample + std_dev * noise.astype(np.float32)
        return prev_sample.astype(model_output.dtype)


_CLASSES = {cls.name: cls for cls in (Euler, EulerAncestral, DPMSolverPP2MKarras, DDIM)}


def _read_settings(name: str, config: dict, defaults: dict, fixed: dict, choices: dict,
                   overrides: dict) -> dict:
    """The values of `defaults`' keys from `config` (else the default), checked against what we implement."""
    settings = {key: config.get(key, default) for key, default in defaults.items()}
    for key, required in fixed.items():
        value = config.get(key, required)
        if value != required:
            raise UserError(f"scheduler config: {key}={value!r} is not supported by {name} (only {required!r})")
    for key, allowed in {"beta_schedule": ("linear", "scaled_linear"),
                         "timestep_spacing": ("linspace", "leading", "trailing"), **choices}.items():
        if settings[key] not in allowed:
            raise UserError(
                f"scheduler config: {key}={settings[key]!r} is not supported by {name}: "
                f"expected one of {', '.join(map(repr, allowed))}"
            )
    settings.update(overrides)
    return settings


def _check_steps(num_inference_steps, num_train_timesteps: int) -> int:
    try:
        steps = operator.index(num_inference_steps)
    except TypeError:
        raise UserError(f"number of inference steps must be an integer, got {num_inference_steps!r}") from None
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"number of inference steps must be between 1 and {num_train_timesteps}, got {steps}")
    return steps


def _torch_linspace_float32(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace(start, end, count, dtype=torch.float32), bit for bit: the step rounded to
    float32, the first half counted up from `start` and the second down from `end` in double."""
    start32, end32 = np.float32(start), np.float32(end)
    step = float((end32 - start32) / np.float32(max(count - 1, 1)))
    i = np.arange(count, dtype=np.float64)
    return np.where(i < count // 2, float(start32) + step * i, float(end32) - step * (count - 1 - i)).astype(np.float32)


def _alphas_cumprod(settings: dict) -> np.ndarray:
    """ᾱ_t over the training steps, float32 exactly as diffusers builds it with PyTorch (whose
    CPU cumprod accumulates in double and rounds each partial product to float32)."""
    count = settings["num_train_timesteps"]
    if settings["trained_betas"] is not None:
        betas = np.asarray(settings["trained_betas"], dtype=np.float32)
    elif settings["beta_schedule"] == "linear":
        betas = _torch_linspace_float32(settings["beta_start"], settings["beta_end"], count)
    else:  # "scaled_linear": linear in √β, the latent-diffusion schedule
        betas = _torch_linspace_float32(settings["beta_start"] ** 0.5, settings["beta_end"] ** 0.5, count) ** 2
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t) per training timestep t, in float32 as diffusers has it."""
    return ((np.float32(1.0) - alphas_cumprod) / alphas_cumprod) ** np.float32(0.5)


def _final_sigma(settings: dict, train_sigmas: np.ndarray) -> float:
    """σ_N: 0, or σ of t = 0 with final_sigmas_type "sigma_min" (a setting euler_a lacks: always 0)."""
    return float(train_sigmas[0]) if settings.get("final_sigmas_type") == "sigma_min" else 0.0


def _spaced_timesteps(spacing: str, count: int, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """The `count` timesteps, highest first, by the spacings of Lin et al. 2023 ("Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Table 2), written as diffusers writes them."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, count)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, count) * (num_train_timesteps // count)).round()[::-1] + float(steps_offset)
    # "trailing"; a float stride, as diffusers has it (so it can yield one extra step when T/N is inexact)
    return np.arange(num_train_timesteps, 0, -num_train_timesteps / count).round() - 1.0


def _karras_sigmas(sigma_min: float, sigma_max: float, count: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    ramp = np.linspace(0, 1, count)
    max_inv_rho, min_inv_rho = float(sigma_max) ** (1 / rho), float(sigma_min) ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ: linear interpolation of log σ between the two
    neighbouring entries of the (increasing) training table, clamped to its ends."""
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigmas - log_train_sigmas[:, np.newaxis]  # [T, N]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    low_log, high_log = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((low_log - log_sigmas) / (low_log - high_log), 0, 1)
    return (1 - w) * low + w * (low + 1)
