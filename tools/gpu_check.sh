#!/usr/bin/env bash
# The check for our GPU test machine (H100/H200 with PyTorch, cuda-python, NVRTC and nvcc; no TensorRT, no
# diffusers), in at most 8 minutes:
#   1. install this repository (no dependencies: the machine has what it needs, and no network);
#   2. the `gpu` tests, one pytest call per test file, so that one file failing to import cannot hide the
#      others: the kernels against their numpy twins (tests/test_kernels.py), buffers, streams, events and
#      graphs (tests/test_runtime.py; its engine tests run only where TensorRT is installed), the denoising
#      loop and the image decoder over fake engines (tests/test_fake_engine.py: graph vs eager, vs the CPU
#      loop, capture fallback, memory released, ms/step);
#   3. where TensorRT is installed and builds for this GPU: tools/gpu_bench.py on the default model (UNet
#      engines per precision, ms/step, engine-inspector check), if the time left allows;
#   4. where diffusers is installed: diffusers' SDXL UNet in PyTorch fp16, random weights, 1024x1024, batch 2
#      (classifier-free guidance): ms per step, eager, then torch.compile if the time left allows.
# Prints a table and writes OUT_DIR/gpu_check.json (every test with its outcome, seconds and reported figures;
# the benchmarks), with the logs next to it. Exits 1 if a test failed or a test file did not finish.
#
# Usage: tools/gpu_check.sh [OUT_DIR]        (default OUT_DIR: ./gpu_check; PYTHON=python3.11 picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-python3}
BUDGET_S=470  # the whole script; the optional parts run only if enough of it is left
TEST_FILES=(test_kernels:120 test_runtime:120 test_fake_engine:180)  # file:timeout in seconds
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
mkdir -p "$OUT/junit"
rm -f "$OUT"/junit/*.xml

if ! GPU=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -1) \
   || [ -z "$GPU" ]; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi found none); run this on the GPU test machine" >&2
    exit 1
fi
CAP=$(echo "$GPU" | cut -d, -f2 | tr -d ' .')
echo "== GPU: $GPU"

echo "== install (pip install -e '.[cuda]' --no-deps)"
timeout 60 $PY -m pip install --quiet --no-deps --no-build-isolation -e '.[cuda]' > "$OUT/install.log" 2>&1 \
    && INSTALL=ok || INSTALL="failed (see $OUT/install.log); the tests use the checkout through pytest's pythonpath"
MISSING=$($PY - <<'PY'
import importlib
names = ["numpy", "ml_dtypes", "safetensors", "regex", "cuda.bindings.driver", "cuda.bindings.nvrtc", "pytest",
         "torch", "diffusers"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PY
)
echo "   install: $INSTALL; missing modules: ${MISSING:-none}"

echo "== gpu tests (one pytest call per file)"
FILE_STATUS=""
for item in "${TEST_FILES[@]}"; do
    name=${item%%:*}
    limit=${item##*:}
    echo "-- tests/$name.py (at most $limit s)"
    timeout "$limit" $PY -m pytest -m gpu -q -rs -p no:cacheprovider -o junit_family=xunit1 \
        --junitxml="$OUT/junit/$name.xml" "tests/$name.py" > "$OUT/pytest_$name.log" 2>&1
    rc=$?
    tail -n 4 "$OUT/pytest_$name.log" | sed 's/^/   /'
    [ $rc -eq 124 ] && echo "   timed out after $limit s"
    FILE_STATUS="$FILE_STATUS $name=$rc"
done

echo "== TensorRT"
TRT=$($PY - "$CAP" <<'PY' 2>/dev/null || echo "none: trt_sdxl could not be imported"
import sys
from trt_sdxl import backend
from trt_sdxl.errors import UserError
try:
    be = backend.get()
except UserError:
    print("none")
    raise SystemExit
builds = not be.is_rtx or f"SM{sys.argv[1]}" in be.aot_targets
print(f"{be.name} {be.version}" + ("" if builds else f" (does not run on SM{sys.argv[1]})"))
PY
)
echo "   $TRT"
BENCH_TRT='{"skipped": "no TensorRT that runs on this GPU"}'
if [[ "$TRT" != none* && "$TRT" != *"does not run"* ]]; then
    LEFT=$(left)
    if [ "$LEFT" -ge 120 ]; then
        echo "-- tools/gpu_bench.py on the default model (at most $(( LEFT - 60 )) s)"
        if timeout $(( LEFT - 60 )) $PY tools/gpu_bench.py --runs 20 --warmup 5 --no-fail --out "$OUT/gpu_bench.json" \
                > "$OUT/gpu_bench.log" 2>&1; then
            BENCH_TRT="{\"report\": \"$OUT/gpu_bench.json\"}"
        else
            BENCH_TRT="{\"error\": \"failed or timed out (see $OUT/gpu_bench.log)\"}"
        fi
        tail -n 8 "$OUT/gpu_bench.log" | sed 's/^/   /'
    else
        BENCH_TRT="{\"skipped\": \"only $LEFT s of the budget left\"}"
    fi
fi

echo "== SDXL UNet, PyTorch fp16, 1024x1024, batch 2"
cat > "$OUT/bench_unet.py" <<'PY'
"""diffusers' SDXL UNet (packaged SDXL base config, random weights) in fp16 on the GPU: ms per UNet call
at latents 128x128, batch 2 (one denoising step with classifier-free guidance). argv: eager|compile."""
import json, statistics, sys, time
import torch, diffusers
from diffusers import UNet2DConditionModel

mode = sys.argv[1]
config = {k: v for k, v in json.load(open("trt_sdxl/configs/sdxl_base_1.0/unet.json")).items() if not k.startswith("_")}
torch.manual_seed(0)
with torch.device("cuda"):
    unet = UNet2DConditionModel.from_config(config).to(torch.float16).eval()
b, dev, f16 = 2, "cuda", torch.float16
inputs = dict(sample=torch.randn(b, 4, 128, 128, device=dev, dtype=f16), timestep=torch.full((b,), 999.0, device=dev),
              encoder_hidden_states=torch.randn(b, 77, 2048, device=dev, dtype=f16),
              added_cond_kwargs={"text_embeds": torch.randn(b, 1280, device=dev, dtype=f16),
                                 "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * b, device=dev, dtype=f16)})
model = torch.compile(unet) if mode == "compile" else unet
with torch.inference_mode():
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (compilation, for torch.compile)
        model(**inputs)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(**inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
print(json.dumps({"mode": mode, "ms_per_step_median": round(statistics.median(times), 2),
                  "ms_per_step_min": round(min(times), 2), "warmup_s": round(warmup_s, 1), "iterations": len(times),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__}))
PY
bench() {  # mode, timeout in seconds -> one JSON line, or an error line
    local line
    line=$(timeout "$2" $PY "$OUT/bench_unet.py" "$1" 2> "$OUT/bench_$1.log" | tail -1)
    if [[ "$line" == "{"* ]]; then
        echo "$line"
    else
        echo "{\"mode\": \"$1\", \"error\": \"failed or timed out after $2 s (see $OUT/bench_$1.log)\"}"
    fi
}
if [[ " $MISSING " == *" diffusers "* || " $MISSING " == *" torch "* ]]; then
    EAGER='{"mode": "eager", "skipped": "PyTorch or diffusers is not installed"}'
    COMPILED='{"mode": "compile", "skipped": "PyTorch or diffusers is not installed"}'
else
    LEFT=$(left)
    if [ "$LEFT" -ge 40 ]; then
        EAGER=$(bench eager $(( LEFT < 100 ? LEFT - 10 : 90 )))
    else
        EAGER="{\"mode\": \"eager\", \"skipped\": \"only $LEFT s of the budget left\"}"
    fi
    LEFT=$(left)
    if [[ "$EAGER" == *error* || "$EAGER" == *skipped* ]]; then
        COMPILED='{"mode": "compile", "skipped": "eager did not run"}'
    elif [ "$LEFT" -ge 100 ]; then
        COMPILED=$(bench compile $(( LEFT - 10 )))
    else
        COMPILED="{\"mode\": \"compile\", \"skipped\": \"only $LEFT s of the budget left\"}"
    fi
fi
echo "   eager: $EAGER"
echo "   torch.compile: $COMPILED"

GPU="$GPU" INSTALL="$INSTALL" MISSING="$MISSING" FILE_STATUS="$FILE_STATUS" TRT="$TRT" BENCH_TRT="$BENCH_TRT" \
EAGER="$EAGER" COMPILED="$COMPILED" SECONDS_TAKEN="$(elapsed)" OUT="$OUT" $PY - <<'PY'
import json, os, xml.etree.ElementTree as ET

e = os.environ
out = e["OUT"]


def parse(text):
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text or "no output"}


def tests_of(name):
    """The testcases of one file's JUnit XML: outcome, seconds, message, the properties it recorded."""
    path = os.path.join(out, "junit", f"{name}.xml")
    if not os.path.exists(path):
        return None
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (found.get("message") or "")[:300]
                break
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2),
                      "message": message,
                      "properties": {p.get("name"): p.get("value") for p in case.iter("property")}})
    return cases


files = {}
for item in e["FILE_STATUS"].split():
    name, rc = item.split("=")
    cases = tests_of(name)
    counts = {}
    for case in cases or []:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    files[name] = {"exit_status": int(rc), "timed_out": rc == "124", "counts": counts, "tests": cases or [],
                   "log": os.path.join(out, f"pytest_{name}.log")}
report = {"gpu": e["GPU"], "install": e["INSTALL"], "missing_modules": e["MISSING"].split(), "tensorrt": e["TRT"],
          "test_files": files, "gpu_bench": parse(e["BENCH_TRT"]),
          "sdxl_unet_pytorch_fp16_1024_batch2": {"eager": parse(e["EAGER"]), "torch_compile": parse(e["COMPILED"])},
          "seconds": int(e["SECONDS_TAKEN"])}
path = os.path.join(out, "gpu_check.json")
with open(path, "w") as f:
    json.dump(report, f, indent=2)


def ms(r):
    if "ms_per_step_median" in r:
        return f"{r['ms_per_step_median']:.1f} ms/step (min {r['ms_per_step_min']:.1f})"
    return r.get("skipped") or r.get("error") or r.get("report") or "?"


rows = [("GPU (name, compute capability, driver)", report["gpu"]), ("install", report["install"]),
        ("missing modules", " ".join(report["missing_modules"]) or "none"), ("TensorRT", report["tensorrt"])]
for name, f in files.items():
    summary = ", ".join(f"{n} {k}" for k, n in sorted(f["counts"].items())) or "no results"
    rows.append((f"tests/{name}.py", summary + (" (timed out)" if f["timed_out"] else f" (exit {f['exit_status']})")))
rows += [("gpu_bench (TensorRT engines)", ms(report["gpu_bench"])),
         ("SDXL UNet PyTorch fp16 1024² batch 2, eager", ms(report["sdxl_unet_pytorch_fp16_1024_batch2"]["eager"])),
         ("SDXL UNet PyTorch fp16 1024² batch 2, torch.compile",
          ms(report["sdxl_unet_pytorch_fp16_1024_batch2"]["torch_compile"])),
         ("total time", f"{report['seconds']} s")]
width = max(len(k) for k, _ in rows)
print()
for k, v in rows:
    print(f"{k:<{width}}  {v}")
print()
for name, f in files.items():
    for case in f["tests"]:
        figures = " ".join(f"{k}={v}" for k, v in case["properties"].items())
        note = figures or (case["message"].splitlines() or [""])[0][:110]
        print(f"  {case['outcome']:<7} {case['seconds']:7.2f} s  {name}::{case['test']}  {note}")
print(f"\nwritten: {path}")
failed = any(f["exit_status"] not in (0, 5) or f["counts"].get("failed") or f["counts"].get("error")
             for f in files.values())
raise SystemExit(1 if failed else 0)
PY
