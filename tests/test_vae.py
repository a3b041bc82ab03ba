"""Model oracle: tiny SDXL-shaped VAEs saved by diffusers, our decoder network run by netexec vs
`AutoencoderKL.decode(latent).sample` (PyTorch, CPU, float32) on the same saved weights.

Budgets are relative L2 errors of `image`: fp32 agrees to float32 rounding (~2e-6; 1e-5 is tight
enough to catch a GroupNorm eps of 1e-5 instead of the Decoder's 1e-6); fp16 rounds every tensor
to 11 significant bits and stays near 2e-3; bf16 keeps 8 bits, 8x fp16's rounding error, and every
weight and every one of the decoder's ~200 tensors is rounded, which sums to 1.2-2e-2 on these
decoders (the ratio to fp16 is the 8 the mantissas predict), so its budget is 3e-2.
"""

from __future__ import annotations

import json
import warnings

import tiny_vae  # noqa: F401  (sets HF_HUB_OFFLINE before diffusers loads)
import numpy as np
from oracle import count_reads, rel_l2
import pytest
import torch
from diffusers import AutoencoderKL

from trt_sdxl import engines, netexec, weights
from trt_sdxl.errors import UserError
from trt_sdxl.models import vae

BUDGET = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}

# name -> (seed, weight dtype, config overrides)
MODELS = {
    "sdxl": (5, torch.float32, {}),
    # as madebyollin/sdxl-vae-fp16-fix: fp16 weights, force_upcast off
    "fp16_fix": (6, torch.float16, {"force_upcast": False}),
    "no_mid_attention": (7, torch.float32, {"mid_block_add_attention": False, "use_quant_conv": False,
                                            "use_post_quant_conv": False}),
}

# (model, precision, batch, latent h, latent w): square and non-square latents, batch 2 in each precision
CASES = [
    ("sdxl", "fp32", 1, 8, 8),
    ("sdxl", "fp32", 2, 8, 12),
    ("sdxl", "bf16", 2, 12, 8),
    ("sdxl", "bf16", 1, 8, 8),
    ("fp16_fix", "fp16", 2, 8, 12),
    ("fp16_fix", "fp16", 1, 16, 16),
    ("no_mid_attention", "fp32", 2, 4, 12),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers vae folder, the diffusers model loaded from it in float32)."""
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, (seed, dtype, overrides) in MODELS.items():
        folder = tiny_vae.save_tiny_vae(root / name / "vae", seed=seed, dtype=dtype, **overrides)
        out[name] = (folder, AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval())
    return out


@pytest.mark.parametrize("name,precision,batch,h,w", CASES)
def test_vae_decoder_matches_diffusers(saved, name, precision, batch, h, w):
    folder, model = saved[name]
    component = weights.open_component(folder, "vae")
    reads = count_reads(component)
    net = vae.define(component, precision=precision, batch=batch, latent_height=h, latent_width=w)
    assert net.inputs == {"latent": ((batch, 4, h, w), np.float32)}
    latent = np.random.default_rng(batch * 100 + h).standard_normal((batch, 4, h, w)).astype(np.float32)
    out = netexec.run(net.network, {"latent": latent})["image"]
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(latent)).sample.numpy()
    assert out.shape == ref.shape == (batch, 3, 8 * h, 8 * w) and out.dtype == np.float32
    err = rel_l2(out.astype(np.float64), ref)
    print(f"\n{name} {precision} batch {batch} {h}x{w}: image rel L2 {err:.2e}")
    assert err <= BUDGET[precision], f"{name} {precision} batch {batch} {h}x{w}: image rel L2 {err:.3e}"
    # every decoder tensor bound exactly once; the encoder's tensors skipped, none read
    encoder = {k for k in component.keys() if k.startswith(("encoder.", "quant_conv."))}
    assert encoder and set(component.skipped) == encoder and not encoder & set(reads)
    assert set(reads) == set(component.keys()) - encoder
    twice = [k for k, n in reads.items() if n != 1]
    assert not twice, f"tensors read more than once: {twice[:5]}"


def test_default_precision_is_fp32_and_output_is_image(saved):
    net = vae.define(saved["sdxl"][0], latent_height=4, latent_width=6)
    assert net.precision == "fp32" and net.config.force_upcast and net.config.upscale == 8
    out = net.network.get_output(0)
    assert net.network.num_outputs == 1 and out.name == "image" and tuple(out.shape) == (1, 3, 32, 48)


def test_fp16_warns_only_for_force_upcast_configs(saved):
    with pytest.warns(UserWarning, match="known to overflow in fp16") as caught:
        vae.define(saved["sdxl"][0], precision="fp16", latent_height=4, latent_width=4)
    assert len(caught) == 1 and "fp32 or bf16, or fp16-fix weights" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.define(saved["fp16_fix"][0], precision="fp16", latent_height=4, latent_width=4)
        for precision in ("fp32", "bf16"):
            vae.define(saved["sdxl"][0], precision=precision, latent_height=4, latent_width=4)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_tiny_vae_aot_build(saved, precision):
    name = "fp16_fix" if precision == "fp16" else "sdxl"
    net = vae.define(saved[name][0], precision=precision, batch=2, latent_height=8, latent_width=12)
    engine, seconds = engines.build_engine(net.definition, "SM89")
    assert engine.nbytes > 100_000, f"{precision}: engine of {engine.nbytes} bytes"


def test_precision_the_vae_cannot_take_names_flag_and_choices(saved):
    with pytest.raises(UserError, match=r"--vae-precision int8: expected one of fp32, bf16, fp16"):
        vae.define(saved["sdxl"][0], precision="int8")


def with_config(folder, **changes):
    """The VAE folder's weights, opened with its config changed by `changes`."""
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    return weights.open_component(folder, "vae", config=config)


@pytest.mark.parametrize("changes,needle", [
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, "up_block_types=.* is not supported"),
    ({"act_fn": "gelu"}, "act_fn='gelu' is not supported"),
    ({"norm_type": "spatial"}, "norm_type='spatial' is not supported"),
    ({"layers_per_block": 1}, "tensors were not used by the network"),
    ({"block_out_channels": [8, 16, 32, 64]}, "decoder.conv_in.weight.* has shape"),
])
def test_config_that_does_not_fit_is_a_clear_error(saved, changes, needle):
    with pytest.raises(UserError, match=needle):
        vae.define(with_config(saved["sdxl"][0], **changes), latent_height=4, latent_width=4)


def test_one_dynamic_decoder_matches_diffusers_at_many_shapes(saved):
    from trt_sdxl.shapes import ImageProfile, Range

    folder, model = saved["sdxl"]
    net = vae.define(folder, precision="fp32", profiles=[ImageProfile(Range(1, 1, 2), Range(32, 64, 128),
                                                                      Range(32, 64, 128), Range.one(1), "32-128")])
    assert net.inputs["latent"][0] == (-1, 4, -1, -1)
    program = netexec.Program(net.network)
    for batch, h, w in [(1, 8, 8), (2, 8, 12), (1, 16, 4), (2, 4, 16)]:
        z = np.random.default_rng(h * w).standard_normal((batch, 4, h, w)).astype(np.float32)
        out = program.run({"latent": z})["image"]
        with torch.no_grad():
            ref = model.decode(torch.from_numpy(z)).sample.numpy()
        err = rel_l2(out, ref)
        print(f"\ndynamic VAE decoder at batch {batch}, latent {h}x{w}: rel L2 {err:.2e}")
        assert out.shape == (batch, 3, 8 * h, 8 * w) and err <= BUDGET["fp32"]
