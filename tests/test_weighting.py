"""trt_sdxl.weighting against A1111's rules (weights derived by hand, its own doctest examples) and
against compel 2.5 on the tiny tokenizers and text encoders of tests/tiny_clip.py (transformers, CPU, fp32).

compel is compared where the semantics are shared: token ids and chunking of long prompts with
`SplitLongTextMode.BRUTAL` (plain 75-token splits), per-token weights of fragments, the unweighted
embeddings of long prompts with the pooled embedding, and padding a shorter prompt with empty chunks.
compel's weighting is not A1111's (it scales each token's distance from the empty prompt's embedding,
without restoring the mean); one test pins that down, and A1111's rule is checked against numpy loops.
"""

from __future__ import annotations

import tiny_clip  # first: sets HF_HUB_OFFLINE before transformers loads
import numpy as np
import pytest
import torch
from compel import Compel, EmbeddingsProvider, ReturnedEmbeddingsType, SplitLongTextMode
from transformers import CLIPTokenizer

from trt_sdxl.errors import UserError
from trt_sdxl.tokenizer import open_tokenizer
from trt_sdxl.weighting import BREAK, Chunks, apply_weights, chunks, pad_chunks, parse

D = 1 / 1.1  # A1111's "[x]" factor
PENULTIMATE = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
# 13 tokens; tokenizer_2 splits each "!" out as its padding token (id 0), so the ids differ at the end of "wow!!"
PHRASE = "the old lighthouse stands on the rocky coast, wow!! "
LONG = PHRASE * 13  # 169 tokens: 3 chunks

PARSE_CASES = {
    # A1111's doctest examples (modules/prompt_parser.py)
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.5 * 1.1),
        (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)],
    # explicit weights, spaces and signs
    "(a:1.5)": [("a", 1.5)],
    "( a : 0.5 )": [(" a ", 0.5)],
    "(a:-0.5) b": [("a", -0.5), (" b", 1.0)],
    "(a:.5)": [("a", 0.5)],
    "(a:b)": [("a:b", 1.1)],  # a colon without a number is text
    # square brackets and nesting
    "[a]": [("a", D)],
    "[[a]]": [("a", D * D)],
    "((a:2) b)": [("a", 2 * 1.1), (" b", 1.1)],
    "[a (b) c]": [("a ", D), ("b", 1.1 * D), (" c", D)],
    # escapes
    "\\(a:1.5\\)": [("(a:1.5)", 1.0)],  # the ")" is escaped, so ":1.5" is text
    "a \\\\ b": [("a \\ b", 1.0)],
    "a\\b": [("ab", 1.0)],  # a lone backslash is dropped
    "\\[(a)\\]": [("[", 1.0), ("a", 1.1), ("]", 1.0)],
    # unbalanced
    ")a]": [(")a]", 1.0)],
    "a:1.2)": [("a:1.2)", 1.0)],  # a weight outside round brackets is text
    "(a:1.2": [("a:1.2", 1.1)],  # an unclosed "(" gives the rest 1.1
    "[a": [("a", D)],
    "x (((a [b": [("x ", 1.0), ("a ", 1.1 * 1.1 * 1.1), ("b", 1.1 * 1.1 * 1.1 * D)],  # round ones first, then square
    # merging runs of equal weights: exact float equality
    "(a)(b:1.1)": [("ab", 1.1)],
    "(a:1.21)((b))": [("a", 1.21), ("b", 1.1 * 1.1)],  # 1.21 != 1.1*1.1 in binary
    "x [(a)] y": [("x a y", 1.0)],  # 1.1 * (1/1.1) is exactly 1.0
    # BREAK
    "a BREAK b": [("a", 1.0), BREAK, ("b", 1.0)],
    "a,BREAK,b": [("a,", 1.0), BREAK, (",b", 1.0)],
    "BREAKfast break": [("BREAKfast break", 1.0)],  # whole word, case-sensitive
    "BREAK a": [("", 1.0), BREAK, ("a", 1.0)],
    "(a BREAK b)": [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)],  # scaled: no longer a marker (as A1111)
    "": [("", 1.0)],
    "()": [("", 1.0)],
}


@pytest.mark.parametrize("prompt", PARSE_CASES)
def test_parse_follows_a1111(prompt):
    """Weights compared exactly: the expected ones are written as products in A1111's order."""
    assert parse(prompt) == PARSE_CASES[prompt]


def test_parse_weights_are_a1111s_products_bit_for_bit():
    # A1111's doctest prints these reprs; merging compares weights exactly, so the order of products matters
    weights = dict(parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert repr(weights["house"]) == "1.5730000000000004" and repr(weights["sky"]) == "1.4641000000000006"


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "x (a:+.)"])
def test_parse_bad_weight_is_one_clear_error(prompt):
    with pytest.raises(UserError, match=r"is not a number \(write a weight as \(text:1.2\)\)"):
        parse(prompt)


# ------------------------------------------------------------------ chunking

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighting")
    return {1: tiny_clip.save_tiny_tokenizer(root / "tokenizer", tiny_clip.EOS),
            2: tiny_clip.save_tiny_tokenizer(root / "tokenizer_2", "!")}


@pytest.fixture(scope="module")
def toks(folders):
    return {e: open_tokenizer(folders[e]) for e in (1, 2)}


@pytest.fixture(scope="module")
def encoders():
    return {e: tiny_clip.tiny_text_encoder(e, seed=10 + e) for e in (1, 2)}


def expected_rows(tok, ids, per_chunk=75):
    """BOS + each 75-token slice + EOS + padding, built independently of the module."""
    pieces = [ids[i:i + per_chunk] for i in range(0, max(len(ids), 1), per_chunk)]
    rows = np.full((len(pieces), 77), tok.pad_id, np.int32)
    for r, piece in enumerate(pieces):
        rows[r, :len(piece) + 2] = [tok.bos_id, *piece, tok.eos_id]
    return rows


@pytest.mark.parametrize("encoder", [1, 2])
def test_long_prompt_is_plain_75_token_chunks(toks, encoder):
    tok = toks[encoder]
    prompt = LONG
    ids = tok.tokenize(prompt)
    assert 150 < len(ids) <= 225, len(ids)
    got = chunks(tok, prompt)
    assert got.ids.shape == (3, 77) and got.ids.dtype == np.int32 and got.weights.dtype == np.float32
    np.testing.assert_array_equal(got.ids, expected_rows(tok, ids))
    assert (got.ids[:, 0] == tok.bos_id).all() and got.dropped == 0
    assert (got.weights == 1).all()
    np.testing.assert_array_equal(chunks(tok, prompt, weighted=False).ids, got.ids)


@pytest.mark.parametrize("encoder", [1, 2])
def test_short_mode_is_diffusers_truncation(toks, encoder):
    tok = toks[encoder]
    prompt = LONG
    got = chunks(tok, prompt, long=False)
    np.testing.assert_array_equal(got.ids, tok.encode([prompt], on_truncate=lambda message: None))
    assert got.dropped == len(tok.tokenize(prompt)) - 75 and got.ids.shape == (1, 77)
    short = chunks(tok, "a cat on the moon", long=False)
    np.testing.assert_array_equal(short.ids, tok.encode(["a cat on the moon"]))
    assert short.dropped == 0


def test_chunk_boundaries_and_empty_prompt(toks):
    tok = toks[2]
    the = tok.vocab["the</w>"]
    empty = chunks(tok, "")
    assert empty.ids.tolist() == [[tok.bos_id, tok.eos_id] + [tok.pad_id] * 75] and tok.pad_id == 0
    assert chunks(tok, "the " * 75).ids.shape == (1, 77)
    two = chunks(tok, "the " * 76)
    assert two.ids.shape == (2, 77) and two.ids[1, :3].tolist() == [tok.bos_id, the, tok.eos_id]


def test_break_starts_a_chunk(toks):
    tok = toks[1]
    t = tok.tokenize
    got = chunks(tok, "a cat BREAK on the moon")
    np.testing.assert_array_equal(got.ids, np.concatenate([expected_rows(tok, t("a cat")),
                                                           expected_rows(tok, t("on the moon"))]))
    assert chunks(tok, "BREAK a cat").ids[0, :2].tolist() == [tok.bos_id, tok.eos_id]  # empty first chunk
    assert chunks(tok, "a cat BREAK").ids.shape == (1, 77)  # no empty last chunk
    assert chunks(tok, "a BREAK BREAK b").ids.shape == (3, 77)
    assert chunks(tok, "the " * 75 + "BREAK a").ids.shape == (2, 77)  # a full chunk is not followed by an empty one
    plain = chunks(tok, "a cat BREAK on the moon", weighted=False)
    np.testing.assert_array_equal(plain.ids, expected_rows(tok, t("a cat BREAK on the moon")))
    assert chunks(tok, "a BREAK b", long=False).dropped == 1


def test_weighted_fragments_are_tokenized_one_by_one(toks):
    tok = toks[1]
    t = tok.tokenize
    got = chunks(tok, "a (red:1.5) cat, [on the] moon")
    ids = t("a ") + t("red") + t(" cat, ") + t("on the") + t(" moon")
    weights = [1.0] * len(t("a ")) + [1.5] * len(t("red")) + [1.0] * len(t(" cat, ")) + [D] * len(t("on the")) \
        + [1.0] * len(t(" moon"))
    np.testing.assert_array_equal(got.ids, expected_rows(tok, ids))
    np.testing.assert_array_equal(got.weights[0, 1:len(ids) + 1], np.float32(weights))
    assert (got.weights[0, 0] == 1) and (got.weights[0, len(ids) + 1:] == 1).all()
    # "(t)he": the tokens of "t" then of "he", not of "the"
    split = chunks(tok, "(t)he").ids[0, 1:len(t("t") + t("he")) + 1].tolist()
    assert split == t("t") + t("he") != t("the")
    plain = chunks(tok, "a (red:1.5) cat", weighted=False)
    assert plain.ids[0, 1:len(t("a (red:1.5) cat")) + 1].tolist() == t("a (red:1.5) cat") and (plain.weights == 1).all()


def test_weights_follow_their_tokens_across_chunks(toks):
    tok = toks[1]
    words = "a sleeping cat on the old moon at night"
    got = chunks(tok, "the " * 70 + f"({words}:1.3)")  # positions 71..75 of chunk 0, the rest in chunk 1
    n = len(tok.tokenize(words))
    assert n > 5 and got.ids.shape == (2, 77)
    assert (got.weights[0, 71:76] == np.float32(1.3)).all() and (got.weights[0, 1:71] == 1).all()
    assert (got.weights[1, 1:n - 4] == np.float32(1.3)).all() and (got.weights[1, n - 4:] == 1).all()


def test_max_chunks_names_tokens_and_limit(toks):
    tok = toks[1]
    prompt = LONG
    n = len(tok.tokenize(prompt))
    assert chunks(tok, prompt, max_chunks=3).ids.shape == (3, 77)
    with pytest.raises(UserError, match=rf"the prompt has {n} tokens in 3 chunks of up to 75; the engines were built "
                                        r"for 2 chunk\(s\), at most 150 tokens"):
        chunks(tok, prompt, max_chunks=2)
    with pytest.raises(UserError, match=r"has 2 tokens in 2 chunks of up to 75 \(BREAK starts a new chunk\); "
                                        r".* at most 75 tokens"):
        chunks(tok, "a BREAK b", max_chunks=1)
    assert chunks(tok, prompt, long=False, max_chunks=1).dropped == n - 75


def test_comma_backtrack_is_a1111s_word_wrap(toks):
    tok = toks[1]
    the, comma = tok.vocab["the</w>"], tok.vocab[",</w>"]
    prompt = "the " * 70 + ", " + "the " * 10  # comma at chunk position 70, 5 from the chunk's end
    wrapped = chunks(tok, prompt, comma_backtrack=20)
    np.testing.assert_array_equal(wrapped.ids, np.concatenate([expected_rows(tok, [the] * 70 + [comma]),
                                                               expected_rows(tok, [the] * 10)]))
    np.testing.assert_array_equal(chunks(tok, prompt, comma_backtrack=4).ids, chunks(tok, prompt).ids)  # 5 > 4
    np.testing.assert_array_equal(chunks(tok, prompt).ids, expected_rows(tok, tok.tokenize(prompt)))


def test_pad_chunks_appends_empty_prompts(toks):
    tok = toks[2]
    short = chunks(tok, "(a cat:1.2)")
    padded = pad_chunks(short, 3, tok)
    empty = chunks(tok, "")
    assert isinstance(padded, Chunks) and padded.ids.shape == (3, 77)
    np.testing.assert_array_equal(padded.ids, np.concatenate([short.ids, empty.ids, empty.ids]))
    np.testing.assert_array_equal(padded.weights, np.concatenate([short.weights, empty.weights, empty.weights]))
    assert pad_chunks(short, 1, tok).ids.shape == (1, 77)
    with pytest.raises(ValueError, match="cannot pad 3 chunks to 2"):
        pad_chunks(padded, 2, tok)


# ------------------------------------------------------------------ A1111's emphasis

def a1111_emphasis(hidden, weights):
    """sd_emphasis.EmphasisOriginal, chunk by chunk and prompt by prompt, in float64 loops."""
    out = hidden.astype(np.float64).copy()
    for r in range(hidden.shape[0]):
        for start in range(0, hidden.shape[1], 77):
            z = hidden[r, start:start + 77].astype(np.float64)
            weighted = z * weights[r, start:start + 77, None]
            out[r, start:start + 77] = weighted * (z.mean() / weighted.mean())
    return out


def test_apply_weights_matches_a1111_per_prompt_and_chunk():
    rng = np.random.default_rng(0)
    hidden = (rng.standard_normal((2, 154, 16)) + 0.3).astype(np.float32)
    weights = np.ones((2, 154), np.float32)
    weights[0, 3:7], weights[0, 10] = 1.5, 0.6  # prompt 0: chunk 0 weighted
    weights[1, 80:90] = 1.21  # prompt 1: chunk 1 weighted
    got = apply_weights(hidden, weights)
    want = a1111_emphasis(hidden, weights)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert got.dtype == np.float32 and error < 1e-6, f"max relative error {error:.2e}"
    for r, s in ((0, slice(0, 77)), (1, slice(77, 154))):
        assert got[r, s].mean(dtype=np.float64) == pytest.approx(hidden[r, s].mean(dtype=np.float64), rel=1e-5)
    # chunks without weights come back bit for bit
    assert np.array_equal(got[0, 77:], hidden[0, 77:]) and np.array_equal(got[1, :77], hidden[1, :77])
    # the reduction matters: one mean over the whole tensor is a different answer
    whole = hidden * weights[..., None] * (hidden.mean() / (hidden * weights[..., None]).mean())
    assert np.abs(whole - want).max() > 100 * np.abs(got - want).max()


def test_apply_weights_all_ones_is_the_input():
    hidden = np.random.default_rng(1).standard_normal((1, 231, 8)).astype(np.float32)
    assert apply_weights(hidden, np.ones((1, 231), np.float32)) is hidden


def test_apply_weights_errors():
    hidden = np.zeros((1, 77, 2), np.float32)
    hidden[0, 1] = 1.0  # token 1 carries the chunk's whole mean
    weights = np.ones((1, 77), np.float32)
    weights[0, 1] = 0.0
    with pytest.raises(UserError, match="prompt 0, chunk 0: the weights make the mean of the weighted hidden states 0"):
        apply_weights(hidden, weights)
    with pytest.raises(ValueError, match=r"expected \[n, 77\*k, C\] and \[n, 77\*k\]"):
        apply_weights(np.zeros((1, 76, 2), np.float32), np.ones((1, 76), np.float32))


# ------------------------------------------------------------------ against compel

def provider(folders, encoders, encoder, mode=SplitLongTextMode.BRUTAL):
    return EmbeddingsProvider(tokenizer=CLIPTokenizer.from_pretrained(folders[encoder]),
                              text_encoder=encoders[encoder], truncate=False, returned_embeddings_type=PENULTIMATE,
                              split_long_text_mode=mode)


def encode(model, ids):
    """(penultimate hidden states [1, n*77, C] of each chunk joined, text_embeds of chunk 0 or None)."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
        pooled = model(torch.from_numpy(ids[:1]).long()).text_embeds.numpy() if hasattr(out, "text_embeds") else None
    hidden = out.hidden_states[-2].numpy()
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("encoder", [1, 2])
def test_ids_and_weights_match_compel(folders, toks, encoders, encoder):
    p = provider(folders, encoders, encoder)
    for prompt in (LONG, PHRASE * 4 + "the (old:1.3) [lighthouse] ((stands)) on" + ", the rocky coast" * 20, ""):
        ours = chunks(toks[encoder], prompt)
        fragments = parse(prompt)
        ids, weights, mask = p.get_token_ids_and_expand_weights([f for f, _ in fragments], [w for _, w in fragments],
                                                                device="cpu")
        np.testing.assert_array_equal(ours.ids.reshape(-1), ids.numpy(), err_msg=prompt)
        np.testing.assert_array_equal(ours.weights.reshape(-1), weights.numpy(), err_msg=prompt)
        assert (mask.numpy() == 1).all()


def test_compel_default_split_is_not_ours(folders, toks, encoders):
    """compel's default (SENTENCES) ends a chunk after the last "." of its 75 tokens; we cut at 75."""
    prompt = "a cat on the moon. " + PHRASE * 7
    ids, _, _ = provider(folders, encoders, 1, SplitLongTextMode.SENTENCES).get_token_ids_and_expand_weights(
        [prompt], [1.0], device="cpu")
    first = ids.numpy()[:77].tolist()
    dot = len(toks[1].tokenize("a cat on the moon."))
    assert first[dot + 1] == toks[1].eos_id and first[dot + 2] == toks[1].pad_id
    assert chunks(toks[1], prompt).ids[0, 76] == toks[1].eos_id and chunks(toks[1], prompt).ids[0, 75] != toks[1].pad_id


def test_long_prompt_embeddings_and_pooled_match_compel(folders, toks, encoders):
    prompt = LONG
    hf = [CLIPTokenizer.from_pretrained(folders[e]) for e in (1, 2)]
    compel = Compel(tokenizer=hf, text_encoder=[encoders[1], encoders[2]], returned_embeddings_type=PENULTIMATE,
                    requires_pooled=[False, True], truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    cond, pooled = compel(prompt)
    (h1, _), (h2, our_pooled) = (encode(encoders[e], chunks(toks[e], prompt).ids) for e in (1, 2))
    ours = np.concatenate([h1, h2], axis=-1)
    assert cond.shape == (1, 231, 64) and ours.shape == cond.shape
    assert rel(ours, cond) < 1e-5, f"hidden states: max relative error {rel(ours, cond):.2e}"
    assert rel(our_pooled, pooled) < 1e-5, f"pooled: max relative error {rel(our_pooled, pooled):.2e}"
    # the pooled embedding is chunk 0's, not another chunk's
    _, last_pooled = encode(encoders[2], chunks(toks[2], prompt).ids[2:])
    assert rel(last_pooled, pooled) > 1e-2


@pytest.mark.parametrize("encoder", [1, 2])
def test_padding_matches_compel(folders, toks, encoders, encoder):
    long, short = LONG, "a cat on the moon"
    compel = Compel(tokenizer=CLIPTokenizer.from_pretrained(folders[encoder]), text_encoder=encoders[encoder],
                    returned_embeddings_type=PENULTIMATE, truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    both = compel([long, short])
    padded = pad_chunks(chunks(toks[encoder], short), 3, toks[encoder])
    ours, _ = encode(encoders[encoder], padded.ids)
    assert both.shape[1] == 231 and rel(ours[0], both[1]) < 1e-5, f"max relative error {rel(ours[0], both[1]):.2e}"


def test_compel_upweighting_is_a_lerp_from_the_empty_prompt(folders, toks, encoders):
    """compel: z' = empty + (z - empty) * w per token (w != 1), no mean restoring; A1111 differs."""
    prompt = "a cat on the (red:1.5) moon"
    fragments = parse(prompt)
    with torch.no_grad():
        z_compel = provider(folders, encoders, 1).get_embeddings_for_weighted_prompt_fragments(
            [[f for f, _ in fragments]], [[w for _, w in fragments]]).numpy()
    ours = chunks(toks[1], prompt)
    z, _ = encode(encoders[1], ours.ids)
    empty, _ = encode(encoders[1], chunks(toks[1], "").ids)
    w = ours.weights.reshape(1, -1, 1)
    lerp = np.where(w == 1, z, empty + (z - empty) * w)
    assert rel(z_compel, lerp) < 1e-5, f"max relative error {rel(z_compel, lerp):.2e}"
    a1111 = apply_weights(z, ours.weights.reshape(1, -1))
    assert rel(a1111, z_compel) > 1e-3
