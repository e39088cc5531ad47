#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one script (a lent machine starts bare and keeps
# nothing): build the CUDA extension, run the GPU tests, run the GPU benchmark suite.
#
#   bash benchmarks/gpu_session.sh [build] [test] [sweep] [tiles] [bench] [OPS=op1,op2] [SHAPES=...] [PROVIDERS=...] [LABEL=...]
#   (env: TESTS=paths, TESTS_K=expr narrow the GPU tests; BENCH_ARGS go to benchmarks.run; ERPD_COMMIT names the measured commit
#   when the machine's copy of .git is stale)
#
# Steps run in the order given (default: build test bench). Logs and results go to $OUT
# (default /tmp/erpd-gpu), the benchmark tables also to benchmarks/results/. It uses the
# machine's own python3 with its torch and triton, builds with --no-build-isolation --no-deps,
# and installs the Liger-Kernel wheel from .whl/ if one is there (no registry needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/erpd-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

steps=()
OPS="linear_logprobs,linear_kl,linear_policy_loss"
SHAPES="gpu"
PROVIDERS=""
LABEL=""
for a in "$@"; do
  case "$a" in
    LABEL=*) LABEL="${a#LABEL=}" ;;
    PROVIDERS=*) PROVIDERS="${a#PROVIDERS=}" ;;
    OPS=*) OPS="${a#OPS=}" ;;
    SHAPES=*) SHAPES="${a#SHAPES=}" ;;
    *) steps+=("$a") ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())' 2>&1 | tee -a "$OUT/machine.txt"
echo "commit ${ERPD_COMMIT:-$(git log -1 --format=%h 2>/dev/null)}" | tee -a "$OUT/machine.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/erpd-site .whl/*.whl && export PYTHONPATH="/tmp/erpd-site${PYTHONPATH:+:$PYTHONPATH}"
fi

rc=0
for step in "${steps[@]}"; do
  case "$step" in
    build)
      stamp "build"
      t0=$(date +%s)
      MAX_JOBS="${MAX_JOBS:-16}" ERPD_CUDA_ARCHS="${ERPD_CUDA_ARCHS:-90}" \
        "$PY" -m pip install -e . --no-build-isolation --no-deps >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      "$PY" -c 'import erpd; print("built in", '"$(( $(date +%s) - t0 ))"', "s; available on cuda:", {op: erpd.available("cuda", op=op) for op in ("linear_logprobs", "linear_kl", "policy_loss", "linear_policy_loss")})'
      ;;
    test)
      stamp "GPU tests"
      "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider ${TESTS:-tests} ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu-tests.log" | tail -60
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      ;;
    bench)
      # One op at a time, packing the results after each: a run cut off by the lease's time
      # limit still brings back the ops it finished.
      for op in ${OPS//,/ }; do
        stamp "benchmark $op on $SHAPES"
        "$PY" -m benchmarks.run --suite gpu --ops "$op" --shapes "$SHAPES" ${PROVIDERS:+--providers "$PROVIDERS"} ${LABEL:+--label "$LABEL"} ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | grep -v '^\[' | tail -40
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        tar czf "$OUT/results.tgz" benchmarks/results/gpu-* 2>/dev/null
      done
      ;;
    sweep)
      stamp "chunk-budget sweep of the cuda backends"
      for op in ${OPS//,/ }; do
        "$PY" -m benchmarks.sweep_chunk_bytes --op $op --shape llama3-4k --budgets 256M,1G,2G 2>&1 | tee -a "$OUT/sweep.log"
      done
      ;;
    tiles)
      stamp "Triton tile sweep"
      "$PY" -m benchmarks.sweep_triton_tiles --shape llama3-4k 2>&1 | tee -a "$OUT/sweep.log"
      ;;
    *) echo "unknown step $step (build, test, sweep, tiles, bench)"; exit 2 ;;
  esac
done
stamp "done (rc=$rc)"
exit $rc
