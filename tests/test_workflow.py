"""The calibration workflow by what its networks cost: how many UNets each tuning mode makes (a
counting factory over netexec declaring its networks expensive, as a GPU's engines are, or cheap),
the per-layer scores against independent references, the engines a GPU calibration hands to the
build, the run's timing cache, and `--dry-run`'s plan against what a run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trt_sdxl import backend, build, configs, denoising, schedulers, weights
from trt_sdxl.calibration import estimate, tune, workflow
from trt_sdxl.components import DEFAULT_MODEL
from trt_sdxl.executors import NetexecExecutor
from trt_sdxl.models import unet
from trt_sdxl.quant.percentile import AmaxRule
from trt_sdxl.quant.plan import PATCH_GRID, QuantPlan
from trt_sdxl.quant.recipe import layer_kind
from trt_sdxl.quant.smoothquant import quantized_output_error
from trt_sdxl.runtime import cuda

REPO = Path(build.__file__).resolve().parent.parent
PROMPTS = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker"]
STEPS = 3
LATENT = 8  # the tiny default's 64x64 images


class CountingFactory:
    """netexec networks behind the factory seam, declaring themselves `expensive` or not, counting every
    network made (kind, images, for_build, precision) and every UNet call (CFG batch, precision)."""

    def __init__(self, expensive: bool):
        self.inner = workflow.netexec_factory(DEFAULT_MODEL, 1, LATENT, LATENT)
        self.expensive = expensive
        self.made: list[tuple] = []
        self.unet_calls: Counter = Counter()

    def __call__(self, kind, images=None, for_build=False, **options):
        executor = self.inner(kind, images=images, for_build=for_build, **options)
        precision = options.get("precision", "fp16")
        self.made.append((kind, images, for_build, precision))
        if kind == "unet":
            run, rows = executor.run, executor.inputs["sample"][0][0]

            def counted(feeds):
                self.unet_calls[(rows, precision)] += 1
                return run(feeds)

            executor.run = counted
        return executor

    def unets(self):
        return [m for m in self.made if m[0] == "unet"]


def run_workflow(tmp_path, recipe: str, expensive: bool):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    factory = CountingFactory(expensive)
    component = weights.open_component(DEFAULT_MODEL, "unet")
    table = workflow.calibrate_and_tune(DEFAULT_MODEL, component, recipe, height=8 * LATENT, width=8 * LATENT,
                                        prompts_file=str(prompts), steps=STEPS, factory=factory)
    return factory, table, component


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    """An INT8 calibration of the tiny default (6 prompts x 3 steps, 2 held aside) on expensive networks."""
    return run_workflow(tmp_path_factory.mktemp("per_layer"), "int8", expensive=True)


def planned_calls(plan) -> Counter:
    calls = Counter()
    for _, n, rows, precision in plan.unet_calls:
        calls[(rows, precision)] += n
    return calls


# ---------------------------------------------------------------- the per-layer mode


def test_expensive_networks_build_two_unets_and_the_chosen_one_is_the_builds(per_layer):
    factory, table, _ = per_layer
    unets = factory.unets()
    print(f"\nUNet networks made: {unets}")
    assert len(unets) <= 3 and len(unets) == 2, unets  # calibration taps (also FP16 reference), the chosen one
    assert unets[0][3] == "fp16" and not unets[0][2]
    assert unets[1] == ("unet", 1, True, "int8")  # at the build's batch, for the build
    assert Counter(m[0] for m in factory.made if m[0] != "unet") == {"text_encoder": 1, "text_encoder_2": 1, "vae": 1}
    report = table.meta["tuned"]["int8"]["report"]
    assert report["mode"] == "per-layer" and report["layers_scored"] > 100 and not report["layers_without_rows"]
    assert {"conv", "linear"} == {c["kind"] for c in report["candidates"]}
    # every (smoothing, linear rule) pair and every conv rule was scored
    assert len(report["candidates"]) == len(tune.CANDIDATE_RULES["conv"]) + 3 * len(tune.CANDIDATE_RULES["linear"])


def test_the_dry_run_plan_counts_what_the_per_layer_run_did(per_layer):
    factory, _, _ = per_layer
    plan = workflow.plan_calibration("int8", expensive=True, prompts=PROMPTS, steps=STEPS)
    assert [p for _, p in plan.unet_networks] == [m[3] for m in factory.unets()]
    assert planned_calls(plan) == factory.unet_calls, (plan.unet_calls, factory.unet_calls)


def test_the_reported_image_scores_are_the_chosen_networks_against_fp16(per_layer):
    """Run independently: the FP16 UNet (no taps) and the chosen INT8 network from the table over the
    held-aside prompts x seeds; the report's PSNR and latent error are theirs, so the calibration
    network's references were the FP16 UNet's."""
    factory, table, _ = per_layer
    make = workflow.netexec_factory(DEFAULT_MODEL, 1, LATENT, LATENT)
    encode = workflow.text_conditioning(DEFAULT_MODEL, make, 8 * LATENT, 8 * LATENT)
    decode = workflow.image_decoder(DEFAULT_MODEL, make)
    held = tune.HeldAside.of(encode, workflow.tuning_prompts(table.meta), tune.SEEDS_PER_PROMPT, 0, (4, LATENT, LATENT))
    sched = lambda: schedulers.create("euler", STEPS)  # noqa: E731
    calibration_images = factory.unets()[0][1]  # the reference ran at the calibration network's batch
    held.reference_latents = held.run(make("unet", images=calibration_images), sched(), 5.0)
    held.reference_images = decode(held.reference_latents)
    chosen = make("unet", images=1, precision="int8", calibration=table)
    latents = held.run(chosen, sched(), 5.0)
    scores = held.score(latents, decode(latents))
    report = table.meta["tuned"]["int8"]["report"]
    print(f"\nreport PSNR {report['psnr']:.4f} dB, independent {scores['psnr']:.4f} dB")
    assert abs(report["psnr"] - scores["psnr"]) < 1e-6
    assert abs(report["trajectory_error"] - scores["latent_error"]) < 1e-9
    assert 20.0 < report["psnr"] < 99.0


def test_layer_errors_match_the_alpha_searchs_own_error(per_layer):
    """A linear or conv layer's per-layer NSR is the square of smoothquant.quantized_output_error (written
    for the alpha search) on the same rows, weights, smoothing and activation amax."""
    _, table, component = per_layer
    macs, heads = workflow.unet_shapes(component, (4, LATENT, LATENT))
    alphas, _ = tune.tune_alphas(table, "int8", component)
    plans = {s: QuantPlan("int8", table, component, rule=tune.MAX, alphas=a)
             for s, a in tune.smoothing_settings(alphas).items()}
    measure = tune.LayerErrors(table, "int8", component, macs, heads)
    errors = measure.errors(plans, {k: (tune.MAX,) for k in ("conv", "linear", "attention")})
    checked = Counter()
    for path, by_candidate in errors.items():
        kind = layer_kind(path)
        for setting in ("none", "searched"):
            plan = plans[setting]
            s = plan.scales.get(path)
            w = component.get(f"{path}.weight", dtype=np.float32)
            x_amax = plan.input_scale(path) * 127.0
            expected = quantized_output_error(table.rows[path].astype(np.float64), [w.reshape(w.shape[0], -1)], s,
                                              x_amax, "int8") ** 2
            noise, signal = by_candidate[(setting, tune.MAX)]
            assert noise / signal == pytest.approx(expected, rel=1e-3), (path, setting)
            checked[kind, s is not None] += 1
    assert checked[("conv", False)] > 10 and checked[("linear", True)] > 10, checked


def test_conv_rows_are_im2col_patches_of_the_conv_input():
    """`rows:<conv>` times the flattened kernel, plus the bias, is the conv's output at the patch centres
    (stride-1 convs; patches over the border are zero-padded as the conv pads)."""
    component = weights.open_component(DEFAULT_MODEL, "unet")
    net = unet.define(component, batch=2, latent_height=LATENT, latent_width=LATENT, calibration_taps=True)
    network = net.network
    layers = {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}
    convs = [p for p in net.definition.taps.paths if p in layers and layers[p].type.name == "CONVOLUTION"
             and ".downsamplers." not in p]  # the downsamplers' stride 2 puts their outputs elsewhere
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(dtype) for n, (shape, dtype) in net.inputs.items()}
    feeds["timestep"] = np.full(feeds["timestep"].shape, 500.0, np.float32)
    wanted = [f"rows:{p}" for p in convs] + [layers[p].get_output(0).name for p in convs]
    outputs = NetexecExecutor(net, wanted).run(feeds)
    worst = 0.0
    for path in convs:
        y = outputs[layers[path].get_output(0).name]  # [B, O, H, W]
        w = component.get(f"{path}.weight", dtype=np.float64)
        bias = component.get(f"{path}.bias", dtype=np.float64)
        predicted = outputs[f"rows:{path}"] @ w.reshape(w.shape[0], -1).T + bias  # [B, R, O]
        centres = np.floor((np.arange(PATCH_GRID) + 0.5) * y.shape[2] / PATCH_GRID).astype(int)
        at = np.stack([y[:, :, i, j] for i in centres for j in centres], axis=1)  # [B, R, O]
        worst = max(worst, float(np.abs(predicted - at).max() / np.abs(at).max()))
    print(f"\n{len(convs)} convs, worst max error {worst:.2e} of the output's range")
    assert len(convs) > 20 and worst < 3e-3


def test_head_dims_are_the_configs():
    component = weights.open_component(DEFAULT_MODEL, "unet")
    _, heads = workflow.unet_shapes(component, (4, LATENT, LATENT))
    channels = {a: component.shape(a[:-len(".attention")] + ".to_q.weight")[0] for a in heads}
    cfg = component.config
    assert heads and all(channels[a] // heads[a] in cfg["attention_head_dim"] for a in heads), heads


# ---------------------------------------------------------------- the image-space mode


def test_cheap_networks_keep_the_image_space_tuning(tmp_path):
    """netexec's factory declares its networks cheap: one network per candidate, judged in image space,
    as before the per-layer mode (the same candidates, in the same order, as tune.tune makes)."""
    assert workflow.netexec_factory(DEFAULT_MODEL, 1, LATENT, LATENT).expensive is False
    factory, table, _ = run_workflow(tmp_path, "int8", expensive=False)
    report = table.meta["tuned"]["int8"]["report"]
    candidates = report["candidates"]
    assert "mode" not in report and all("psnr" in c for c in candidates)
    unets = factory.unets()
    assert len(unets) == 2 + len(candidates) and len(candidates) <= tune.image_space_candidates("int8")
    assert [u[3] for u in unets[:2]] == ["fp16", "fp16"] and all(u[3] == "int8" for u in unets[2:])
    assert report["psnr"] == max(c["psnr"] for c in candidates)
    plan = workflow.plan_calibration("int8", expensive=False, prompts=PROMPTS, steps=STEPS)
    calls = planned_calls(plan)
    calls[(plan.unet_calls[-1][2], "int8")] = STEPS * len(candidates)  # the plan counts the most candidates
    assert calls == factory.unet_calls


# ---------------------------------------------------------------- the engines the build takes


def test_build_writes_the_engines_calibration_kept(tmp_path, monkeypatch):
    """A GPU calibration keeps what it built for the build's target and options; the build writes those
    plans as they are, with the keys NetworkFactory networks get (the same networks the build defines),
    and builds only the others."""
    from trt_sdxl import engines as engines_module
    from trt_sdxl.quant.table import CalibrationTable

    component = weights.open_component(DEFAULT_MODEL, "unet")
    paths = unet.placement_table(component).tensor_amax
    fake_plans = {}

    def calibrate(model, unet_component, recipe, *, engines, **kwargs):
        table = CalibrationTable(meta={"format_version": 2, "unet_fingerprint": unet_component.fingerprint(),
                                       "scheduler": "euler", "steps": 1, "cfg": 5.0, "prompts": 1, "seed": 0},
                                 tensor_amax={p: np.ones((1, 1), np.float32) for p in paths},
                                 channel_amax={p: np.ones((3, 1, 1), np.float32) for p in paths})
        table.set_choices(recipe, AmaxRule(), {}, {"psnr": 40.0})

        def record(defined, kind, images, for_build):
            plan = memoryview(f"{kind} as calibration built it".encode())  # as TensorRT's host memory: nbytes
            fake_plans[kind] = plan
            engines.keep(engines.key_of(kind, defined, images, (LATENT, LATENT), engines.target), plan, 1.0)

        make = workflow.NetworkFactory(model, engines.images, LATENT, LATENT, record, expensive=True,
                                       vae_precision=engines.vae_precision,
                                       attention_check=engines_module.fused_attention_check(engines.target))
        make("text_encoder")
        make("unet", images=engines.images, for_build=True, precision=recipe, calibration=table)
        return table

    monkeypatch.setattr(workflow, "calibrate_and_tune", calibrate)
    built = []
    real_build = build.build_engine
    monkeypatch.setattr(build, "build_engine", lambda d, *a, **k: built.append(d) or real_build(d, *a, **k))
    out = tmp_path / "engines"
    # fp8 builds engines with TensorRT for RTX too (as fp8_gemm); the matrix says what it builds
    manifest = build.build(DEFAULT_MODEL, out, precision="fp8", components=("text_encoder", "unet", "vae"))
    recipe = manifest["engines"]["unet"]["precision"]
    assert (out / manifest["engines"]["unet"]["file"]).read_bytes() == fake_plans["unet"]
    assert (out / manifest["engines"]["text_encoder"]["file"]).read_bytes() == fake_plans["text_encoder"]
    assert len(built) == 1  # the VAE alone: calibration kept no VAE here
    assert recipe in ("fp8", "fp8_gemm")


def test_gpu_factory_keeps_the_builds_engines_for_its_target(tmp_path, monkeypatch):
    """gpu_factory's own path with the GPU pieces replaced (a CUDA device, TensorRT's builder and runtime:
    here a "plan" carries its network, which netexec runs): it builds each network once, for the build's
    target and level with the run's timing cache, and keeps for the build exactly what the build will
    look up — the chosen UNet, the text encoders, the VAE — and not the calibration network."""
    from types import SimpleNamespace

    from trt_sdxl import dtypes, engines as engines_module
    from trt_sdxl.runtime import engine as engine_module

    builds = []

    class Plan:
        nbytes = 1 << 20

        def __init__(self, definition):
            self.definition = definition

    def fake_build(definition, target, log, optimization_level=None, timing_cache=None):
        builds.append((target, optimization_level, timing_cache))
        return Plan(definition), 1.0

    def executor_of(engine):
        network = engine.plan.definition.network
        inputs = {t.name: (tuple(t.shape), dtypes.to_numpy(t.dtype))
                  for t in (network.get_input(i) for i in range(network.num_inputs))}
        return NetexecExecutor(SimpleNamespace(network=network, inputs=inputs))

    monkeypatch.setattr(cuda, "probe", lambda: (1, ""))
    monkeypatch.setattr(cuda.Device, "open", classmethod(lambda cls, ordinal=0: None))
    monkeypatch.setattr(engines_module, "present_gpu_target", lambda: "SM89")
    monkeypatch.setattr(engines_module, "build_engine", fake_build)
    monkeypatch.setattr(engine_module, "Engine", lambda plan, name: SimpleNamespace(plan=plan, name=name))
    monkeypatch.setattr(engine_module, "EngineExecutor", executor_of)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    component = weights.open_component(DEFAULT_MODEL, "unet")
    wanted = workflow.BuildEngines("SM89", images=1)
    table = workflow.calibrate_and_tune(DEFAULT_MODEL, component, "int8", height=8 * LATENT, width=8 * LATENT,
                                        prompts_file=str(prompts), steps=STEPS, engines=wanted)
    assert len(builds) == 5 and {(t, c) for t, _, c in builds} == {("SM89", wanted.timing_cache)}
    assert sorted(level for _, level, _ in builds if level is not None) == [4]  # the chosen UNet's
    latent = (LATENT, LATENT)
    for component_name, precision, batch in (("unet", "int8", 2), ("text_encoder", "fp16", 1),
                                             ("text_encoder_2", "fp16", 1), ("vae", "fp32", 1)):
        key = workflow.BuildEngines.key(component_name, precision, batch,
                                        latent if component_name in ("unet", "vae") else None, "SM89",
                                        wanted.level(component_name, precision),
                                        table if component_name == "unet" else None)
        assert wanted.take(key) is not None, component_name
    assert not wanted.kept  # nothing else: the calibration network is not an engine of the folder


# ---------------------------------------------------------------- the timing cache


def test_timing_cache_is_created_once_and_attached_to_every_build(monkeypatch):
    from trt_sdxl.engines import TimingCache

    class Config:
        created = 0

        def __init__(self):
            self.attached = None

        def create_timing_cache(self, data):
            assert data == b""
            Config.created += 1
            return object()

        def set_timing_cache(self, cache, ignore_mismatch):
            assert ignore_mismatch is False
            self.attached = cache
            return True

    cache = TimingCache()
    monkeypatch.setattr(backend.Backend, "has_timing_cache", property(lambda self: True))
    configs_ = [Config() for _ in range(3)]
    assert all(cache.attach(c) for c in configs_)
    assert Config.created == 1 and len({id(c.attached) for c in configs_}) == 1 and configs_[0].attached is not None
    monkeypatch.setattr(backend.Backend, "has_timing_cache", property(lambda self: False))
    other = Config()
    assert not TimingCache().attach(other) and other.attached is None


def test_tensorrt_for_rtx_gets_no_timing_cache():
    be = backend.get()
    assert be.has_timing_cache == (not be.is_rtx)


# ---------------------------------------------------------------- --dry-run


def test_gpu_figures_are_the_rooflines():
    roofline = json.loads((REPO / "tools" / "roofline.json").read_text())
    assert estimate.FULL_SIZE_MACS == roofline["totals"]["macs"] and roofline["batch"] == 2
    names = {"H100": "H100 SXM", "H200": "H200 SXM"}
    for gpu, (_, ms) in estimate.UNET_MS.items():
        for precision, value in ms.items():
            assert value == pytest.approx(roofline["results"][names.get(gpu, gpu)][precision]["ms_fused"], abs=0.006)
    assert estimate.gpu_figures("SM89", "NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert estimate.gpu_figures("SM90", "NVIDIA H100 80GB HBM3").name == "H100"
    assert estimate.gpu_figures("SM89").name == "RTX 4090" and estimate.gpu_figures("SM86") is None


def full_size_config_folder(root: Path) -> Path:
    """A pipeline folder with SDXL base's UNet config and no weights: what a dry run plans from."""
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps(configs.load("sdxl_base_1.0", "unet")))
    return root


def test_dry_run_of_a_full_size_int8_build_on_an_rtx_4090(tmp_path):
    if cuda.probe()[0] > 0:
        pytest.skip("a GPU is present: the plan is for it")
    lines = []
    result = build.dry_run(full_size_config_folder(tmp_path / "sdxl"), precision="int8", target="SM89",
                           out=lines.append)
    print("\n" + "\n".join(lines))
    assert result["recipe"] == "int8" and result["tuning"] == "per layer" and result["gpu"] == "RTX 4090"
    assert result["unet_engine_builds"] == 2 and result["engine_builds"] == 5 and result["written"] == []
    # calibration: 64 prompts x 20 steps, 8 per call; FP16 reference: 16 images x 10 steps at that batch; the
    # chosen INT8 network at the build's batch (1 image): 16 x 10 calls
    expected_calls = (160 * 8 * 95.98 + 20 * 8 * 95.98 + 160 * 46.03) / 60_000
    assert result["call_minutes"] == pytest.approx(expected_calls, rel=1e-6)
    builds = estimate.BUILD_MINUTES["tensorrt"]
    assert result["build_minutes"] == pytest.approx(builds["unet"] + builds["unet_8bit"] + builds["text_encoder"]
                                                    + builds["text_encoder_2"] + builds["vae"])
    assert any("planned for NVIDIA TensorRT" in line for line in lines) == backend.get().is_rtx


def test_dry_run_of_the_default_model_counts_what_its_build_would_run(tmp_path):
    lines = []
    result = build.dry_run(DEFAULT_MODEL, precision="int8", target="SM89", calibration_prompts=None,
                           out=lines.append)
    print("\n" + "\n".join(lines))
    prompts = workflow.load_prompts(workflow.model_prompts(DEFAULT_MODEL))
    expensive = cuda.probe()[0] > 0
    plan = workflow.plan_calibration("int8", expensive=expensive, prompts=prompts, steps=20)
    assert result["unet_calls"] == plan.unet_calls and result["minutes"] > 0
    if not expensive:
        assert result["tuning"] == "image space" and result["unet_engine_builds"] == 1
        assert len(result["unet_networks"]) == 2 + tune.image_space_candidates("int8")


def test_dry_run_cli_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trt_sdxl.build", "--precision", "int8", "--dry-run", "--target",
                           "SM89", "--out", str(tmp_path / "engines")], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dry run: ") and "UNet calls:" in proc.stdout and "estimate" in proc.stdout
    assert not (tmp_path / "engines").exists()


def test_dry_run_refuses_what_the_build_refuses(tmp_path):
    from trt_sdxl.errors import UserError

    with pytest.raises(UserError, match="--batch 0"):
        build.dry_run(DEFAULT_MODEL, precision="int8", batch=0, out=lambda line: None)
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "config.json").write_text(json.dumps(weights.open_component(DEFAULT_MODEL, "unet").config))
    with pytest.raises(UserError, match="without them the dry run plans SDXL base UNets only"):
        build.dry_run(other, precision="int8", out=lambda line: None)
    from trt_sdxl.quant.table import FORMAT_VERSION, CalibrationTable

    CalibrationTable(meta={"format_version": FORMAT_VERSION, "unet_fingerprint": "0" * 64}).save(tmp_path / "t.npz")
    with pytest.raises(UserError, match="made for another UNet checkpoint"):
        build.dry_run(DEFAULT_MODEL, precision="int8", calibration=str(tmp_path / "t.npz"), out=lambda line: None)


def test_trajectory_of_a_batch_is_its_images_alone():
    """What lets the reference run at the calibration network's batch and the chosen network at the
    build's: per-image seeds, rows independent (checked on one pair of batch sizes)."""
    component = weights.open_component(DEFAULT_MODEL, "unet")
    make = workflow.netexec_factory(DEFAULT_MODEL, 1, LATENT, LATENT)
    encode = workflow.text_conditioning(DEFAULT_MODEL, make, 8 * LATENT, 8 * LATENT)
    cond = encode(["a coat", "a dress"])
    one = denoising.trajectory(NetexecExecutor(unet.define(component, batch=2, latent_height=LATENT,
                                                           latent_width=LATENT)),
                               cond, schedulers.create("euler", 2), 5.0, 7, (2, 4, LATENT, LATENT))
    two = denoising.trajectory(NetexecExecutor(unet.define(component, batch=4, latent_height=LATENT,
                                                           latent_width=LATENT)),
                               cond, schedulers.create("euler", 2), 5.0, 7, (2, 4, LATENT, LATENT))
    assert np.allclose(one, two, rtol=0, atol=1e-3 * np.abs(two).max())
