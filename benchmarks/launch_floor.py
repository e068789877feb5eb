"""The floor of one kernel in the decode graph: chains of tiny kernels captured as a CUDA graph
(with and without programmatic dependent launch), time per kernel (issue 6 profiling).

    python benchmarks/launch_floor.py [--chain 150] [--reps 20]

Each variant is a chain of `chain` launches of one kernel, replayed `reps` times; the figure is GPU
time per launch (CUDA events around the replays). Kernels (every one waits for its predecessor with
griddepcontrol.wait, then lets its successor start with griddepcontrol.launch_dependents, as
kernels/fused_decode.hip does):
  empty          nothing else
  touch          thread 0 of block 0: x[0] += 1 (a dependent global read and write per kernel)
  stage          every block reads d floats from global memory (L2), block-reduces their squares,
                 thread 0 writes one value (the residual staging that fd_qkv / fd_gate_up do)
  stage_dot      stage, then every thread streams `bytes_per_thread` bytes of a weight buffer
                 (L2-resident) and the block reduces a checksum (a small matvec's shape)
The differences say what a decode kernel costs beyond launch + dependency: compare with the
per-layer time of the decode step (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SRC = r"""
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ float block_sum(float v) {
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
    if (threadIdx.x < 32)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void k_empty(float* x) { pdl_wait(); pdl_trigger(); }
extern "C" __global__ void k_touch(float* x) {
    pdl_wait(); pdl_trigger();
    if (blockIdx.x == 0 && threadIdx.x == 0) x[0] += 1.0f;
}
extern "C" __global__ void k_stage(float* x, const float* src, int d) {
    pdl_wait(); pdl_trigger();
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { const float v = src[i]; s += v * v; }
    s = block_sum(s);
    if (threadIdx.x == 0) x[1 + blockIdx.x] = s;
}
extern "C" __global__ void k_stage_dot(float* x, const float* src, int d, const int4* w, int per_thread) {
    const int4* p = w + ((long long)blockIdx.x * blockDim.x + threadIdx.x) * per_thread;
    pdl_wait(); pdl_trigger();
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { const float v = src[i]; s += v * v; }
    s = block_sum(s);
    __syncthreads();
    int acc = 0;
    for (int k = 0; k < per_thread; ++k) { const int4 t = p[k]; acc += t.x ^ t.y ^ t.z ^ t.w; }
    const float r = block_sum((float)acc + s);
    if (threadIdx.x == 0) x[1 + blockIdx.x] = r;
}
"""


def time_chain(fn, grid, block, kargs, pdl: bool, chain: int, reps: int, stream, launcher) -> float:
    """Median GPU time per launch (us) of `chain` launches of fn captured as one CUDA graph (with
    programmatic dependent launch where `pdl`, through `launcher`, a fast_decode._PdlLauncher),
    replayed `reps` times, CUDA events around each replay."""
    import cupy

    prepared = launcher.prepare(fn, grid, block, kargs)
    with stream:
        stream.begin_capture()
        for _ in range(chain):
            if pdl:
                launcher.launch(prepared, stream.ptr)
            else:
                fn(grid, block, kargs)
        g = stream.end_capture()
    g.launch(stream)
    stream.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record(stream)
        g.launch(stream)
        e1.record(stream)
        e1.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / chain)
    return statistics.median(ts)


def main(argv=None) -> None:
    import cupy

    from rocmforge_lab.backend.fast_decode import _PdlLauncher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", type=int, default=150)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    mod = cupy.RawModule(code=SRC, options=("-std=c++17",))
    x = cupy.zeros(4096, dtype=cupy.float32)
    src = cupy.ones(8192, dtype=cupy.float32)
    w = cupy.ones(132 * 256 * 8 * 4, dtype=cupy.int32)  # 4.3 MB of "weights" (L2-resident)
    stream = cupy.cuda.Stream(non_blocking=True)
    pl = _PdlLauncher()
    variants = []
    for blocks in (1, 36, 132):
        variants.append(("empty", blocks, 256, (x,)))
        variants.append(("touch", blocks, 256, (x,)))
    for blocks in (36, 132):
        for d in (576, 896, 3584):
            variants.append(("stage", blocks, 256, (x, src, np.int32(d))))
    for blocks, per in ((36, 2), (36, 8), (132, 2), (132, 8)):
        variants.append(("stage_dot", blocks, 256, (x, src, np.int32(576), w, np.int32(per))))
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; chain {args.chain}, "
          f"median of {args.reps} replays; us per launch")
    print(f"{'kernel':<10}{'blocks':>7}{'args':>12}{'graph':>9}{'graph+pdl':>11}")
    for name, blocks, threads, kargs in variants:
        fn = mod.get_function(f"k_{name}")
        res = []
        for pdl in (False, True):
            res.append(time_chain(fn, (blocks,), (threads,), kargs, pdl, args.chain, args.reps, stream, pl))
        extra = ",".join(str(int(a)) for a in kargs[2:] if isinstance(a, (np.int32, int)))
        print(f"{name:<10}{blocks:>7}{extra:>12}{res[0]:>9.2f}{res[1]:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
