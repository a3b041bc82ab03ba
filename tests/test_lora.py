"""LoRA merging (trt_sdxl.lora) against PEFT's own LoRA forward, and the merge arithmetic by hand.

Oracle: two LoRAs made by PEFT on the tiny SDXL pipeline's UNet and both text encoders (rank 4,
alpha 8, random non-zero up and down, 3x3 LoCon-style `conv1`/`conv2`, 1x1 `conv_shortcut`), active together at scales 0.8
and 0.5 in PEFT's unmerged forward (torch, fp32). Ours: the same LoRAs read from disk in three
layouts (diffusers/PEFT `save_lora_weights`; kohya with diffusers module paths, from diffusers'
`convert_state_dict_to_kohya`; kohya with SGM module paths, as SDXL kohya trainers write) merged
into the checkpoint and run by netexec in fp16. Figure: relative L2 error within the fp16 budget 1e-2,
while the LoRAs move the output by far more than that.
"""

from __future__ import annotations

import tiny_models  # noqa: F401  (first: sets HF_HUB_OFFLINE before diffusers loads)
import numpy as np
from oracle import rel_l2
import pytest
import torch
from safetensors.numpy import save_file

from trt_sdxl import keymap, lora, netexec, weights
from trt_sdxl.errors import UserError

BUDGET = 1e-2
RANK, ALPHA = 4, 8.0
SCALES = {"a": 0.8, "b": 0.5}  # adapter -> user scale
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                "ff.net.2", "time_emb_proj"]  # conv1/conv2: 3x3 LoCon; conv_shortcut: a 1x1 conv LoRA
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
ENCODERS = {1: "text_encoder", 2: "text_encoder_2"}
PROMPTS = ["a lighthouse by the sea at sunset", "an astronaut riding a horse"]


# ---------------------------------------------------------------- small numpy-only cases


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return tiny_models.save_tiny_unet(tmp_path_factory.mktemp("lora_unet") / "unet", "sdxl_like", seed=7)


TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV1 = "down_blocks.1.resnets.0.conv1"  # a 3x3 convolution


def sgm_name(config, diffusers_module):
    return next(s for s, d in keymap.unet_modules(config).items() if d == diffusers_module)


def write_numpy_loras(folder, component, seed=0):
    """Two hand-written files: kohya with SGM names (linear to_q, 3x3 LoCon conv1, alpha 8) and diffusers
    (lora_A/lora_B on to_q, no alpha: alpha = rank). Returns (paths, {file: {module: (down, up, alpha)}})."""
    rng = np.random.default_rng(seed)
    q_out, q_in = component.shape(f"{TO_Q}.weight")
    c_out, c_in, kh, kw = component.shape(f"{CONV1}.weight")
    kohya = {
        TO_Q: (rng.standard_normal((RANK, q_in)), rng.standard_normal((q_out, RANK)), ALPHA),
        CONV1: (rng.standard_normal((RANK, c_in, kh, kw)), rng.standard_normal((c_out, RANK, 1, 1)), ALPHA),
    }
    peft = {TO_Q: (rng.standard_normal((2, q_in)), rng.standard_normal((q_out, 2)), None)}
    tensors = {}
    for module, (down, up, alpha) in kohya.items():
        name = "lora_unet_" + sgm_name(component.config, module).replace(".", "_")
        tensors.update({f"{name}.lora_down.weight": down.astype(np.float16), f"{name}.lora_up.weight": up.astype(np.float16),
                        f"{name}.alpha": np.array(alpha, np.float16)})
    save_file(tensors, folder / "kohya.safetensors")
    save_file({f"unet.{TO_Q}.lora_A.weight": peft[TO_Q][0].astype(np.float32),
               f"unet.{TO_Q}.lora_B.weight": peft[TO_Q][1].astype(np.float32)}, folder / "peft.safetensors")
    as_stored = lambda d: {m: (down.astype(np.float16).astype(np.float32), up.astype(np.float16).astype(np.float32), a)
                           for m, (down, up, a) in d.items()}
    return [folder / "kohya.safetensors", folder / "peft.safetensors"], [as_stored(kohya), {
        m: (down.astype(np.float32), up.astype(np.float32), a) for m, (down, up, a) in peft.items()}]


def test_merged_weights_are_the_hand_computed_sum_bit_for_bit(unet_folder, tmp_path):
    base = weights.open_component(unet_folder, "unet")
    paths, modules = write_numpy_loras(tmp_path, base)
    scales = [0.8, 0.5]
    merged = lora.merged(base, lora.LoRASet.load(list(zip(paths, scales))))
    for module in (TO_Q, CONV1):
        key = f"{module}.weight"
        w = np.array(base.get(key, np.float32), np.float32)
        expected = w.copy()
        for scale, file_modules in zip(scales, modules):
            if module in file_modules:
                down, up, alpha = file_modules[module]
                rank = down.shape[0]
                factor = np.float32(scale * (rank if alpha is None else alpha) / rank)
                expected = expected + factor * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)
        got = merged.get(key, np.float32)
        np.testing.assert_array_equal(got, expected, err_msg=f"{key}: merged float32 weight")
        np.testing.assert_array_equal(merged.get(key, np.float16), expected.astype(np.float16),
                                      err_msg=f"{key}: cast once, after the merge")
        change = float(np.linalg.norm(expected - w) / np.linalg.norm(w))
        print(f"\n{key}: the LoRAs change it by rel L2 {change:.2f}")
        assert change > 0.1
    other = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    np.testing.assert_array_equal(merged.get(other), base.get(other))
    assert set(merged.deltas) == {f"{TO_Q}.weight", f"{CONV1}.weight"}
    assert merged.consumed >= {f"{TO_Q}.weight", f"{CONV1}.weight", other}


def test_fingerprint_covers_the_loras_and_their_scales(unet_folder, tmp_path):
    base = weights.open_component(unet_folder, "unet")
    paths, _ = write_numpy_loras(tmp_path, base)
    fingerprint = lambda scales: lora.merged(base, lora.LoRASet.load(list(zip(paths, scales)))).fingerprint()
    assert fingerprint([0.8, 0.5]) == fingerprint([0.8, 0.5])
    assert len({base.fingerprint(), fingerprint([0.8, 0.5]), fingerprint([0.8, 0.4]), fingerprint([0.5, 0.8])}) == 4
    assert weights.open_component(lora.merged(base, lora.LoRASet.load([(paths[0], 1.0)])), "unet").name == "unet", \
        "the models' open_component takes the merged component as it is"


def test_underscored_names_resolve_sgm_and_diffusers_paths(unet_folder):
    names = lora.module_names(weights.open_component(unet_folder, "unet"))
    assert names["input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == TO_Q
    assert names["down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert names["input_blocks_4_0_in_layers_2"] == CONV1
    assert None not in names.values(), "no two modules share an underscored name"


def test_old_attention_processor_names_are_the_same_lora(unet_folder, tmp_path):
    """diffusers' pre-PEFT names (`attn1.processor.to_out_lora.down.weight`) merge like kohya's for the module."""
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    base = weights.open_component(unet_folder, "unet")
    out_features, in_features = base.shape(f"{attn}.to_out.0.weight")
    rng = np.random.default_rng(2)
    down, up = rng.standard_normal((2, in_features)).astype(np.float32), rng.standard_normal((out_features, 2)).astype(np.float32)
    save_file({f"unet.{attn}.processor.to_out_lora.down.weight": down, f"unet.{attn}.processor.to_out_lora.up.weight": up},
              tmp_path / "old.safetensors")
    kohya = "lora_unet_" + f"{attn}.to_out.0".replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}, tmp_path / "kohya.safetensors")
    key = f"{attn}.to_out.0.weight"
    old, new = (lora.merged(base, lora.LoRASet.load([str(tmp_path / f)])).get(key, np.float32)
                for f in ("old.safetensors", "kohya.safetensors"))
    np.testing.assert_array_equal(old, new)
    assert not np.array_equal(old, base.get(key, np.float32))


def test_unknown_modules_are_one_error_listing_them(unet_folder, tmp_path):
    down, up = np.ones((2, 8), np.float32), np.ones((8, 2), np.float32)
    save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": up,
               "lora_unet_input_blocks_99_1_proj_in.lora_down.weight": down,
               "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": up}, tmp_path / "stray.safetensors")
    base = weights.open_component(unet_folder, "unet")
    with pytest.raises(UserError) as e:
        lora.merged(base, lora.LoRASet.load([str(tmp_path / "stray.safetensors")]))
    message = str(e.value)
    print("\n" + message)
    assert "\n" not in message and message.startswith(f"file {tmp_path / 'stray.safetensors'}: 4 LoRA keys match no module")
    assert "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight" in message
    assert "lora_unet_input_blocks_99_1_proj_in.lora_up.weight" in message


def test_unsupported_keys_and_broken_pairs_are_errors(unet_folder, tmp_path):
    save_file({"lora_unet_x.hada_w1_a": np.ones((2, 2), np.float32)}, tmp_path / "loha.safetensors")
    with pytest.raises(UserError, match=r"1 keys are not LoRA down/up/alpha tensors.*lora_unet_x\.hada_w1_a"):
        lora.LoRASet.load([str(tmp_path / "loha.safetensors")])
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 2), np.float32)}, tmp_path / "half.safetensors")
    with pytest.raises(UserError, match=r"'x' has no up"):
        lora.LoRASet.load([str(tmp_path / "half.safetensors")])
    name = "lora_unet_" + TO_Q.replace(".", "_")
    save_file({f"{name}.lora_down.weight": np.ones((2, 3), np.float32),
               f"{name}.lora_up.weight": np.ones((4, 2), np.float32)}, tmp_path / "misfit.safetensors")
    with pytest.raises(UserError, match=r"does not fit the unet weight"):
        lora.merged(weights.open_component(unet_folder, "unet"), lora.LoRASet.load([str(tmp_path / "misfit.safetensors")]))


def test_parse_spec(tmp_path):
    f = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.alpha": np.ones((), np.float32)}, f)
    assert lora.parse_spec(str(f)) == (f, 1.0)
    assert lora.parse_spec(f"{f}:0.8") == (f, 0.8)
    assert lora.parse_spec(f"{f}:-1.5e-1") == (f, -0.15)
    for bad, why in [(f"{f}:strong", "scale after ':' must be a number"), (f"{f}:nan", "finite"),
                     (str(tmp_path / "gone.safetensors"), "no such file"), (str(tmp_path / "x.ckpt"), ".safetensors"),
                     ("", "expected FILE"), (":0.5", "expected FILE")]:
        with pytest.raises(UserError, match=why) as e:
            lora.parse_spec(bad)
        assert str(e.value).startswith("--lora ")


# ---------------------------------------------------------------- the PEFT oracle


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(tiny pipeline folder, {component: torch model with adapters a and b active at SCALES},
    {component: base torch model}, {layout: [file a, file b]})."""
    pytest.importorskip("peft")
    import test_pipeline
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file as save_torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    tiny = test_pipeline.save_tiny_sdxl(root / "tiny-sdxl")
    load = {"unet": lambda: UNet2DConditionModel.from_pretrained(tiny / "unet"),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(tiny / "text_encoder"),
            "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(tiny / "text_encoder_2")}
    base = {c: f().eval() for c, f in load.items()}
    adapted = {c: f().eval() for c, f in load.items()}
    configs = {c: LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                             target_modules=UNET_TARGETS if c == "unet" else TEXT_TARGETS) for c in adapted}
    states = {}
    for seed, adapter in enumerate(SCALES, start=1):
        torch.manual_seed(seed)
        for c, model in adapted.items():
            inject_adapter_in_model(configs[c], model, adapter_name=adapter)
            states[adapter, c] = get_peft_model_state_dict(model, adapter_name=adapter)
    for model in adapted.values():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.set_adapter(list(SCALES))
                for adapter, scale in SCALES.items():
                    layer.set_scale(adapter, scale)

    unet_config = weights.open_component(tiny, "unet").config
    to_sgm = {d.replace(".", "_"): s.replace(".", "_") for s, d in keymap.unet_modules(unet_config).items()}
    files = {"diffusers": [], "kohya": [], "kohya_sgm": []}
    for adapter in SCALES:
        StableDiffusionXLPipeline.save_lora_weights(
            root, weight_name=f"{adapter}.safetensors",
            unet_lora_layers=states[adapter, "unet"], text_encoder_lora_layers=states[adapter, "text_encoder"],
            text_encoder_2_lora_layers=states[adapter, "text_encoder_2"],
            unet_lora_adapter_metadata=configs["unet"].to_dict(),
            text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
            text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict())
        files["diffusers"].append(root / f"{adapter}.safetensors")
        # diffusers' converter gives kohya names with diffusers paths; a PEFT state dict carries no alpha,
        # so it writes alpha = rank: put the trained alpha back, as kohya trainers store it.
        peft_state = {f"{c}.{k}": v for c in adapted for k, v in states[adapter, c].items()}
        kohya = {k: (torch.tensor(ALPHA) if k.endswith(".alpha") else v.contiguous())
                 for k, v in convert_state_dict_to_kohya(peft_state).items()}
        save_torch(kohya, root / f"{adapter}_kohya.safetensors")
        files["kohya"].append(root / f"{adapter}_kohya.safetensors")
        # SDXL kohya trainers name UNet modules by their SGM paths and text encoder modules by
        # transformers' `text_model.` paths; renamed here with our key map (test_keymap checks it
        # against diffusers' converters).
        sgm = {}
        for k, v in kohya.items():
            module, _, part = k.partition(".")
            if module.startswith("lora_unet_"):
                module = "lora_unet_" + to_sgm[module[len("lora_unet_"):]]
            else:
                prefix, _, rest = module.partition("_")  # "lora", "te1_encoder_layers_..."
                te, _, rest = rest.partition("_")
                module = f"{prefix}_{te}_{rest if rest.startswith('text_model_') else 'text_model_' + rest}"
            sgm[f"{module}.{part}"] = v
        save_torch(sgm, root / f"{adapter}_kohya_sgm.safetensors")
        files["kohya_sgm"].append(root / f"{adapter}_kohya_sgm.safetensors")
    return tiny, adapted, base, files


def lora_set(files):
    return lora.LoRASet.load([(f, s) for f, s in zip(files, SCALES.values())])


LAYOUTS = ["diffusers", "kohya", "kohya_sgm"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_unet_matches_peft(oracle, layout):
    import test_unet
    from trt_sdxl.unet_config import UNetConfig

    tiny, adapted, base, files = oracle
    component = lora.merged(weights.open_component(tiny, "unet"), lora_set(files[layout]))
    assert isinstance(component, lora.MergedComponent)
    assert len(component.deltas) == len([k for k in component.keys() if k.endswith(".weight") and any(
        k[:-len(".weight")].endswith(t) for t in UNET_TARGETS)])
    feeds = test_unet.inputs_for(UNetConfig.parse(component.config), 2, 8, 8, [999.0, 20.0])
    out, _ = test_unet.ours(component, 2, 8, 8, feeds)
    ref = test_unet.diffusers_forward(adapted["unet"], feeds)
    moved = rel_l2(test_unet.diffusers_forward(base["unet"], feeds), ref)
    err = rel_l2(out, ref)
    print(f"\n{layout}: UNet noise_pred rel L2 {err:.2e} (the LoRAs move it by {moved:.2f})")
    assert moved > 10 * BUDGET, "the LoRAs must change the output for the comparison to mean anything"
    assert err <= BUDGET, f"{layout}: UNet noise_pred rel L2 {err:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("encoder", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merged_text_encoders_match_peft(oracle, layout, encoder):
    import test_clip
    from trt_sdxl.models import clip
    from trt_sdxl.tokenizer import open_tokenizer

    tiny, adapted, base, files = oracle
    name = ENCODERS[encoder]
    component = lora.merged(weights.open_component(tiny, name), lora_set(files[layout]))
    assert isinstance(component, lora.MergedComponent) and len(component.deltas) > 0
    ids = open_tokenizer(tiny, encoder).encode(PROMPTS)
    out = netexec.run(clip.define(component, encoder, batch=len(PROMPTS), precision="fp16").network, {"input_ids": ids})
    hidden, embeds = test_clip.transformers_forward(adapted[name], ids)
    base_hidden, _ = test_clip.transformers_forward(base[name], ids)
    errors = {"hidden_states": rel_l2(out["hidden_states"], hidden)}
    if encoder == 2:
        errors["text_embeds"] = rel_l2(out["text_embeds"], embeds)
    moved = rel_l2(base_hidden, hidden)
    print(f"\n{layout} {name}: " + ", ".join(f"{k} rel L2 {v:.2e}" for k, v in errors.items())
          + f" (the LoRAs move hidden_states by {moved:.2f})")
    assert moved > 10 * BUDGET
    for key, err in errors.items():
        assert err <= BUDGET, f"{layout} {name}: {key} rel L2 {err:.3e}"


# ---------------------------------------------------------------- A1111's prompt tags and LoRA folder


@pytest.mark.parametrize("prompt, text, found", [
    ("a cat <lora:style>", "a cat ", [("style", 1.0, 1.0)]),
    ("<lora:style:0.8> a cat", " a cat", [("style", 0.8, 0.8)]),
    ("a cat <lora:style:0.5:1.2>", "a cat ", [("style", 0.5, 1.2)]),
    ("a cat <lora:style:unet=0.3>", "a cat ", [("style", 1.0, 0.3)]),
    ("a cat <lora:style:0.7:te=0.2>", "a cat ", [("style", 0.2, 0.2)]),  # unet follows te, named or not
    ("<lyco:a:1><lora:b:-0.5>, (red:1.2)", ", (red:1.2)", [("a", 1.0, 1.0), ("b", -0.5, -0.5)]),
    ("no tags, <not a tag>", "no tags, <not a tag>", []),
])
def test_prompt_tags_read_as_a1111_reads_them(prompt, text, found):
    """A1111's extra-network reading (extensions-builtin/Lora/extra_networks_lora.py): te from the first
    number (or te=), unet from the second (or unet=), else te; tags removed from the text."""
    clean, tags = lora.prompt_loras(prompt)
    assert clean == text and [(t.name, t.te, t.unet) for t in tags] == found


@pytest.mark.parametrize("prompt, message", [
    ("<hypernet:x:1>", "'hypernet' extra networks are not supported"),
    ("<lora:x:abc>", "a weight is not a number"),
    ("<lora:x:1:dyn=4>", "dyn= and other arguments are not supported"),
    ("<lora:x:1:2:3:4>", "expected <lora:name>"),
    ("<lora:x:inf>", "weights must be finite"),
])
def test_bad_prompt_tags_are_one_error(prompt, message):
    with pytest.raises(UserError, match=message):
        lora.prompt_loras(prompt)


def test_lora_folder_finds_by_name_then_alias_and_hashes_the_data(tmp_path):
    from tiny_loras import tiny_default_lora

    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    a = tiny_default_lora(folder / "style.safetensors", metadata={"ss_output_name": "house_style"})
    b = tiny_default_lora(folder / "sub" / "other.safetensors", seed=4)
    found = lora.LoRAFolder(folder)
    assert [(e["name"], e["alias"]) for e in found.entries] == [("style", "house_style"), ("other", "other")]
    assert found.entries[0]["metadata"] == {"ss_output_name": "house_style"}
    assert found.find("style") == a and found.find("house_style") == a and found.find("other") == b
    with pytest.raises(UserError, match="no LoRA named 'Style'"):  # names match exactly, case included
        found.find("Style")
    tiny_default_lora(folder / "style_copy.safetensors", metadata={"ss_output_name": "other"})
    found.refresh()
    assert found.find("other") == b  # a name wins over another file's alias
    tiny_default_lora(folder / "sub" / "style.safetensors")
    found.refresh()
    with pytest.raises(UserError, match="2 LoRA files .* are called 'style'"):
        found.find("style")
    # A1111's "AddNet" hash covers the tensor data only: other metadata, the same hash
    data = a.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert lora.short_hash(a) == __import__("hashlib").sha256(data[8 + length:]).hexdigest()[:12]
    same = tiny_default_lora(tmp_path / "renamed.safetensors", metadata={"ss_output_name": "x", "note": "y"})
    assert lora.short_hash(same) == lora.short_hash(a) != lora.short_hash(b)


def test_merging_into_a_merged_component_is_one_set_of_both(unet_folder, tmp_path):
    """merged(merged(base, a), b) binds, bit for bit, what merged(base, {a, b}) does (the build's LoRAs, then a
    refit's); a per-UNet scale applies to the UNet only."""
    from tiny_loras import tiny_default_lora

    from trt_sdxl.components import DEFAULT_MODEL

    a = tiny_default_lora(tmp_path / "a.safetensors", seed=1)
    b = tiny_default_lora(tmp_path / "b.safetensors", seed=2)
    base = weights.open_component(DEFAULT_MODEL, "unet")
    nested = lora.merged(lora.merged(base, lora.LoRASet.load([(a, 0.5)])), lora.LoRASet.load([(b, 0.7, -0.3)]))
    together = lora.merged(base, lora.LoRASet.load([(a, 0.5), (b, 0.7, -0.3)]))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert np.array_equal(nested.get(key).view(np.uint16), together.get(key).view(np.uint16))
    assert nested.fingerprint() == together.fingerprint()
    unet_only = lora.merged(base, lora.LoRASet.load([(b, 0.7, -0.3)]))
    by_hand = lora.merged(base, lora.LoRASet.load([(b, -0.3)]))
    assert np.array_equal(unet_only.get(key), by_hand.get(key))
    te = weights.open_component(DEFAULT_MODEL, "text_encoder")
    q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(lora.merged(te, lora.LoRASet.load([(b, 0.7, -0.3)])).get(q),
                          lora.merged(te, lora.LoRASet.load([(b, 0.7)])).get(q))
