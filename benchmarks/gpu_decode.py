"""GPU prefill / decode benchmark of the fast path against llama.cpp's H200 figures (issue 6).

    python benchmarks/gpu_decode.py [--models smollm2,qwen0.5b,qwen7b] [--n-prompt 512] [--n-gen 128]
                                    [--reps 3] [--profile] [--tune] [--json results.json] [--dir /tmp]

Per model (synthetic GGUF of the real shape, random quantized bytes, generated here):
  prefill pp<n_prompt>: the step path (model.py op by op) and the fast prefill (fused attention;
                       its CUDA-graph replays, and the length's first, eager call)
  decode tg<n_gen>:    the graphed fast path, the same kernels launched eagerly, and the step path
  effective bandwidth = weight bytes streamed per token x decode tok/s, as a fraction of the
  device-to-device copy bandwidth measured in this run (bytes read + written per second)
  ratio = our tok/s / llama.cpp's (H200, llama-bench -p 512 -n 128, flash attention)
--profile prints the per-kernel GPU time of one decode step; --tune tries a few launch shapes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#            key       label                  arch     shape           qtype    ref pp   ref tg  target x
MODELS = [("smollm2", "SmolLM2-135M Q4_1", "llama", "smollm2-135m", "q4_1", 48469, 939, 2.0),
          ("qwen0.5b", "Qwen2.5-0.5B Q4_K_M", "qwen2", "qwen2.5-0.5b", "q4_k_m", 41970, 852, 2.0),
          ("qwen7b", "Qwen2.5-7B Q4_K_M", "qwen2", "qwen2.5-7b", "q4_k_m", 9636, 281, 1.5)]

TUNES = [{}, {"pdl": False}, {"merge_max": 0}, {"att_hpb": 32}, {"att_hpb": 2}, {"out_blocks_per_sm": 8},
         {"lpr_min": 32}, {"gate_up_threads": 512}, {"pair": True}, {"pair": False}]


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy: (bytes read + bytes written) per second, median of reps."""
    import cupy

    a = cupy.ones(nbytes // 4, dtype=cupy.float32)
    b = cupy.empty_like(a)
    rt = cupy.cuda.runtime
    s = cupy.cuda.get_current_stream()
    rt.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, rt.memcpyDeviceToDevice, s.ptr)
    ts = []
    for _ in range(reps):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record()
        rt.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, rt.memcpyDeviceToDevice, s.ptr)
        e1.record()
        e1.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e-3)
    del a, b
    return 2 * nbytes / statistics.median(ts)


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def bench_one(spec, args, bw):
    import cupy

    import rocmforge_lab as rf
    from rocmforge_lab import synth
    from rocmforge_lab.backend.fast_decode import FastDecoder
    from rocmforge_lab.backend.profile import format_profile, profile_decode_step, profile_forward, summarize

    key, label, arch, shape, qtype, ref_pp, ref_tg, target = spec
    r = {"model": label, "key": key, "ref_pp": ref_pp, "ref_tg": ref_tg, "target_x": target}
    t = time.perf_counter()
    path = synth.make_gguf(Path(args.dir) / f"{shape}-{qtype}.gguf", arch=arch, shape=shape, qtype=qtype, seed=0,
                           random_bytes=True)
    r["make_gguf_s"] = time.perf_counter() - t
    t = time.perf_counter()
    m = rf.load(str(path), device="gpu", progress=False)
    be = m.backend
    be.synchronize()
    r["load_s"] = time.perf_counter() - t
    r["device"] = be.device_name
    cfg = m.config
    npr, ng = args.n_prompt, args.n_gen
    prompt = np.random.default_rng(0).integers(100, min(cfg.vocab_size, 20000), size=npr).tolist()
    s = m.session(n_ctx=args.n_ctx or npr + ng + 16)

    # ---- prefill
    def step_forward(ids):  # the op-by-op program (what stepping and tracing run)
        state, ops = s.begin_forward(ids, last_only=True)
        for _ in ops:
            pass
        return s.finish_forward(state)

    step_forward(prompt[:16])  # warm-up (compiles)
    s.reset()
    s.forward(prompt[:16], last_only=True)
    s.reset()

    def pf_step():
        s.reset()
        step_forward(prompt)
        be.synchronize()

    def pf_fast():  # session.forward without hooks: the fused prefill (backend/prefill.py)
        s.reset()
        s.forward(prompt, last_only=True)

    t_step, _ = _time(pf_step, args.reps)
    # the fused prefill runs a prompt length's first call eagerly and captures its CUDA graph on the
    # second (backend/prefill.py): time the first call alone, then the replays
    t0 = time.perf_counter()
    pf_fast()
    be.synchronize()
    r["prefill_first_tok_s"] = npr / (time.perf_counter() - t0)
    pf_fast()
    be.synchronize()
    t_fast, _ = _time(pf_fast, args.reps)
    r["prefill_step_tok_s"] = npr / t_step
    r["prefill_fast_tok_s"] = npr / t_fast
    s.reset()
    logits = s.forward(prompt, last_only=True)
    tok0 = int(np.argmax(logits[-1]))

    # ---- decode: graphed fast path
    def dec(fd):
        def run():
            s.truncate(npr)
            out = fd.decode(tok0, ng)
            assert len(out) == ng
            run.out = out
        return run

    fd = FastDecoder(m, s)
    r["mode"] = fd.mode + ("+pdl" if getattr(fd, "pdl", False) else "")
    r["graph_error"] = fd.graph_error
    r["pdl_error"] = getattr(fd, "pdl_error", None)
    r["launches_per_token"] = len(fd.plan.launches)
    r["weight_bytes_per_token"] = fd.weight_bytes_per_token
    fd.decode(tok0, 8)  # warm-up
    if key == MODELS[0][0] or args.profile:
        attrs = {}
        for fn, _, _, _ in fd.exec.calls:
            k = fn.name if hasattr(fn, "name") else str(fn)
            try:
                attrs[k] = (fn.num_regs, fn.local_size_bytes, fn.shared_size_bytes, fn.max_threads_per_block)
            except Exception as exc:
                attrs[k] = str(exc)
        r["kernel_attrs"] = attrs
        print("kernel (regs, local bytes, static smem, max threads):", attrs, flush=True)
    run = dec(fd)
    t_dec, all_t = _time(run, args.reps)
    r["decode_tok_s"] = ng / t_dec
    r["decode_runs_tok_s"] = [ng / x for x in all_t]
    tokens_graph = run.out
    eff = fd.weight_bytes_per_token * r["decode_tok_s"]
    r["eff_bandwidth_GBs"] = eff / 1e9
    r["bw_fraction"] = eff / bw
    if args.profile:
        rows = profile_decode_step(fd)
        r["profile"] = {k: v for k, v in summarize(rows).items()}
        print(format_profile(rows, f"{label}: per-kernel GPU time of one decode step (pos {s.n_past})"), flush=True)
    del fd

    # ---- the same kernels launched eagerly
    fde = FastDecoder(m, s, graph=False)
    fde.decode(tok0, 4)
    run = dec(fde)
    t_eager, _ = _time(run, max(1, args.reps - 1))
    r["decode_eager_tok_s"] = ng / t_eager
    r["eager_tokens_equal_graph"] = run.out == tokens_graph
    del fde

    # ---- launch-shape variants
    if args.tune:
        best = (r["decode_tok_s"], {})
        r["tune"] = []
        tunes = TUNES[1:]
        if args.tunes:
            tunes = [{k: (bool(int(v)) if k in ("early_state", "early_state_attn", "pdl", "pair") else int(v))
                      for k, v in (kv.split("=") for kv in variant.split("+"))}
                     for variant in args.tunes.split(",")] + [{}]
        for tune in tunes:
            try:
                fdv = FastDecoder(m, s, tune=tune)
                fdv.decode(tok0, 4)
                run = dec(fdv)
                tv, _ = _time(run, args.reps)
            except Exception as exc:  # e.g. too many resources for a launch shape
                r["tune"].append({"tune": tune, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            r["tune"].append({"tune": tune, "tok_s": ng / tv, "tokens_equal": run.out == tokens_graph})
            print(f"  tune {tune}: {ng / tv:,.0f} tok/s", flush=True)
            if args.profile_tunes and tune:
                rows = profile_decode_step(fdv)
                r["tune"][-1]["profile"] = {k: v for k, v in summarize(rows).items()}
                print(format_profile(rows, f"{label}, tune {tune}: per-kernel GPU time of one decode step"), flush=True)
            if ng / tv > best[0]:
                best = (ng / tv, tune)
            del fdv
        r["best_tune"] = best[1]
        r["best_decode_tok_s"] = best[0]

    # ---- step path decode (op by op), a few tokens
    n_step = min(ng, 16)
    s.truncate(npr)
    t0 = time.perf_counter()
    tok = tok0
    step_tokens = []
    for _ in range(n_step):
        tok = int(np.argmax(s.forward([tok], last_only=True)[-1]))
        step_tokens.append(tok)
    r["decode_step_tok_s"] = n_step / (time.perf_counter() - t0)
    r["step_tokens_equal_graph_prefix"] = step_tokens == tokens_graph[:n_step]

    if args.profile and key == args.profile_prefill:
        s.reset()
        rows = profile_forward(s, prompt, reps=2)
        print(format_profile(rows, f"{label}: per-op GPU time of a step-path prefill of {npr} tokens"), flush=True)
    st = be.memory_stats()
    r["weights_MiB"] = st["weights"]["bytes"] / 2**20
    r["device_allocations"] = st["device_allocations"]
    del m, s
    cupy.get_default_memory_pool().free_all_blocks()
    return r


def table(results, bw) -> str:
    lines = [f"copy bandwidth (device-to-device, read+write): {bw / 1e9:.0f} GB/s", "",
             "| model | prefill pp512 tok/s (fast / first call / step) | vs llama.cpp | decode tg128 tok/s (graph) | vs llama.cpp "
             "(target) | eager tok/s | step tok/s | weights MiB/token | eff. GB/s | of copy BW | mode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['prefill_fast_tok_s']:,.0f} / {r['prefill_first_tok_s']:,.0f} / "
            f"{r['prefill_step_tok_s']:,.0f} | "
            f"{r['prefill_fast_tok_s'] / r['ref_pp']:.2f}x | {r['decode_tok_s']:,.0f} | "
            f"{r['decode_tok_s'] / r['ref_tg']:.2f}x ({r['target_x']}x) | {r['decode_eager_tok_s']:,.0f} | "
            f"{r['decode_step_tok_s']:,.0f} | {r['weight_bytes_per_token'] / 2**20:,.1f} | {r['eff_bandwidth_GBs']:,.0f} | "
            f"{100 * r['bw_fraction']:.1f}% | {r['mode']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen0.5b,qwen7b")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=0,
                    help="session context (default: prompt + generated + 16, as llama-bench sizes its context)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-prefill", default="smollm2")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tunes", default="", help="with --tune: only these variants, e.g. early_state=0,pdl=0+merge_max=0 "
                    "(',' between variants, '+' between the keys of one; the defaults are re-measured after them)")
    ap.add_argument("--profile-tunes", action="store_true",
                    help="with --tune: also print the per-kernel profile of each variant")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args(argv)
    import cupy

    bw = copy_bandwidth()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"device: {name}, cupy {cupy.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    want = args.models.split(",")
    results = []
    for spec in MODELS:
        if spec[0] not in want:
            continue
        try:
            r = bench_one(spec, args, bw)
        except Exception as exc:  # keep going: report the failure in the table's place
            import traceback

            traceback.print_exc()
            print(f"{spec[1]}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        results.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "profile"}),
              flush=True)
    print()
    print(f"device: {name}")
    print(table(results, bw))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "copy_bw": bw, "results": results}, indent=1,
                                              default=str))
    return results


if __name__ == "__main__":
    main()
