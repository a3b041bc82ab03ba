"""Our CLIP tokenizer against transformers' CLIPTokenizer (what diffusers' SDXL pipeline calls), id for id.

Both read the same tiny tokenizer folders (tests/tiny_clip.py) in the published SDXL layout and in
the layout transformers' save_pretrained writes, with SDXL's two padding choices ("<|endoftext|>"
for `tokenizer`, "!" for `tokenizer_2`).
"""

from __future__ import annotations

import json
import warnings

import tiny_clip  # first: sets HF_HUB_OFFLINE before transformers loads
import numpy as np
import pytest
from transformers import CLIPTokenizer

from trt_sdxl.errors import UserError
from trt_sdxl.tokenizer import MAX_LENGTH, Tokenizer, open_tokenizer

PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "",
    "   ",
    "Hello, World!! It's the DOG's ball; they're here, we've, I'm, you'll, he'd",
    "don't won't can't ''quoted'' 'single' 's'd'll'm're't've",
    "wow!!! really?!? masterpiece!, (best quality:1.2), [cat|dog]",
    "price: $1,234.56 -- 50% off #sale @home (v2.0) {y} <z> a-b_c/d\\e~g`h^i",
    "multiple     spaces\tand\ttabs\nnew\r\nlines  ",
    "nbsp\u00a0here\u3000ideographic\u2009thin\u200bzero-width\x1cfs\x85nel",
    "café naïve résumé ÉCOLE Straße e\u0301 decomposed",
    "東京タワー 夜景, ΟΔΟΣ Σίσυφος, İstanbul ǅ ﬁ",
    "emoji 🐱‍👤 🎉 and ☃",
    "1234567890 3.14159 1e10 ٣٤٥ ①②",
    "<|endoftext|> in <|startoftext|> text, <|ENDOFTEXT|> upper",
    "the old lighthouse " * 30,  # 90 words: truncated
    "x" * 300,  # one word of 300 unmerged symbols: truncated
]


@pytest.fixture(scope="module", params=["hub", "transformers"])
def folders(request, tmp_path_factory):
    """{"tokenizer": folder, "tokenizer_2": folder} in one layout."""
    root = tmp_path_factory.mktemp(f"tokenizers_{request.param}")
    return {name: tiny_clip.save_tiny_tokenizer(root / name, pad, request.param)
            for name, pad in (("tokenizer", tiny_clip.EOS), ("tokenizer_2", "!"))}


def reference(folder, prompts):
    tok = CLIPTokenizer.from_pretrained(folder)
    return np.array(tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids)


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_matches_transformers(folders, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Tokenizer(folders[name]).encode(PROMPTS)
    ref = reference(folders[name], PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), MAX_LENGTH)
    wrong = [(p, ours[i].tolist(), ref[i].tolist()) for i, p in enumerate(PROMPTS) if not np.array_equal(ours[i], ref[i])]
    assert not wrong, f"{len(wrong)} prompts differ; first: {wrong[0]}"
    assert len(caught) == 1, [str(w.message) for w in caught]
    long_rows = [i for i, p in enumerate(PROMPTS) if len(p) > 250]
    message = str(caught[0].message)
    for row in long_rows:
        assert f"prompt {row}:" in message, message
    assert "prompt 15: 225" in message, message  # 300 symbols - 75 kept


def test_truncation_keeps_the_final_eos(folders):
    tok = Tokenizer(folders["tokenizer"])
    with pytest.warns(UserWarning, match=r"tokens dropped: prompt 0: 15\b"):
        ids = tok.encode(["the " * 90])
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert (ids[0, 1:-1] == tok.vocab["the</w>"]).all()


def test_empty_prompt_and_padding(folders):
    one, two = Tokenizer(folders["tokenizer"]), Tokenizer(folders["tokenizer_2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        a, b = one.encode([""]), two.encode(["", "a cat"])
    assert a[0, :2].tolist() == [one.bos_id, one.eos_id] and (a[0, 2:] == one.eos_id).all()  # pads with EOS
    assert two.pad_id == 0 and two.vocab["!"] == 0  # tokenizer_2 pads with "!", id 0
    assert b[0, :2].tolist() == [two.bos_id, two.eos_id] and (b[0, 2:] == 0).all()
    assert b[1, 3] == two.eos_id and (b[1, 4:] == 0).all()


def test_open_tokenizer_from_a_pipeline_folder(tmp_path):
    tiny_clip.save_tiny_tokenizer(tmp_path / "tokenizer_2", "!")
    (tmp_path / "model_index.json").write_text("{}")
    assert open_tokenizer(tmp_path, encoder=2).pad_id == 0
    with pytest.raises(UserError, match="has no tokenizer/ folder"):
        open_tokenizer(tmp_path, encoder=1)
    with pytest.raises(UserError, match="expected 1 or 2"):
        open_tokenizer(tmp_path, encoder=3)


def _break(folder, file, content):
    path = folder / file
    if content is None:
        path.unlink()
    else:
        path.write_text(content(path.read_text(encoding="utf-8")) if callable(content) else content, encoding="utf-8")


def _replace_vocab_entry(text):
    vocab = json.loads(text)
    del vocab["!"]
    return json.dumps(vocab)


BAD_FILES = {
    "vocab missing": ("vocab.json", None, r"vocab.json: missing \(expected a JSON object mapping each token"),
    "vocab not json": ("vocab.json", '{"a": 1,', r"vocab.json: not valid JSON"),
    "vocab a list": ("vocab.json", '["a", "b"]', r"vocab.json: expected a non-empty JSON object"),
    "vocab lacks a byte": ("vocab.json", _replace_vocab_entry, r"vocab.json: 1 of the 256 byte symbols are missing"),
    "merges missing": ("merges.txt", None, r"merges.txt: missing \(expected the BPE merges"),
    "merges bad line": ("merges.txt", lambda t: t + "a b c\n", r"merges.txt, line \d+: 'a b c' is not a merge"),
    "merges unknown result": ("merges.txt", lambda t: t + "q z\n", r"merges.txt, line \d+: the merge 'q z' makes 'qz'"),
    "merges empty": ("merges.txt", "#version: 0.2\n", r"merges.txt: no merges"),
    "config missing": ("tokenizer_config.json", None, r"tokenizer_config.json: missing \(expected the tokenizer's"),
    "config not json": ("tokenizer_config.json", "{", r"tokenizer_config.json: not valid JSON"),
    "config max length": ("tokenizer_config.json", lambda t: t.replace('"model_max_length": 77', '"model_max_length": 64'),
                          r"tokenizer_config.json: model_max_length is 64, expected 77"),
    "pad not in vocab": ("special_tokens_map.json", lambda t: t.replace('"pad_token": "!"', '"pad_token": "<pad>"'),
                         r"pad_token '<pad>' is not in vocab.json"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_one_clear_error(tmp_path, case):
    file, content, match = BAD_FILES[case]
    folder = tiny_clip.save_tiny_tokenizer(tmp_path / "tokenizer_2", "!")
    _break(folder, file, content)
    with pytest.raises(UserError, match=match) as error:
        Tokenizer(folder)
    assert str(folder) in str(error.value)
