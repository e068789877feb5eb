#!/usr/bin/env bash
# One lent-GPU call for issue 6 (see benchmarks/RESULTS.md): install the carried wheels, then run
# what the arguments name, in order, logs under $OUT:
#   test     pytest -m gpu tests/gpu/test_fast_decode.py
#   testall  pytest -m gpu tests/gpu
#   bench    benchmarks/gpu_decode.py --profile (this tree)
#   base     the same benchmark on the copy of the previous version in .baseline/ (git-ignored)
#   stream   the 7B shape (STREAM_MODELS): the default kernels (stream gate/up only) vs the other
#            stream-engine variants, per-kernel profile of each
#   tune     benchmarks/gpu_decode.py --tune over TUNES (launch / build variants beside the defaults)
#   ncu      Nsight Compute on one eager step: the 5 kernels of layer 3 per model (NCU_SPECS
#            "key:n_layer ..."), sections SpeedOfLight / Occupancy / LaunchStats / WarpStateStats /
#            SchedulerStats / MemoryWorkloadAnalysis (the whole report in $OUT/ncu_<key>.txt); NCU_TUNE:
#            the decoder's tune (e.g. down_xr=1+gate_up_xr=1)
#   xr       the x-resident kernels (fd_matvec_xr, fd_gate_up_xr, fd_oproj_xr: tunes down_xr /
#            gate_up_xr / o_proj_xr, default off) vs the defaults on the 0.5B and 7B shapes (XR_TUNES),
#            then the 7B's per-kernel profile with all three on
#   ctx      SmolLM2 / 7B shapes in a 4,096-token context: attention grids per graph (default) vs the
#            full grid (att_min_splits 0)
# MODELS / REPS / BENCH_ARGS override the benchmark's models, repetitions and extra options;
# TEST_K / TEST_TIMEOUT the test step's -k filter and time limit (seconds); STREAM_TIMEOUT the stream step's.
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
        test) timeout "${TEST_TIMEOUT:-600}" python3 -m pytest -o addopts="" -q -m gpu tests/gpu/test_fast_decode.py \
                  ${TEST_K:+-k "$TEST_K"} 2>&1 | tee "$OUT/test.log" | tail -15 ;;
        testall) python3 -m pytest -o addopts="" -q -m gpu tests/gpu 2>&1 | tee "$OUT/testall.log" | tail -15 ;;
        bench) python3 benchmarks/gpu_decode.py --profile --models "$MODELS" --reps "$REPS" ${BENCH_ARGS:-} \
                   --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' ;;
        stream) timeout "${STREAM_TIMEOUT:-240}" python3 benchmarks/gpu_decode.py --models "${STREAM_MODELS:-qwen7b}" --reps "$REPS" --profile --tune --profile-tunes \
                    --tunes stream=0,stream=1,stream=1+stream_v=1,stream_output=1,early_state_attn=1,att_hpb=2 \
                    --json "$OUT/stream.json" 2>&1 | tee "$OUT/stream.log" | grep -v -e '^{' -e '^kernel (regs' ;;
        tune) timeout "${TUNE_TIMEOUT:-420}" python3 benchmarks/gpu_decode.py --models "$MODELS" --reps "$REPS" --tune \
                  --tunes "${TUNES:-pf_l1=1,gate_up_lpr=16,ks_units=2}" --json "$OUT/tune.json" 2>&1 \
                  | tee "$OUT/tune.log" | grep -E 'tune|^\| ' ;;
        ncu) for spec in ${NCU_SPECS:-qwen7b:28 qwen0.5b:24}; do
                 key=${spec%%:*}; nl=${spec##*:}
                 timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none --cache-control none \
                     -k regex:'fd_(qkv|attn|oproj|matvec|gate_up)' --launch-skip $((5 * nl + 15)) --launch-count 5 \
                     --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                     --section SchedulerStats --section MemoryWorkloadAnalysis \
                     python3 benchmarks/ncu_step.py "$key" ${NCU_TUNE:-} > "$OUT/ncu_$key.txt" 2>&1
                 grep -E '^  fd_|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Stall|Warp Cycles Per Issued|Issued Warp|No Eligible|L2 Hit|Mem Busy' \
                     "$OUT/ncu_$key.txt" | head -120
             done ;;
        xr) timeout "${XR_TIMEOUT:-300}" python3 benchmarks/gpu_decode.py --models qwen0.5b,qwen7b --reps "$REPS" --tune \
                --tunes "${XR_TUNES:-down_xr=1,down_xr=1+xr_rb=1,down_xr=1+xr_rb=4,down_xr=1+xr_down_bps=4,gate_up_xr=1,gate_up_xr=1+xr_gate_up_rb=1,gate_up_xr=1+xr_gate_up_threads=128+xr_gate_up_grid=148,o_proj_xr=1,o_proj_xr=1+xr_o_proj_threads=128+xr_o_proj_bps=2,down_xr=1+gate_up_xr=1+o_proj_xr=1}" \
                --json "$OUT/xr.json" 2>&1 | tee "$OUT/xr.log" | grep -E 'tune|^\| '
            timeout 120 python3 benchmarks/gpu_decode.py --models qwen7b --reps "$REPS" --profile --tune --profile-tunes \
                --tunes down_xr=1+gate_up_xr=1+o_proj_xr=1 --json "$OUT/xr7b.json" 2>&1 | tee "$OUT/xr7b.log" \
                | grep -v -e '^{' -e '^kernel (regs' ;;
        ctx) timeout 150 python3 benchmarks/gpu_decode.py --models smollm2,qwen7b --reps "$REPS" --n-ctx 4096 --tune \
                 --tunes att_min_splits=0 --json "$OUT/ctx.json" 2>&1 | tee "$OUT/ctx.log" | grep -E 'tune|^\| ' ;;
        base) (cd .baseline && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_decode.py --profile --models "$MODELS" \
                   --reps "$REPS" --json "$OUT/base.json") 2>&1 | tee "$OUT/base.log" | grep -v '^{' ;;
    esac
    echo "== $what: $(( $(date +%s) - t0 )) s"
done
