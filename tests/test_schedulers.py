"""trt_sdxl.schedulers against diffusers' schedulers (PyTorch, CPU) built from the same config.

Two levels: the schedule tables (timesteps, sigmas, init_noise_sigma), then whole denoising
trajectories driven by the same deterministic stand-in for the UNet, with the same noise draws
for the stochastic samplers. The figure compared is the relative L2 error ‖ours − ref‖ / ‖ref‖
of the final latent (and of every UNet input on the way), within a float32 budget.
"""

import numpy as np
from oracle import rel_l2
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddim, scheduling_euler_ancestral_discrete

from trt_sdxl import configs, schedulers
from trt_sdxl.errors import UserError

FLOAT32_TOL = 1e-5      # whole trajectory, float32 arithmetic on both sides
TABLE_TOL = 1e-6        # sigmas and init_noise_sigma: float32 tables, rounding-level differences
LATENT_SHAPE = (1, 4, 16, 24)
STEP_COUNTS = (1, 2, 5, 20, 30, 50)

# SDXL base 1.0's published scheduler config, the values the schedulers read.
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def sdxl_config():
    return configs.load("sdxl_base_1.0", "scheduler")


def diffusers_scheduler(name, steps, config, eta=0.0):
    """diffusers' counterpart of schedulers.create(name, steps, config), timesteps set."""
    if name == "euler":
        ref = EulerDiscreteScheduler.from_config(config)
    elif name == "euler_a":
        ref = EulerAncestralDiscreteScheduler.from_config(config)
    elif name == "dpmpp_2m_karras":
        ref = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    else:
        ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    return ref


def fake_unet(model_input, timestep):
    """A fixed nonlinear function of the UNet input and timestep, standing in for the model."""
    t = np.float32(float(timestep) / 100.0)
    return (np.float32(0.5) * np.tanh(model_input) + np.float32(0.1) * np.sin(t)).astype(np.float32)


def run_trajectories(ours, ref, steps, monkeypatch, seed, ddim_eta=0.0):
    """Denoise from the same initial draw with both; returns (final ours, final ref, worst UNet-input error)."""
    rng = np.random.default_rng(seed)
    initial = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    noises = [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(steps)]
    # diffusers' ancestral step draws its noise with randn_tensor: hand it the same draws.
    ref_noise = iter(noises)
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete, "randn_tensor",
        lambda shape, **kwargs: torch.from_numpy(next(ref_noise)).to(kwargs.get("dtype") or torch.float32),
    )
    # DDIM must not draw any noise of its own: with eta > 0 it gets `variance_noise`.
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", None)

    x = initial * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(initial) * ref.init_noise_sigma
    worst_input = 0.0
    for i, t_ref in enumerate(ref.timesteps):
        model_input = ours.scale_model_input(x, i)
        model_input_ref = ref.scale_model_input(x_ref, t_ref)
        worst_input = max(worst_input, rel_l2(model_input, model_input_ref.numpy()))
        x = ours.step(fake_unet(model_input, ours.timesteps[i]), i, x, noise=noises[i])
        output_ref = torch.from_numpy(fake_unet(model_input_ref.numpy(), t_ref))
        if isinstance(ref, DDIMScheduler):
            extra = {"eta": ddim_eta, "variance_noise": torch.from_numpy(noises[i]) if ddim_eta > 0 else None}
        else:
            extra = {}
        x_ref = ref.step(output_ref, t_ref, x_ref, **extra).prev_sample
        assert x.dtype == np.float32
    return x, x_ref.numpy(), worst_input


# --- the packaged config and the interface ----------------------------------------------------

def test_packaged_config_has_the_published_sdxl_values():
    config = sdxl_config()
    for key, value in SDXL_SCHEDULER.items():
        assert config.get(key, "<missing>") == value, f"{key}: {config.get(key, '<missing>')!r}, expected {value!r}"
    # diffusers reads those keys from it as we do.
    euler, ddim = EulerDiscreteScheduler.from_config(config).config, DDIMScheduler.from_config(config).config
    for key, value in SDXL_SCHEDULER.items():
        ref = euler if key in euler else ddim
        assert ref[key] == value, f"diffusers reads {key}={ref[key]!r}, expected {value!r}"


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_settings_are_what_diffusers_reads(name):
    """Every setting we resolve (config value or diffusers' default) equals diffusers' config value."""
    ours = schedulers.create(name, 10)
    ref = diffusers_scheduler(name, 10, sdxl_config()).config
    for key, value in ours.settings.items():
        if key not in ref:  # DPMSolverMultistepScheduler reads sigma_min/sigma_max only if the config has them
            assert value is None, f"{name}: setting {key}={value!r} is not a {type(ref).__name__} config key"
            continue
        assert ref[key] == value, f"{name}: {key}={value!r}, diffusers has {ref[key]!r}"


def test_names_and_attributes():
    assert schedulers.NAMES == ("euler", "euler_a", "dpmpp_2m_karras", "ddim")
    for name in schedulers.NAMES:
        scheduler = schedulers.create(name, 7)
        assert scheduler.name == name and scheduler.num_inference_steps == 7 and scheduler.order == 1
        assert len(scheduler.timesteps) == 7
    assert schedulers.create("euler_a", 3).needs_noise and not schedulers.create("euler", 3).needs_noise
    assert schedulers.create("ddim", 3).sigmas is None


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UserError) as error:
        schedulers.create("dpm++", 20)
    for name in schedulers.NAMES:
        assert name in str(error.value), str(error.value)
    assert "'dpm++'" in str(error.value)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "20"])
def test_bad_step_count(steps):
    with pytest.raises(UserError, match="number of inference steps"):
        schedulers.create("euler", steps)


@pytest.mark.parametrize("name, key, value", [
    ("euler", "rescale_betas_zero_snr", True),
    ("euler", "beta_schedule", "squaredcos_cap_v2"),
    ("euler", "timestep_spacing", "uniform"),
    ("euler_a", "prediction_type", "sample"),
    ("dpmpp_2m_karras", "thresholding", True),
    ("ddim", "thresholding", True),
])
def test_unsupported_config_names_the_key(name, key, value):
    with pytest.raises(UserError, match=f"{key}={value!r}"):
        schedulers.create(name, 10, {**sdxl_config(), key: value})


def test_missing_noise_is_an_error():
    scheduler = schedulers.create("euler_a", 5)
    x = np.ones(LATENT_SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(x, 0, x)


# --- schedules and trajectories against diffusers ----------------------------------------------

def check_tables(name, ours, ref):
    ref_timesteps = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_timesteps.dtype, (
        f"{name}: timesteps are {ours.timesteps.dtype}, diffusers' {ref_timesteps.dtype}"
    )
    np.testing.assert_array_equal(ours.timesteps, ref_timesteps, err_msg=f"{name}: timesteps")
    if ours.sigmas is not None:
        err = rel_l2(ours.sigmas, ref.sigmas.numpy())
        assert ours.sigmas.shape == tuple(ref.sigmas.shape) and err <= TABLE_TOL, f"{name}: sigmas error {err:.3e}"
    init_err = abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) / float(ref.init_noise_sigma)
    assert init_err <= TABLE_TOL, f"{name}: init_noise_sigma {ours.init_noise_sigma} vs {float(ref.init_noise_sigma)}"


def check_trajectory(label, ours, ref, steps, monkeypatch, seed=0, ddim_eta=0.0):
    final, final_ref, worst_input = run_trajectories(ours, ref, steps, monkeypatch, seed, ddim_eta)
    err = rel_l2(final, final_ref)
    print(f"{label}: final latent relative L2 {err:.2e}, worst UNet input {worst_input:.2e}")
    assert worst_input <= FLOAT32_TOL, f"{label}: UNet input relative L2 error {worst_input:.3e} > {FLOAT32_TOL:.0e}"
    assert err <= FLOAT32_TOL, f"{label}: final latent relative L2 error {err:.3e} > {FLOAT32_TOL:.0e}"


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_matches_diffusers_on_sdxl_config(name, steps, monkeypatch):
    ours = schedulers.create(name, steps)
    ref = diffusers_scheduler(name, steps, sdxl_config())
    check_tables(name, ours, ref)
    check_trajectory(f"{name} {steps} steps", ours, ref, steps, monkeypatch, seed=steps)


# Other configs, to cover the branches SDXL's config does not take.
VARIANTS = {
    "v_prediction+trailing": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "linear betas+linspace": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                              "timestep_spacing": "linspace", "steps_offset": 0},
}
VARIANT_CASES = [(name, variant) for variant in VARIANTS for name in schedulers.NAMES] + [
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("euler", {"prediction_type": "sample"}),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m_karras", {"solver_type": "heun", "euler_at_final": True}),
    ("dpmpp_2m_karras", {"prediction_type": "sample", "lower_order_final": False}),
    ("ddim", {"set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 2.0}),
    ("ddim", {"prediction_type": "sample"}),
]


@pytest.mark.parametrize("steps", [4, 16])
@pytest.mark.parametrize("name, variant", VARIANT_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={w}" for k, w in v.items()))
def test_matches_diffusers_on_other_configs(name, variant, steps, monkeypatch):
    config = {**sdxl_config(), **(VARIANTS[variant] if isinstance(variant, str) else variant)}
    ours = schedulers.create(name, steps, config)
    ref = diffusers_scheduler(name, steps, config)
    check_tables(name, ours, ref)
    check_trajectory(f"{name} {variant} {steps} steps", ours, ref, steps, monkeypatch, seed=steps)


@pytest.mark.parametrize("steps", [1, 10, 30])
def test_ddim_with_eta_uses_the_given_noise(steps, monkeypatch):
    ours = schedulers.DDIM(steps, sdxl_config(), eta=0.7)
    assert ours.needs_noise
    ref = diffusers_scheduler("ddim", steps, sdxl_config())
    check_trajectory(f"ddim eta=0.7 {steps} steps", ours, ref, steps, monkeypatch, seed=steps, ddim_eta=0.7)


def test_dpmpp_2m_restarts_cleanly(monkeypatch):
    """The multistep history must not leak from one trajectory into the next."""
    ours = schedulers.create("dpmpp_2m_karras", 12)
    first = run_trajectories(ours, diffusers_scheduler("dpmpp_2m_karras", 12, sdxl_config()), 12, monkeypatch, 5)
    again = run_trajectories(ours, diffusers_scheduler("dpmpp_2m_karras", 12, sdxl_config()), 12, monkeypatch, 5)
    np.testing.assert_array_equal(first[0], again[0])
    assert rel_l2(first[0], first[1]) <= FLOAT32_TOL
