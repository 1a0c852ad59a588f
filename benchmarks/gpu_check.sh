#!/usr/bin/env bash
# One-call device check of dcamkd on a bare GPU machine (its own torch/triton, no network, the
# package not installed): builds the CUDA kernels, runs the GPU parity tests of every op, then times
# eager / torch.compile / Triton / CUDA at the paper's shapes, training-step throughput and
# inference latency (benchmarks/gpu_bench.py), and last the static table of the hot Triton kernels
# under this machine's Triton (benchmarks/gpu_static.py --hot-only). Every stage has its own timeout and writes its
# log and a line of stages.jsonl under $OUT (default: ./gpu_check_out) as soon as it ends, so a
# stage that fails or times out leaves the others' results. Whole run: under 9 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Outputs: $OUT/gpu_bench.md (table), $OUT/gpu_bench.json, $OUT/gpu_static.md/.json, $OUT/stages.jsonl, $OUT/<stage>.log.
# Exit status: 0 when every stage passed, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
# build cache outside $OUT (the .so files need not come back with the results)
export DCAMKD_CACHE_DIR="${DCAMKD_CACHE_DIR:-${TMPDIR:-/tmp}/dcamkd_cache}"
export DCAMKD_STRICT_BUILD=1
unset TRITON_INTERPRET || true
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi

T0=$(date +%s)
FAILED=0
: > "$OUT/stages.jsonl"

stage() {  # stage NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local start rc
  start=$(date +%s)
  echo "=== [$(( start - T0 ))s] $name (timeout ${limit}s)"
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  set -e
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/stages.jsonl"
  tail -n 25 "$OUT/$name.log" || true
  if [[ $rc -ne 0 ]]; then
    echo "--- stage $name failed (rc=$rc; 124 = timeout)"
    FAILED=1
  fi
}

stage env 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0)); import subprocess; subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,clocks.max.sm', '--format=csv'])"
stage build 180 "$PY" -c "import time, os; os.environ['DCAMKD_VERBOSE_BUILD'] = '1'; t=time.time(); import dcamkd.ops; from dcamkd import _build; p=_build.load('cuda'); print('built', p, 'in %.1fs' % (time.time()-t))"
stage parity 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_build.py tests/test_ops_pyramid_loss.py tests/test_ops_pyramid_loss_mining.py tests/test_ops_attention.py tests/test_ops_anomaly_map.py -k "cuda or triton"
REMAIN=$(( 440 - ($(date +%s) - T0) ))
if (( REMAIN < 60 )); then REMAIN=60; fi
stage bench "$REMAIN" "$PY" benchmarks/gpu_bench.py --device cuda --out "$OUT" --budget-s $(( REMAIN - 30 ))
stage static 90 "$PY" benchmarks/gpu_static.py --hot-only --no-cuda --archs 90 --out "$OUT"

echo "=== done in $(( $(date +%s) - T0 ))s; results in $OUT"
[[ -f "$OUT/gpu_bench.md" ]] && cat "$OUT/gpu_bench.md"
exit $FAILED
