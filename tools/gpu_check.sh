#!/usr/bin/env bash
# The check for our GPU test machine (H100/H200 with PyTorch, cuda-python, NVRTC and nvcc; no TensorRT),
# in under 5 minutes:
#   1. install this repository (no dependencies: the machine has what it needs, and no network);
#   2. run the `gpu` tests (kernels vs their numpy twins, runtime buffers/streams/events/graphs; the
#      engine tests run only where TensorRT is installed);
#   3. report whether TensorRT is present;
#   4. time diffusers' SDXL UNet in PyTorch fp16, random weights, 1024x1024 (latents 128x128), batch 2
#      (classifier-free guidance): ms per step, eager, then torch.compile if the time left allows.
# Prints a table and writes OUT_DIR/gpu_check.json (default OUT_DIR: ./gpu_check), with the pytest log.
#
# Usage: tools/gpu_check.sh [OUT_DIR]        PYTHON=python3.11 tools/gpu_check.sh   to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-python3}
BUDGET_S=280  # the whole script; torch.compile runs only if enough of it is left
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
mkdir -p "$OUT"

if ! GPU=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -1) \
   || [ -z "$GPU" ]; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi found none); run this on the GPU test machine" >&2
    exit 1
fi
echo "== GPU: $GPU"

echo "== install (pip install -e '.[cuda]' --no-deps)"
if $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install --quiet --no-deps --no-build-isolation -e '.[cuda]' > "$OUT/install.log" 2>&1 \
        && INSTALL=ok || INSTALL="failed (see $OUT/install.log); tests use the checkout through pytest's pythonpath"
else
    INSTALL="skipped: no PyTorch in $PY"
fi
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

echo "== gpu tests"
timeout 150 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_runtime.py \
    > "$OUT/pytest_gpu.log" 2>&1
PYTEST_RC=$?
tail -n 15 "$OUT/pytest_gpu.log"
TESTS=$(grep -E " in [0-9.]+s" "$OUT/pytest_gpu.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
[ $PYTEST_RC -eq 124 ] && TESTS="timed out after 150 s"

echo "== TensorRT"
if ldconfig -p 2>/dev/null | grep -q nvinfer; then TRT_LIB="libnvinfer present"; else TRT_LIB="no libnvinfer"; fi
TRT_PY=$($PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "no tensorrt module")
echo "   $TRT_LIB; $TRT_PY"

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
    timeout "$2" $PY "$OUT/bench_unet.py" "$1" 2> "$OUT/bench_$1.log" | tail -1 \
        || echo "{\"mode\": \"$1\", \"error\": \"failed or timed out after $2 s (see $OUT/bench_$1.log)\"}"
}
EAGER=$(bench eager 90)
echo "   eager: $EAGER"
LEFT=$(( BUDGET_S - $(elapsed) ))
if [[ "$EAGER" == *error* ]]; then
    COMPILED="{\"mode\": \"compile\", \"error\": \"skipped: eager failed\"}"
elif [ "$LEFT" -ge 100 ]; then
    COMPILED=$(bench compile $(( LEFT - 10 )))
else
    COMPILED="{\"mode\": \"compile\", \"error\": \"skipped: only ${LEFT} s of the 5 minutes left\"}"
fi
echo "   torch.compile: $COMPILED"

GPU="$GPU" INSTALL="$INSTALL" MISSING="$MISSING" TESTS="$TESTS" PYTEST_RC="$PYTEST_RC" TRT_LIB="$TRT_LIB" \
TRT_PY="$TRT_PY" EAGER="$EAGER" COMPILED="$COMPILED" SECONDS_TAKEN="$(elapsed)" OUT="$OUT" $PY - <<'PY'
import json, os

e = os.environ
def bench(text):
    try:
        return json.loads(text)
    except ValueError:
        return {"error": text or "no output"}
report = {"gpu": e["GPU"], "install": e["INSTALL"], "missing_modules": e["MISSING"].split(),
          "gpu_tests": e["TESTS"], "gpu_tests_exit_status": int(e["PYTEST_RC"]),
          "tensorrt": {"ldconfig": e["TRT_LIB"], "python": e["TRT_PY"]},
          "sdxl_unet_fp16_1024_batch2": {"eager": bench(e["EAGER"]), "torch_compile": bench(e["COMPILED"])},
          "seconds": int(e["SECONDS_TAKEN"])}
path = os.path.join(e["OUT"], "gpu_check.json")
with open(path, "w") as f:
    json.dump(report, f, indent=2)
def ms(r):
    return f"{r['ms_per_step_median']:.1f} ms/step (min {r['ms_per_step_min']:.1f})" if "ms_per_step_median" in r \
        else r.get("error", "?")
rows = [("GPU (name, compute capability, driver)", report["gpu"]), ("install", report["install"]),
        ("missing modules", " ".join(report["missing_modules"]) or "none"),
        ("gpu tests", f"{report['gpu_tests']} (exit {report['gpu_tests_exit_status']})"),
        ("TensorRT", f"{e['TRT_LIB']}; {e['TRT_PY']}"),
        ("SDXL UNet fp16 1024² batch 2, eager", ms(report["sdxl_unet_fp16_1024_batch2"]["eager"])),
        ("SDXL UNet fp16 1024² batch 2, torch.compile", ms(report["sdxl_unet_fp16_1024_batch2"]["torch_compile"])),
        ("total time", f"{report['seconds']} s")]
width = max(len(k) for k, _ in rows)
print()
for k, v in rows:
    print(f"{k:<{width}}  {v}")
print(f"\nwritten: {path}")
PY
