"""The decode attention kernel alone (fd_attn_<c>_hd<D>, kernels/fused_decode.hip): GPU time per launch
for the three benchmark shapes, with and without its last-block merge, per build variant (issue 6).

    python benchmarks/attn_micro.py [--pos 64,640,1000] [--builds "",-DFD_FENCE_AR=1] [--cubins DIR]

Each row: a chain of `--chain` launches of one configuration captured as a CUDA graph (plain, and
with programmatic dependent launch as in the decode graph), replayed `--reps` times; the figure is the
median GPU time per launch (CUDA events around the replays). "merge" runs the attention's last-block
merge (merge_max 0, what the 7B shape does at position 640), "nomerge" skips it (the partials stay for
fd_oproj's late merge), so their difference is the merge's cost on the kernel's critical path ("z"
after hpb: one merge per KV head and head slice, FD_ATT_ZMERGE; "m": the one-pass merge,
FD_ATT_MERGE1). The
grid is the decode graph's at that position (64-key splits rounded up to 16, 32, 64...).
`--cubins DIR`: load prebuilt modules DIR/fd_<name>.cubin (nvcc -cubin) instead of compiling with
NVRTC, one per `--builds` entry named by `--names`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_floor import time_chain  # noqa: E402

SHAPES = {  # n_head, n_kv, head_dim
    "smollm2": (9, 3, 64),
    "qwen0.5b": (14, 2, 64),
    "qwen7b": (28, 4, 128),
}


def main(argv=None) -> None:
    import cupy

    from rocmforge_lab.backend import kernels as K
    from rocmforge_lab.backend.fast_decode import (ATT_MERGE1, ATT_MIN_SPLITS, ATT_ZMERGE, _PdlLauncher, attention_splits,
                                                    default_att_hpb)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,qwen0.5b,qwen7b")
    ap.add_argument("--pos", default="64,640,1000")
    ap.add_argument("--hpb", default="", help="heads per block to try (default: the decode plan's, default_att_hpb)")
    ap.add_argument("--builds", default="", help="comma-separated option sets, '+' between options of one set")
    ap.add_argument("--names", default="", help="names of the builds (default b0, b1, ...)")
    ap.add_argument("--cubins", default="", help="directory of prebuilt fd_<name>.cubin modules")
    ap.add_argument("--zmerge", default="0", help="FD_ATT_ZMERGE values to try: 0, 1 or 0,1 (a merge per head slice)")
    ap.add_argument("--merge1", default="0", help="FD_ATT_MERGE1 values to try: 0, 1 or 0,1 (the one-pass merge)")
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--n-ctx", type=int, default=1024)
    args = ap.parse_args(argv)
    builds = [tuple(o for o in b.split("+") if o) for b in args.builds.split(",")]
    names = args.names.split(",") if args.names else [f"b{i}" for i in range(len(builds))]
    stream = cupy.cuda.Stream(non_blocking=True)
    pl = _PdlLauncher()
    rng = np.random.default_rng(0)
    n_ctx = args.n_ctx
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; chain {args.chain}, median of "
          f"{args.reps} replays; us per launch (graph / graph+pdl)")
    print(f"{'shape':<10}{'pos':>6}{'hpb':>5}{'build':>8}{'merge':>18}{'nomerge':>18}")
    for shape in args.shapes.split(","):
        nh, nkv, hd = SHAPES[shape]
        G = nh // nkv
        kc = cupy.asarray(rng.standard_normal((nkv, n_ctx, hd)).astype(np.float16))
        vc = cupy.asarray(rng.standard_normal((nkv, n_ctx, hd)).astype(np.float16))
        q = cupy.asarray(rng.standard_normal(nh * hd).astype(np.float32))
        n_split = -(-n_ctx // 64)
        part_acc = cupy.zeros(n_split * nh * hd, cupy.float32)
        part_ml = cupy.zeros(n_split * nh * 2, cupy.float32)
        cnt = cupy.zeros(nkv * G, cupy.int32)
        out = cupy.zeros(nh * hd, cupy.float32)
        oh, ol = cupy.zeros(nh * hd // 4, cupy.int32), cupy.zeros(nh * hd // 4, cupy.int32)
        os_, osum = cupy.zeros(nh * hd // 32, cupy.float32), cupy.zeros(nh * hd // 16, cupy.float32)
        hpbs = [int(h) for h in args.hpb.split(",")] if args.hpb else [default_att_hpb(G, hd)]
        kname = f"fd_attn_f16_hd{hd}" + ("" if hd <= 64 else "_ls")
        for pos in [int(p) for p in args.pos.split(",")]:
            state = cupy.asarray(np.array([pos, 0, 0, 0], np.int32))
            splits = attention_splits(pos, n_split, ATT_MIN_SPLITS)  # the decode graph's grid
            for hpb, zm, m1 in [(h, int(z), int(m)) for h in hpbs for z in args.zmerge.split(",")
                                for m in args.merge1.split(",")]:
                for bname, opts in zip(names, builds):
                    if args.cubins:
                        mod = cupy.RawModule(path=str(Path(args.cubins) / f"fd_{bname}.cubin"))
                        fn = mod.get_function(kname)
                    else:
                        fn = K.get_function("fused_decode", kname, opts)
                    res = []
                    for merge_max in (0, 1 << 30):
                        kargs = (state, q, kc, vc, part_acc, part_ml, cnt, out, oh, ol, os_, osum, np.int32(0),
                                 np.int32(nh), np.int32(nkv), np.int32(n_ctx), np.float32(hd ** -0.5),
                                 np.int32(merge_max),
                                 np.int32(hpb | (ATT_ZMERGE if zm else 0) | (ATT_MERGE1 if m1 else 0)))
                        grid, block = (splits, nkv, -(-G // hpb)), (128,)
                        for pdl in (False, True):
                            res.append(time_chain(fn, grid, block, kargs, pdl, args.chain, args.reps, stream, pl))
                    print(f"{shape:<10}{pos:>6}{hpb:>4}{'z' if zm else ' '}{'m' if m1 else ' '}{bname:>7}{res[0]:>9.2f}/{res[1]:<8.2f}"
                          f"{res[2]:>9.2f}/{res[3]:<8.2f}", flush=True)


if __name__ == "__main__":
    main()
