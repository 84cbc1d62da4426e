#!/usr/bin/env bash
# The runs behind docs/BENCHMARKS.md, in order of importance. Each writes JSON under runs/bench/
# and prints a table; PNG curves go to docs/. Usage: bash bench/run_all.sh [SECTION...]
# Sections: tiny small gpt2 latency reference groups budget onnx quantized curves trainer tenants profile (default: all;
# profile needs py-spy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tiny small gpt2 latency reference groups budget onnx quantized curves trainer tenants)
T=server,inprocess,inprocess_tight,inprocess_b1,naive
mkdir -p runs/bench
for s in "${sections[@]}"; do
  echo "=== $s  $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
  case $s in
    tiny)
      $PY -m bench compare --kind tiny --clients 32 --items 1..8 --duration 6 --warmup 2 --repeats 4 \
        --targets $T,arrival
      $PY -m bench compare --kind tiny --clients 32 --items 1 --duration 6 --warmup 2 --repeats 4 \
        --targets $T,arrival
      $PY -m bench compare --kind tiny --clients 32 --items 1 --duration 6 --warmup 2 --repeats 3 \
        --targets server,inprocess,fill ;;
    small)
      $PY -m bench compare --kind small --clients 32 --items 1..8 --duration 10 --warmup 4 --repeats 3 \
        --targets server,inprocess,inprocess_b1,naive,arrival
      $PY -m bench compare --kind small --clients 32 --items 1 --duration 10 --warmup 3 --repeats 3 \
        --targets server,inprocess,inprocess_b1,naive ;;
    gpt2)
      $PY -m bench compare --kind gpt2-small --clients 32 --items 1..8 --duration 90 --warmup 25 \
        --repeats 1 --targets $T
      $PY -m bench compare --kind gpt2-small --clients 32 --items 1 --duration 90 --warmup 20 \
        --repeats 1 --targets $T ;;
    latency)
      $PY -m bench latency --kind gpt2-small --length 64 --max-wait-ms 5 --duration 15 --repeats 2
      $PY -m bench latency --kind tiny --length 64 --max-wait-ms 5 --duration 10 --repeats 2 ;;
    reference)
      $PY -m bench reference --kind small --seqs 8,16,32,64 --length 512 --repeats 2 ;;
    groups)
      $PY -m bench groups --kind small --prompts 256 --ks 1,8 --clients 32 --rounds 2 --inprocess-repeats 3
      $PY -m bench groups --kind small --prompts 1024 --ks 16 --clients 8 --rounds 2 --inprocess-repeats 2 ;;
    budget)
      $PY -m bench budget --kind gpt2-small --budgets 512,1024,2048,4096,8192 --items 48 --repeats 2 ;;
    onnx)
      $PY -m bench onnx --kind gpt2-small --items 48 --repeats 3
      $PY -m bench onnx --kind tiny --items 256 --repeats 3
      $PY -m bench compare --kind tiny --backend onnx --clients 32 --items 1..8 --duration 6 \
        --warmup 2 --repeats 3 --targets server,inprocess,naive ;;
    quantized)
      $PY -m bench quantized --kind small --device cpu --items 128 ;;
    curves)
      $PY -m bench curves --kind small --sweep concurrency --values 1,2,4,8,16,32,64,128
      $PY -m bench curves --kind small --sweep length --values 32,64,128,256,512,1024 --clients 16 ;;
    trainer)
      $PY -m bench trainer --kind small --reward-kind gpt2-small --modes none,chunk,batch \
        --iterations 4 --repeats 3 ;;
    tenants)
      $PY -m bench tenants --kind tiny --duration 20 --repeats 2 ;;
    profile)
      $PY -m bench profile --kind tiny --clients 32 --items 1 --duration 12 ;;
    *) echo "unknown section $s"; exit 2 ;;
  esac
done
