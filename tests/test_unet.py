"""Model oracle: tiny UNets saved by diffusers, our FP16 network run by netexec vs diffusers' forward.

Relative L2 error of `noise_pred` must stay within the fp16 budget of 1e-2, in the diffusers
folder layout and in the single-file (SGM) layout, and every checkpoint tensor is bound exactly once.
"""

from __future__ import annotations

from collections import Counter

import tiny_models  # noqa: F401  (sets HF_HUB_OFFLINE before diffusers loads)
import numpy as np
from oracle import count_reads, rel_l2
import pytest
import torch

from trt_sdxl import netexec, weights
from trt_sdxl.errors import UserError
from trt_sdxl.models import unet
from trt_sdxl.unet_config import UNetConfig

BUDGET = 1e-2

# (tiny config, batch, latent h, latent w, timesteps): heads != head size in all of them,
# non-square latents, batch 2, timesteps at both ends of the schedule.
CASES = [
    ("sdxl_like", 2, 16, 24, [999.0, 1.0]),
    ("deep", 1, 8, 8, [0.0]),
    ("refiner_like", 2, 16, 8, [998.0, 3.0]),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers unet folder, single-file checkpoint, torch model)."""
    root = tmp_path_factory.mktemp("unets")
    out = {}
    for name in {c[0] for c in CASES}:
        folder = tiny_models.save_tiny_unet(root / name / "unet", name, seed=7)
        single = tiny_models.make_single_file(folder, root / f"{name}.safetensors", dtype=torch.float16)
        out[name] = (folder, single, tiny_models.tiny_unet(name, seed=7))
    return out


def inputs_for(cfg: UNetConfig, batch, h, w, timesteps, seed=0):
    rng = np.random.default_rng(seed)
    ids = [128.0 * 8, 96.0 * 8, 0.0, 16.0, 1024.0, 768.0][: cfg.num_time_ids]
    return {
        "sample": rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32),
        "timestep": np.array(timesteps, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, cfg.cross_attention_dim)).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, cfg.text_embeds_dim)).astype(np.float32),
        "time_ids": np.tile(np.array(ids, np.float32), (batch, 1)),
    }


def diffusers_forward(model, feeds):
    with torch.no_grad():
        return model(
            torch.from_numpy(feeds["sample"]),
            torch.from_numpy(feeds["timestep"]),
            encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
            added_cond_kwargs={"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                               "time_ids": torch.from_numpy(feeds["time_ids"])},
        ).sample.numpy()


def ours(component, batch, h, w, feeds):
    net = unet.define(component, precision="fp16", batch=batch, latent_height=h, latent_width=w)
    cast = {k: v.astype(net.inputs[k][1]) for k, v in feeds.items()}
    return netexec.run(net.network, cast)["noise_pred"].astype(np.float64), net


@pytest.mark.parametrize("name,batch,h,w,timesteps", CASES)
@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_unet_matches_diffusers(saved, name, batch, h, w, timesteps, layout):
    folder, single, model = saved[name]
    if layout == "diffusers":
        component = weights.open_component(folder, "unet")
    else:  # a tiny single file is not SDXL-sized: give it its config, as a fine-tune's own config would be
        component = weights.open_component(single, "unet", config=dict(model.config))
    reads = count_reads(component)
    cfg = UNetConfig.parse(component.config)
    feeds = inputs_for(cfg, batch, h, w, timesteps)
    out, net = ours(component, batch, h, w, feeds)
    ref = diffusers_forward(model, feeds)
    assert out.shape == ref.shape
    err = rel_l2(out, ref)
    print(f"\n{name} {layout} batch {batch} {h}x{w} t={timesteps}: noise_pred rel L2 {err:.2e}")
    assert err <= BUDGET, f"{name} {layout} batch {batch} {h}x{w} t={timesteps}: noise_pred rel L2 {err:.3e}"
    # every tensor of the checkpoint bound exactly once
    assert set(reads) == set(component.keys())
    twice = [k for k, n in reads.items() if n != 1]
    assert not twice, f"tensors read more than once: {twice[:5]}"


def test_default_model_defines_and_counts_macs():
    net = unet.define(weights.open_component("weights/tiny-sdxl", "unet"), latent_height=16, latent_width=16)
    kinds = Counter(m.kind for m in net.macs)
    assert kinds["conv"] > 10 and kinds["linear"] > 10 and kinds["bmm"] > 0
    assert net.network.num_outputs == 1 and net.network.get_output(0).name == "noise_pred"


def test_unsupported_config_is_a_clear_error():
    cfg = dict(tiny_models.TINY_UNET_CONFIGS["sdxl_like"])
    cfg["use_linear_projection"] = False
    with pytest.raises(UserError, match="use_linear_projection=False is not supported"):
        UNetConfig.parse(cfg)


def test_latent_size_must_fit_the_downsampling(saved):
    folder = saved["sdxl_like"][0]
    with pytest.raises(UserError, match="multiples of 4"):
        unet.define(folder, latent_height=10, latent_width=16)


# One network for many shapes: latent sizes (square, wide, tall), CFG batches 2 and 4, 77 and 154 tokens.
DYNAMIC_SHAPES = [(2, 16, 16, 77), (4, 16, 24, 77), (2, 24, 8, 154), (4, 8, 16, 154)]


def test_one_dynamic_network_matches_diffusers_at_many_shapes(saved):
    from trt_sdxl.shapes import ImageProfile, Range

    folder, _, model = saved["sdxl_like"]
    component = weights.open_component(folder, "unet")
    cfg = UNetConfig.parse(component.config)
    profile = ImageProfile(batch=Range(1, 1, 2), height=Range(64, 128, 192), width=Range(64, 128, 192),
                           chunks=Range(1, 1, 2), resolutions="64-192")
    net = unet.define(component, profiles=[profile])
    assert net.inputs["sample"][0] == (-1, cfg.in_channels, -1, -1)
    assert net.inputs["encoder_hidden_states"][0] == (-1, -1, cfg.cross_attention_dim)
    assert net.profiles[0]["sample"] == ((2, 4, 8, 8), (2, 4, 16, 16), (4, 4, 24, 24))
    assert net.opt_inputs["sample"][0] == (2, 4, 16, 16)
    program = netexec.Program(net.network)
    for rows, h, w, tokens in DYNAMIC_SHAPES:
        feeds = inputs_for(cfg, rows, h, w, [999.0, 1.0] * (rows // 2), seed=rows + h)
        feeds["encoder_hidden_states"] = np.random.default_rng(h).standard_normal(
            (rows, tokens, cfg.cross_attention_dim)).astype(np.float32)
        out = program.run({k: v.astype(net.inputs[k][1]) for k, v in feeds.items()})["noise_pred"]
        err = rel_l2(out, diffusers_forward(model, feeds))
        print(f"\ndynamic UNet at CFG batch {rows}, latent {h}x{w}, {tokens} tokens: rel L2 {err:.2e}")
        assert out.shape == (rows, cfg.out_channels, h, w)
        assert err <= BUDGET, f"batch {rows} {h}x{w} {tokens} tokens: rel L2 {err:.3e}"


def test_dynamic_network_gives_the_static_numbers(saved):
    """A profile changes no arithmetic: at the defined shape the dynamic network's output is the static one's."""
    from trt_sdxl.shapes import ImageProfile, Range

    folder = saved["sdxl_like"][0]
    cfg = UNetConfig.parse(weights.open_component(folder, "unet").config)
    static = unet.define(folder, batch=2, latent_height=16, latent_width=24)
    dynamic = unet.define(folder, profiles=[ImageProfile(Range(1, 1, 2), Range(64, 128, 192), Range(64, 192, 192),
                                                         Range.one(1), "64-192")])
    assert static.inputs["sample"][0] == (2, 4, 16, 24) and not static.dynamic and dynamic.dynamic
    feeds = inputs_for(cfg, 2, 16, 24, [500.0, 20.0])
    a = netexec.run(static.network, {k: v.astype(static.inputs[k][1]) for k, v in feeds.items()})["noise_pred"]
    b = netexec.run(dynamic.network, {k: v.astype(dynamic.inputs[k][1]) for k, v in feeds.items()})["noise_pred"]
    np.testing.assert_array_equal(a, b)
    assert [m.macs for m in static.macs] == [m.macs for m in dynamic.macs], "MACs are counted at the opt shape"
