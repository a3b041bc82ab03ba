"""Model oracle: tiny SDXL text encoders saved by transformers, our networks run by netexec vs
transformers' forward (CPU, float32), and SDXL's whole text conditioning (our tokenizer + both
encoders) vs diffusers' `StableDiffusionXLPipeline.encode_prompt`.

Relative L2 error must stay within the fp16 budget of 1e-2 for `hidden_states` (transformers'
hidden_states[-2]) and `text_embeds`, for the legacy pooling rule (eos_token_id 2, SDXL's configs:
pool at input_ids.argmax()) and the newer one (pool at the first eos_token_id).
"""

from __future__ import annotations

import shutil
import warnings

import tiny_clip  # first: sets HF_HUB_OFFLINE before transformers loads
import tiny_models
import numpy as np
from oracle import count_reads, rel_l2
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trt_sdxl import engines, netexec, weights
from trt_sdxl import layers as L
from trt_sdxl.errors import UserError
from trt_sdxl.models import clip
from trt_sdxl.tokenizer import open_tokenizer

BUDGET = 1e-2
EOS_ID = len(tiny_clip.tiny_vocab()[0]) - 1
STYLES = {"legacy": 2, "new": EOS_ID}  # config eos_token_id
# one prompt padded (with EOS by tokenizer, "!" by tokenizer_2), one filling all 77 positions (truncated)
PROMPTS = ["A cat on the moon, oil painting!! It's lovely.", "the old lighthouse by the sea at sunset, " * 12]
FOLDERS = {1: "text_encoder", 2: "text_encoder_2"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """style -> pipeline-shaped folder with both tiny encoders and tokenizers."""
    root = tmp_path_factory.mktemp("text")
    return {style: tiny_clip.save_tiny_text_components(root / style, seed=5, eos_token_id=eos)
            for style, eos in STYLES.items()}


def transformers_model(folder, encoder):
    cls = CLIPTextModel if encoder == 1 else CLIPTextModelWithProjection
    return cls.from_pretrained(folder / FOLDERS[encoder]).eval()


def transformers_forward(model, ids):
    """(hidden_states[-2], text_embeds or None) as SDXL reads them."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    embeds = getattr(out, "text_embeds", None)
    return out.hidden_states[-2].numpy(), None if embeds is None else embeds.numpy()


def tokens(folder, encoder, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt's truncation warning is test_tokenizer's business
        return open_tokenizer(folder, encoder).encode(prompts)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("encoder", [1, 2])
@pytest.mark.parametrize("style", STYLES)
def test_encoder_matches_transformers(saved, style, encoder, precision):
    folder = saved[style]
    ids = tokens(folder, encoder, PROMPTS)
    tok = open_tokenizer(folder, encoder)
    assert ids[1, -1] == tok.eos_id and ids[1, -2] not in (tok.pad_id, tok.eos_id), "the long prompt fills all 77"
    assert ids[0, -1] == tok.pad_id, "the short prompt is padded"
    component = weights.open_component(folder, FOLDERS[encoder])
    reads = count_reads(component)
    net = clip.define(component, encoder, batch=2, precision=precision)
    assert net.inputs == {"input_ids": ((2, 77), np.int32)}
    out = netexec.run(net.network, {"input_ids": ids})
    hidden, embeds = transformers_forward(transformers_model(folder, encoder), ids)
    errors = {"hidden_states": rel_l2(out["hidden_states"], hidden)}
    if encoder == 2:
        errors["text_embeds"] = rel_l2(out["text_embeds"], embeds)
    else:
        assert "text_embeds" not in out
    print(f"\n{style} encoder {encoder} {precision}: " + ", ".join(f"{k} rel L2 {v:.2e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err <= BUDGET, f"{style} encoder {encoder} {precision}: {name} rel L2 {err:.3e}"
    # every tensor bound exactly once; encoder 1's last layer and final LayerNorm skipped, not read
    assert set(reads) | set(component.skipped) == set(component.keys())
    assert not set(reads) & set(component.skipped) and all(n == 1 for n in reads.values())
    last = f"text_model.encoder.layers.{net.config.num_hidden_layers - 1}."
    expected_skips = {k for k in component.keys() if encoder == 1 and (
        k.startswith(last) or k.startswith("text_model.final_layer_norm."))}
    assert set(component.skipped) == expected_skips


@pytest.mark.parametrize("style", ["legacy", "mid_eos"])
def test_pooling_rule_on_crafted_ids(tmp_path, saved, style):
    """Ids where the two rules disagree: the largest id repeated (legacy: its first occurrence) and an
    eos_token_id that is not the largest id (newer rule: the first position holding it)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 700, (3, 77)).astype(np.int32)
    if style == "legacy":
        folder = saved["legacy"]
        ids[0, [5, 40]] = 750  # a tie for the largest id
        ids[1, 76] = 760
        ids[2, [0, 76]] = 790
        expected = [5, 76, 0]
    else:
        eos = 400
        folder = tmp_path
        tiny_clip.tiny_text_encoder(2, seed=6, eos_token_id=eos).save_pretrained(folder / "text_encoder_2")
        ids[ids == eos] = 401
        ids[0, [10, 50]] = eos
        ids[1, 70] = eos
        ids[:, 30] = 800  # the largest id, which the legacy rule would pick
        expected = [10, 70, 0]  # row 2 has no eos: transformers takes position 0
    if style == "legacy":
        assert ids.argmax(-1).tolist() == expected
    else:
        assert (ids == eos).argmax(-1).tolist() == expected and ids.argmax(-1).tolist() == [30, 30, 30]
    net = clip.define(folder, 2, batch=3, precision="fp32")
    out = netexec.run(net.network, {"input_ids": ids})
    _, embeds = transformers_forward(transformers_model(folder, 2), ids)
    err = rel_l2(out["text_embeds"], embeds)
    print(f"\npooling {style}: text_embeds rel L2 {err:.2e}")
    assert err <= 1e-5, f"pooling {style}: text_embeds rel L2 {err:.3e}"


def test_pooling_layer_helpers():
    """argmax_first takes the first of tied maxima (torch.argmax's rule); gather_tokens picks x[b, index[b]]."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 50, (4, 77)).astype(np.int32)
    ids[0, [3, 9, 60]] = 99
    ids[1, :] = 7  # all tied
    ids[2, 76] = 99
    x = rng.standard_normal((4, 77, 6)).astype(np.float32)
    d = L.new_definition(weights=None, precision="fp32")
    index = L.argmax_first(d, L.add_input(d, "ids", ids.shape, np.int32), 100)
    picked = L.gather_tokens(d, L.add_input(d, "x", x.shape, np.float32), index)
    L.mark_output(d, index, "index")
    L.mark_output(d, picked, "picked")
    out = netexec.run(d.network, {"ids": ids, "x": x})
    want = torch.from_numpy(ids).argmax(-1).numpy()
    assert out["index"].dtype == np.int32 and out["index"][:, 0].tolist() == want.tolist() == [3, 0, 76, want[3]]
    np.testing.assert_array_equal(out["picked"], x[np.arange(4), want])


def diffusers_pipeline(folder, force_zeros_for_empty_prompt=True):
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=32)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=transformers_model(folder, 1), text_encoder_2=transformers_model(folder, 2),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=tiny_models.tiny_unet("sdxl_like"), scheduler=EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


def our_conditioning(folder, prompts, precision="fp16"):
    """(prompt_embeds [B, 77, C1 + C2], pooled_prompt_embeds [B, P]): what SDXL's UNet is given."""
    outs = [netexec.run(clip.define(folder, e, batch=len(prompts), precision=precision).network,
                        {"input_ids": tokens(folder, e, prompts)}) for e in (1, 2)]
    return np.concatenate([outs[0]["hidden_states"], outs[1]["hidden_states"]], axis=-1), outs[1]["text_embeds"]


def test_conditioning_matches_diffusers(saved):
    folder = saved["legacy"]
    negative = ["blurry, low quality!", ""]
    pipe = diffusers_pipeline(folder)
    with torch.no_grad():
        ref = [t.numpy() for t in pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True, negative_prompt=negative)]
    ours = [*our_conditioning(folder, PROMPTS), *our_conditioning(folder, negative)]
    ours = [ours[0], ours[2], ours[1], ours[3]]  # diffusers' order: embeds, negative embeds, pooled, negative pooled
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    errors = {name: rel_l2(o, r) for name, o, r in zip(names, ours, ref)}
    print("\nconditioning vs diffusers: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert ref[0].shape == (2, 77, 64) and ref[2].shape == (2, 32)  # the tiny UNets' widths
    for name, err in errors.items():
        assert err <= BUDGET, f"{name}: rel L2 {err:.3e}"


def test_empty_prompt_matches_diffusers(saved):
    """With force_zeros_for_empty_prompt False diffusers encodes "" as the negative prompt (with it True,
    as in SDXL's config, it zeroes the negative embeds instead: the pipeline's rule to follow)."""
    folder = saved["legacy"]
    pipe = diffusers_pipeline(folder, force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True, negative_prompt=None)
    embeds, pooled = our_conditioning(folder, [""])
    errors = (rel_l2(embeds, negative.numpy()), rel_l2(pooled, negative_pooled.numpy()))
    print(f"\nempty prompt vs diffusers: prompt_embeds {errors[0]:.2e}, pooled {errors[1]:.2e}")
    assert max(errors) <= BUDGET, f"empty prompt: rel L2 {errors}"


@pytest.mark.parametrize("encoder", [1, 2])
def test_aot_build(saved, encoder):
    net = clip.define(saved["legacy"], encoder, batch=2, precision="fp16")
    engine, seconds = engines.build_engine(net.definition, "SM89")
    assert engine.nbytes > 100_000, f"encoder {encoder}: engine of {engine.nbytes} bytes"


def test_missing_text_encoder_2_is_a_clear_error(saved, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(saved["legacy"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UserError, match="has no text_encoder_2/ folder"):
        clip.define(folder, encoder=2)
    with pytest.raises(UserError, match=r"encoder 3: expected 1 \(text_encoder\) or 2"):
        clip.define(folder, encoder=3)


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"num_attention_heads": 5}, "hidden_size=32 is not a multiple of num_attention_heads=5"),
    ({"max_position_embeddings": 64}, "max_position_embeddings=64: expected at least 77"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0: expected a positive integer"),
])
def test_unsupported_config_is_a_clear_error(change, match):
    cfg = {**tiny_clip.tiny_text_config(2).to_dict(), **change}
    with pytest.raises(UserError, match=match):
        clip.parse_config(cfg, 2)


def test_config_disagreeing_with_the_weights_is_a_clear_error(saved):
    component = weights.open_component(saved["legacy"], "text_encoder")
    component.config = {**component.config, "num_hidden_layers": 2}
    with pytest.raises(UserError, match="tensors were not used by the network"):
        clip.define(component, encoder=1)


@pytest.mark.parametrize("encoder", [1, 2])
def test_one_dynamic_encoder_matches_transformers_at_many_batches(saved, encoder):
    from trt_sdxl.shapes import ImageProfile, Range

    folder = saved["new"]
    net = clip.define(folder, encoder, profiles=[ImageProfile(Range(1, 1, 2), Range.one(64), Range.one(64),
                                                              Range(1, 1, 3), "64x64")])
    assert net.inputs["input_ids"][0] == (-1, 77) and net.profiles[0]["input_ids"] == ((1, 77), (1, 77), (6, 77))
    program = netexec.Program(net.network)
    model = transformers_model(folder, encoder)
    for rows in (1, 2, 5):
        ids = tokens(folder, encoder, (PROMPTS * 3)[:rows])
        out = program.run({"input_ids": ids})
        hidden, embeds = transformers_forward(model, ids)
        assert out["hidden_states"].shape == (rows, 77, net.config.hidden_size)
        assert rel_l2(out["hidden_states"], hidden) <= BUDGET
        if encoder == 2:
            assert rel_l2(out["text_embeds"], embeds) <= BUDGET
