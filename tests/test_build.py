"""`python -m trt_sdxl.build` as a user runs it, and ahead-of-time builds with a real TensorRT builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trt_sdxl import backend, build
from trt_sdxl.build import DEFAULT_MODEL, write_atomic
from trt_sdxl.models import unet

REPO = Path(build.__file__).resolve().parent.parent


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_sdxl.build", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_default_build_writes_engine_manifest_and_report(tmp_path):
    out = tmp_path / "engines"
    proc = run_cli("--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "build_report.json").read_text())
    entry = manifest["engines"]["unet"]
    be = backend.get()
    assert entry["file"] == f"unet.fp16.{be.tag}.sm89.plan"
    plan = out / entry["file"]
    assert plan.stat().st_size > 100_000
    assert entry["backend"] == be.name and entry["backend_version"] == be.version and entry["target"] == "SM89"
    assert [i["name"] for i in entry["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                   "time_ids"]
    assert entry["inputs"][0]["shape"] == [1, 4, 16, 16] and entry["inputs"][0]["dtype"] == "half"
    assert entry["outputs"] == [{"name": "noise_pred", "shape": [1, 4, 16, 16], "dtype": "half"}]
    assert len(entry["checkpoint_fingerprint"]) == 64
    r = report["unet"]
    assert r["macs_total"] > 0 and r["macs_8bit"] == 0 and r["layers"] > 100 and r["layers_quantized"] == 0
    assert r["smoothing_muls"] == 0 and r["build_seconds"] > 0
    # progress: loading, definition and build are each reported
    for stage in ("opening weights", "defining the network", "building for SM89", "wrote"):
        assert stage in proc.stderr, proc.stderr
    # no temporary files left behind
    assert sorted(p.name for p in out.iterdir()) == sorted([entry["file"], "manifest.json", "build_report.json"])


@pytest.mark.parametrize("target", ["SM89", "SM120"])
def test_tiny_unet_aot_build(target):
    net = unet.define(DEFAULT_MODEL, batch=2, latent_height=16, latent_width=24)
    engine, seconds = build.build_engine(net.definition, target)
    assert engine.nbytes > 100_000, f"{target}: engine of {engine.nbytes} bytes"


@pytest.mark.parametrize("args,needle", [
    (["--precision", "int8"], "--precision int8: 8-bit engines are not available yet"),
    (["--precision", "fp64"], "--precision fp64: expected one of fp16, int8, fp8"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--height", "100", "--width", "128"], "--height 100"),
    (["--height", "136", "--width", "128"], "multiples of 32"),
    (["--batch", "0"], "--batch 0"),
    (["--target", "SM90"], "--target SM90"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    proc = run_cli("--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("trt_sdxl.build: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.plan"))


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "unet.plan"
    target.write_bytes(b"old engine")

    def interrupted(fd):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the data was being flushed

    monkeypatch.setattr(build.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new engine, half written")
    assert target.read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.plan"], "temporary file left behind"


def test_failed_build_leaves_previous_outputs_intact(tmp_path, monkeypatch):
    out = tmp_path / "engines"
    assert build.main(["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_build(definition, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_engine", failing_build)
    assert build.main(["--out", str(out)]) == 130
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before
