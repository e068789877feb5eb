#!/usr/bin/env bash
# One lent-GPU call for issue 6 (see benchmarks/RESULTS.md): install the carried wheels, then run
# what the arguments name, in order, logs under $OUT:
#   test     pytest -m gpu tests/gpu/test_fast_decode.py
#   testall  pytest -m gpu tests/gpu
#   bench    benchmarks/gpu_decode.py --profile (this tree)
#   base     the same benchmark on the copy of the previous version in .baseline/ (git-ignored)
# MODELS / REPS / BENCH_ARGS override the benchmark's models, repetitions and extra options.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
MODELS=${MODELS:-smollm2,qwen0.5b,qwen7b}
REPS=${REPS:-3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
for what in "$@"; do
    t0=$(date +%s)
    case $what in
        test) python3 -m pytest -o addopts="" -q -m gpu tests/gpu/test_fast_decode.py -x 2>&1 | tee "$OUT/test.log" | tail -15 ;;
        testall) python3 -m pytest -o addopts="" -q -m gpu tests/gpu 2>&1 | tee "$OUT/testall.log" | tail -15 ;;
        bench) python3 benchmarks/gpu_decode.py --profile --models "$MODELS" --reps "$REPS" ${BENCH_ARGS:-} \
                   --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' ;;
        base) (cd .baseline && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_decode.py --profile --models "$MODELS" \
                   --reps "$REPS" --json "$OUT/base.json") 2>&1 | tee "$OUT/base.log" | grep -v '^{' ;;
    esac
    echo "== $what: $(( $(date +%s) - t0 )) s"
done
