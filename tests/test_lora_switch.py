"""LoRASwitch: a refit sends only what changes — no network whose LoRAs stay, only the weights the old or the new
LoRAs touch, cached arrays when a set comes back — and refuses, before any network changes, a LoRA a network
cannot take."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_loras import tiny_default_lora

from trt_sdxl.components import LORA_COMPONENTS
from trt_sdxl.errors import UserError
from trt_sdxl.lora_switch import LoRASwitch, folder_sources
from trt_sdxl.runtime.manifest import EnginesFolder

ATTN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def switch_over(folder, sent: list, **kw) -> LoRASwitch:
    f = EnginesFolder(folder)
    entries = {c: f.entry(c, need_file=False) for c in LORA_COMPONENTS}
    return LoRASwitch(folder_sources(f, entries), lambda c, weights, more: sent.append((c, weights)), **kw)


def every(specs):
    return {c: specs for c in LORA_COMPONENTS}


def test_only_what_changes_is_sent_and_sets_come_back_from_the_cache(refittable_folder, lora_dir, tmp_path):
    style = lora_dir / "style.safetensors"
    other = tiny_default_lora(tmp_path / "other.safetensors", seed=9, components=("unet",))
    sent = []
    switch = switch_over(refittable_folder, sent)
    assert switch.set(every([(style, 0.8)])) == {"text_encoder": 1, "text_encoder_2": 1, "unet": 2}
    assert switch.set(every([(style, 0.8)])) == {} and len(sent) == 3  # the same set: nothing
    assert switch.set(every([(style, 0.8, 0.3)])) == {"unet": 2}  # a UNet-only scale: the UNet alone
    first = dict(sent[-1][1])
    assert set(first) == {f"{ATTN1}.to_q.weight", f"{ATTN1}.to_v.weight"}
    recomputed = switch.recomputed
    assert switch.set(every([(other, 1.0)])) == {"text_encoder": 1, "text_encoder_2": 1, "unet": 2}
    assert switch.set(every([(style, 0.8, 0.3)])) == {"text_encoder": 1, "text_encoder_2": 1, "unet": 2}
    assert switch.recomputed == recomputed + 3  # other: 3 networks computed; back: all 3 from the cache
    for name, array in sent[-1][1].items():
        assert array is first[name]  # the very arrays computed before
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(style.read_bytes())
    assert switch.set(every([(copy, 0.8, 0.3)])) == {}  # a copy of a file is that file


def test_the_cache_keeps_to_its_budget(refittable_folder, lora_dir):
    style = lora_dir / "style.safetensors"
    sent = []
    switch = switch_over(refittable_folder, sent, cache_bytes=1)
    switch.set(every([(style, 0.8)]))
    switch.set(every([]))
    switch.set(every([(style, 0.8)]))
    assert switch.recomputed == 9 and not switch._cache  # nothing kept: every set is over the budget


def test_a_lora_a_network_cannot_take_changes_nothing(refittable_folder, lora_dir, tmp_path):
    style = lora_dir / "style.safetensors"
    sent = []
    switch = switch_over(refittable_folder, sent)
    del switch.sources["text_encoder"]  # as if its engine were not refittable
    with pytest.raises(UserError, match="the text_encoder cannot take other LoRAs: its engine was not built refittable"):
        switch.set(every([(style, 0.8)]))
    assert sent == [] and switch.carried == {}
    unet_only = tiny_default_lora(tmp_path / "unet_only.safetensors", components=("unet",))
    assert switch.set(every([(unet_only, 1.0)])) == {"unet": 2}
    assert np.all(np.isfinite(sent[-1][1][f"{ATTN1}.to_q.weight"].astype(np.float32)))
