#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one run on a CUDA machine: the `gpu`-marked tests, then
# the benchmarks, most important first, each under its own time limit and all under one deadline
# (a step that would start past it is skipped and says so). Everything lands under $OUT (default
# runs/gpu): pytest.log, session.log (this script's output) and bench.tgz (the JSON results and
# server logs of runs/bench).
#
#   bash bench/gpu_session.sh                    # on the GPU machine, from the repository root
#   DEADLINE=600 bash bench/gpu_session.sh       # seconds for the whole run (default 420)
#   DEVICE=cpu SMALL=tiny BIG=small bash bench/gpu_session.sh   # a dry run of the plumbing on a CPU
#
# Wheels in .whl/ (if any) are installed into /tmp/site first: the device tool's machines have
# torch but not always this project's pins (grpcio, protobuf, bitsandbytes, transformers, peft).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-gpt2-small}
BIG=${BIG:-gpt2-1b}
DEADLINE=${DEADLINE:-420}
DUR=${DUR:-8}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" runs/bench
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log its wall time
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - ($(date +%s) - T0)))
  if [ "$left" -lt 20 ]; then echo "=== SKIPPED $name (deadline)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, t=$(($(date +%s) - T0))s)"
  local s; s=$(date +%s)
  timeout -k 10 "$limit" "$@"
  echo "=== $name: rc=$? in $(($(date +%s) - s))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY - <<'EOF'
import importlib
for m in ("torch", "transformers", "peft", "bitsandbytes", "grpc", "google.protobuf", "onnxruntime"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "unavailable:", e)
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except Exception as e:  # noqa: BLE001
    print("onnxruntime:", e)
EOF

C="--device $DEVICE --clients 64 --items 1..8 --duration $DUR --warmup 3 --repeats 1"
C="$C --max-batch-tokens 16384 --max-batch-items 256 --targets server,inprocess,naive"
[ "$DEVICE" = cpu ] && C="--device cpu --clients 8 --items 1..8 --duration 3 --warmup 1 --repeats 1 --targets server,inprocess,naive"

STEPS=${STEPS:-tests models compare-big compare-small quantized budget compare-small-1}
for st in $STEPS; do
  case $st in
    tests)
      step "gpu tests" 170 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --timeout 160 \
        tests/integration/test_gpu_serving.py tests/integration/test_rm_train_paths.py \
        tests/integration/test_trainer_cli.py --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log" ;;
    tests-quantized)
      step "gpu tests (quantized)" 90 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
        tests/integration/test_gpu_serving.py -k "quantized or out_of_memory" 2>&1 | tee "$OUT/pytest.log" ;;
    models)
      step "models" 60 $PY -m bench models --kinds "$SMALL" "$BIG" --roles reward ;;
    compare-big)
      step "compare $BIG" 110 $PY -m bench compare --kind "$BIG" $C ;;
    compare-big-fill)  # the window fills the token budget (no fixed-cost rule)
      step "compare $BIG fill" 100 $PY -m bench compare --kind "$BIG" \
        ${C/--targets server,inprocess,naive/--targets server,inprocess} \
        --server-arg=--batch-overhead-tokens=1000000000 ;;
    compare-big-fill2)  # and two forward streams
      step "compare $BIG fill 2 streams" 100 $PY -m bench compare --kind "$BIG" \
        ${C/--targets server,inprocess,naive/--targets server} --streams 2 \
        --server-arg=--batch-overhead-tokens=1000000000 ;;
    shapes-big)  # forward time against batch shape, in-process
      step "shapes $BIG" 60 $PY -m bench.shapes --kind "$BIG" --device "$DEVICE" ;;
    compare-small)
      step "compare $SMALL" 80 $PY -m bench compare --kind "$SMALL" $C ;;
    compare-small-1)
      step "compare $SMALL 1 item" 90 $PY -m bench compare --kind "$SMALL" ${C/--items 1..8/--items 1} ;;
    quantized)
      step "quantized $BIG" 80 $PY -m bench quantized --kind "$BIG" --device "$DEVICE" --items 256 \
        --max-batch-tokens 16384 --max-batch-items 256 ;;
    budget)
      step "budget $SMALL" 40 $PY -m bench budget --kind "$SMALL" --device "$DEVICE" --items 1024 \
        --budgets 2048,4096,8192,16384,32768 --max-items 512 --repeats 2 --no-batch1
      step "budget $BIG" 50 $PY -m bench budget --kind "$BIG" --device "$DEVICE" --items 1024 \
        --budgets 4096,8192,16384,32768 --max-items 512 --repeats 2 --no-batch1 ;;
    *) echo "unknown step $st"; exit 2 ;;
  esac
done

tar czf "$OUT/bench.tgz" runs/bench 2>/dev/null
echo "=== done in $(($(date +%s) - T0))s"
