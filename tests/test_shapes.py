"""Shape profiles: --resolutions / --batch / --prompt-chunks parsed into ImageProfiles, and requests
checked against them with one line naming the allowed ranges."""

from __future__ import annotations

import pytest

from trt_sdxl import shapes
from trt_sdxl.errors import UserError
from trt_sdxl.shapes import ImageProfile, Range


def test_buckets_list_and_range():
    h, w, sizes = shapes.parse_resolutions("sdxl-buckets", 32, 1024)
    assert sizes == shapes.SDXL_BUCKETS and len(sizes) == 9
    assert (h.lo, h.opt, h.hi) == (640, 1024, 1536) and (w.lo, w.opt, w.hi) == (640, 1024, 1536)
    h, w, sizes = shapes.parse_resolutions("832x1216, 1024x1024", 32, 1024)
    assert sizes == ((832, 1216), (1024, 1024))  # width first, as A1111 writes sizes
    assert (w.lo, w.opt, w.hi) == (832, 832, 1024) and (h.lo, h.opt, h.hi) == (1024, 1216, 1216)
    h, w, sizes = shapes.parse_resolutions("768-1344", 32, 1024)
    assert sizes is None and (h.lo, h.opt, h.hi) == (768, 1024, 1344) == (w.lo, w.opt, w.hi)
    h, _, _ = shapes.parse_resolutions("256-512", 32, 1024)  # the default side outside: the middle
    assert (h.lo, h.opt, h.hi) == (256, 384, 512)


@pytest.mark.parametrize("spec,needle", [
    ("", "--resolutions: empty"),
    ("1000x1024", "--resolutions 1000x1024: width 1000: expected a positive multiple of 32"),
    ("1344-768", "the range goes down"),
    ("10x", "expected WIDTHxHEIGHT"),
    ("768-1344-2000", "expected a range of sides"),
])
def test_bad_resolutions_name_the_flag(spec, needle):
    with pytest.raises(UserError, match=needle):
        shapes.parse_resolutions(spec, 32, 1024)


def test_batch_and_chunks():
    assert shapes.parse_range("4", "--batch") == Range(4, 4, 4)  # one number: exactly that (a static batch)
    assert shapes.parse_range("1-4", "--batch") == Range(1, 1, 4)  # opt at the common case
    assert shapes.parse_chunks("3") == Range(1, 1, 3)  # up to 3 chunks: every prompt is at least one
    for bad in ("0", "4-1", "a", "1-2-3"):
        with pytest.raises(UserError, match="--batch"):
            shapes.parse_range(bad, "--batch")
    with pytest.raises(UserError, match="--prompt-chunks 0"):
        shapes.parse_chunks("0")


def test_default_profile_is_one_static_shape_and_profiles_round_trip():
    (only,) = shapes.image_profiles(None, 1, 1, 32, 1024)
    assert only.static and only.height == Range.one(1024) and only.sizes == ((1024, 1024),)
    two = shapes.image_profiles(["sdxl-buckets", "512-768"], "1-4", 3, 32, 1024)
    assert len(two) == 2 and not two[0].static and two[1].height == Range(512, 640, 768)
    assert [ImageProfile.from_json(p.to_json()) for p in two] == two
    with pytest.raises(UserError, match="give one or the other"):
        shapes.image_profiles(["sdxl-buckets"], 1, 1, 32, 1024, height=1024)


def test_a_request_picks_its_profile_or_names_every_range():
    profiles = shapes.image_profiles(["sdxl-buckets", "512-768"], "1-4", 2, 32, 1024)
    assert shapes.choose(profiles, 4, 1536, 640, 2) == 0
    assert shapes.choose(profiles, 1, 512, 768, 1) == 1
    assert shapes.choose(profiles, 1, 704, 704) == 1  # in both boxes: the nearer opt size
    assert shapes.choose(profiles, 6, 1024, 1024) == 0  # beyond the range: equal slices (2 calls of 3)
    assert shapes.slice_batch(Range(1, 1, 4), 6) == 3 and shapes.slice_batch(Range(2, 2, 2), 6) == 2
    assert shapes.slice_batch(Range(2, 2, 2), 3) is None and shapes.slice_batch(Range(3, 3, 4), 5) is None
    with pytest.raises(UserError) as e:
        shapes.choose(profiles, 1, 2048, 1024, 1, 32, where="the unet engine")
    line = str(e.value)
    assert "\n" not in line and line.startswith("batch 1, 1024x2048 px")  # width x height
    assert ("batch 1-4 (or a multiple of one), 640-1536 x 640-1536 px (width x height; sdxl-buckets), prompts up "
            "to 150 tokens") in line
    assert "batch 1-4 (or a multiple of one), 512-768 x 512-768 px" in line and "--resolutions/--batch" in line
    (static,) = shapes.image_profiles(None, 2, 1, 32, 1024)
    with pytest.raises(UserError, match=r"batch 3, 1024x1024 px.*\(batch 2 \(or a multiple\), 1024 x 1024 px"):
        shapes.choose([static], 3, 1024, 1024)
    with pytest.raises(UserError, match="prompts up to 150 tokens"):
        shapes.choose(profiles, 1, 1024, 1024, 3)
    with pytest.raises(UserError, match="multiples of 32"):
        shapes.choose(profiles, 1, 1000, 1024, 1, 32)
