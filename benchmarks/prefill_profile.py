"""Where the GPU prefill's time goes: GPU time per backend op (CUDA events) against wall time.

    python benchmarks/prefill_profile.py [--models smollm2,qwen0.5b] [--n-prompt 512] [--dir /tmp]

For each synthetic model of a benchmark shape (benchmarks/gpu_decode.py): the wall time of the
fused prefill (`session.forward`, backend/prefill.py; median of 15) and of the op-by-op program
(median of 5), then one instrumented op-by-op run in which every backend op and the pieces of a
GEMM (weight dequantization, cuBLAS call) are bracketed by CUDA events. GPU time summed per op
against the wall time says whether a path is bound by the GPU work or by the host launching it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_decode import MODELS  # noqa: E402


def profile_one(spec, args) -> None:
    import cupy

    import rocmforge_lab as rf
    from rocmforge_lab import synth

    def fused(session, ids):
        return session.forward(ids, last_only=True)  # backend/prefill.py

    def op_by_op(session, ids):  # the op-by-op program (what stepping and tracing run)
        state, ops = session.begin_forward(ids, last_only=True)
        for _ in ops:
            pass
        return session.finish_forward(state)

    key, label, arch, shape, qtype, ref_pp, _, _ = spec
    path = synth.make_gguf(Path(args.dir) / f"{shape}-{qtype}.gguf", arch=arch, shape=shape, qtype=qtype, seed=0,
                           random_bytes=True)
    m = rf.load(str(path), device="gpu", progress=False)
    rng = __import__("numpy").random.default_rng(0)
    prompt = [int(i) for i in rng.integers(0, m.config.vocab_size, args.n_prompt)]
    s = m.session(n_ctx=args.n_prompt + 16)

    def median_wall(prefill, reps: int) -> float:
        """Median seconds of `prefill(s, prompt)` from an empty cache (after a warm-up)."""
        prefill(s, prompt[:16])
        walls = []
        for _ in range(reps):
            s.reset()
            cupy.cuda.Device().synchronize()
            t = time.perf_counter()
            prefill(s, prompt)
            cupy.cuda.Device().synchronize()
            walls.append(time.perf_counter() - t)
        median_wall.first = walls[0]  # the first full-length call (captures the fused path's graph)
        return statistics.median(walls)

    wall = median_wall(op_by_op, 5)
    wall_f = median_wall(fused, 15)
    print(f"\n{label}: fused prefill (backend/prefill.py) pp{args.n_prompt} {wall_f * 1e3:.2f} ms = "
          f"{args.n_prompt / wall_f:,.0f} tok/s ({args.n_prompt / wall_f / ref_pp:.2f}x llama.cpp); "
          f"first call (graph capture) {median_wall.first * 1e3:.2f} ms")

    be = m.backend
    events: dict[str, list] = defaultdict(list)
    host: dict[str, float] = defaultdict(float)

    def wrap(name, fn):
        def timed(*a, **kw):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            t = time.perf_counter()
            e0.record()
            r = fn(*a, **kw)
            e1.record()
            host[name] += time.perf_counter() - t
            events[name].append((e0, e1))
            return r
        return timed

    ops = ["embed", "rms_norm", "rope", "kv_store", "attention", "attn_scores", "softmax", "attn_mix", "add",
           "swiglu", "linear", "_dequant_into", "_gemm_ex_call", "_matvec"]
    for name in ops:
        if hasattr(be, name):
            setattr(be, name, wrap(name, getattr(be, name)))
    s.reset()
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    op_by_op(s, prompt)
    cupy.cuda.Device().synchronize()
    wall_instr = time.perf_counter() - t
    for name in ops:
        if name in be.__dict__:
            del be.__dict__[name]
    print(f"\n{label}: pp{args.n_prompt} wall {wall * 1e3:.2f} ms = {args.n_prompt / wall:,.0f} tok/s "
          f"op by op (llama.cpp {ref_pp:,}: {args.n_prompt / wall / ref_pp:.2f}x); "
          f"instrumented run {wall_instr * 1e3:.2f} ms")
    print(f"{'op':<16}{'calls':>7}{'GPU ms':>10}{'host ms':>10}")
    for name in ops:
        ev = events.get(name)
        if not ev:
            continue
        gpu = sum(cupy.cuda.get_elapsed_time(a, b) for a, b in ev)
        print(f"{name:<16}{len(ev):>7}{gpu:>10.2f}{host[name] * 1e3:>10.2f}")
    print("(linear includes _dequant_into / _gemm_ex_call / _matvec; times of nested ops overlap)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,qwen0.5b")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    keys = args.models.split(",")
    for spec in MODELS:
        if spec[0] in keys:
            profile_one(spec, args)


if __name__ == "__main__":
    main()
