"""`rocmforge-lab bench`: prefill and decode tokens per second, and memory, for a model and device."""
from __future__ import annotations

import resource
import statistics
import sys
import time

import numpy as np


# llama.cpp's CUDA backend on one NVIDIA H200 (llama-bench -p 512 -n 128, flash attention, all layers
# on the GPU; measured 2026-11-21, issue 6): (label, arch, n_layer, d_model, vocab, general.file_type)
# -> (prefill pp512 tok/s, decode tg128 tok/s). The synthetic presets of synth.py match by shape.
LLAMA_CPP_H200 = {
    ("SmolLM2-135M Q4_1", "llama", 30, 576, 49152, 3): (48469, 939),
    ("Qwen2.5-0.5B Q4_K_M", "qwen2", 24, 896, 151936, 15): (41970, 852),
    ("Qwen2.5-7B Q4_K_M", "qwen2", 28, 3584, 152064, 15): (9636, 281),
}


def llama_cpp_reference(model) -> tuple[str, int, int] | None:
    """(label, prefill tok/s, decode tok/s) of llama.cpp on an H200 for this model's shape and
    quantization, or None when we have no reference figure for it."""
    c = model.config
    ftype = model.gguf.get("general.file_type")
    for (label, arch, n_layer, d_model, vocab, ft), (pp, tg) in LLAMA_CPP_H200.items():
        if (c.arch, c.n_layer, c.d_model, c.vocab_size, ftype) == (arch, n_layer, d_model, vocab, ft):
            return label, pp, tg
    return None


def device_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of `reps` copies
    of `nbytes`, timed with events: the yardstick for the decode's effective bandwidth."""
    import cupy

    from .backend.memory import device_alloc

    src = device_alloc(nbytes, "bandwidth probe (source)", "scratch")
    dst = device_alloc(nbytes, "bandwidth probe (destination)", "scratch")
    times = []
    for i in range(reps + 1):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record()
        dst.copy_from_device_async(src, nbytes)
        e1.record()
        e1.synchronize()
        if i:  # the first copy warms up
            times.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e-3)
    return 2 * nbytes / statistics.median(times)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fast_decoder(model, session, fast: bool):
    """The GPU fast decoder for `session` (graphed greedy decode), or None (CPU, disabled, unsupported)."""
    if not fast or model.device != "gpu":
        return None
    from .backend.fast_decode import fast_decoder_for

    return fast_decoder_for(session)


def bench_model(model, n_prompt: int = 64, n_gen: int = 32, repetitions: int = 3, fast: bool = True) -> dict:
    """Time prefill of `n_prompt` tokens and decode of `n_gen` tokens (greedy), median of repetitions.

    Prompt tokens are fixed ids drawn from the vocabulary with a fixed seed, so runs compare.
    On a GPU, prefill and decode run the fused fast paths unless `fast=False` (then op by op).
    """
    if fast or model.device != "gpu":
        return _bench_model(model, n_prompt, n_gen, repetitions, fast)
    from .backend import fast_decode

    was = fast_decode.FAST_DEFAULT
    fast_decode.set_fast(False)
    try:
        return _bench_model(model, n_prompt, n_gen, repetitions, fast)
    finally:
        fast_decode.set_fast(was)


def _bench_model(model, n_prompt: int, n_gen: int, repetitions: int, fast: bool) -> dict:
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompt = rng.integers(100, min(vocab, 20000), size=n_prompt).tolist()
    session = model.session(n_ctx=min(model.config.n_ctx, n_prompt + n_gen + 8))
    sync = getattr(model.backend, "synchronize", lambda: None)

    session.forward(prompt[:8], last_only=True)  # warm-up (kernel compilation, caches)
    session.reset()
    first = None
    if model.device == "gpu" and fast:
        # the fused GPU prefill captures a graph of a prompt length on its second use (see
        # backend/prefill.py): time the first full-length call, then let the second capture it
        for i in range(2):
            session.reset()
            t0 = time.perf_counter()
            session.forward(prompt, last_only=True)
            sync()
            first = first or n_prompt / (time.perf_counter() - t0)
    fd = _fast_decoder(model, session, fast)
    prefill, decode = [], []
    for _ in range(repetitions):
        session.reset()
        t0 = time.perf_counter()
        logits = session.forward(prompt, last_only=True)
        sync()
        prefill.append(n_prompt / (time.perf_counter() - t0))
        token = int(np.argmax(logits[-1]))
        t0 = time.perf_counter()
        if fd is not None:
            fd.decode(token, n_gen)
        else:
            for _ in range(n_gen):
                logits = session.forward([token], last_only=True)
                token = int(np.argmax(logits[-1]))
        sync()
        decode.append(n_gen / (time.perf_counter() - t0))
    result = {
        "model": model.config.name,
        "path": str(model.path),
        "device": model.device,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "prefill_tok_s": statistics.median(prefill),
        "prefill_first_tok_s": first,
        "decode_tok_s": statistics.median(decode),
        "peak_rss_mib": _peak_rss_mib(),
        "decode_path": f"gpu fast ({fd.mode})" if fd is not None else f"{model.backend.name} op by op",
    }
    if fd is not None:
        result["profile_decoder"] = (fd, session)  # the decoder holds its session weakly
        weight_bytes = fd.plan.weight_bytes
        copy_bw = device_copy_bandwidth()
        result["weight_mib_per_token"] = weight_bytes / 2**20
        result["effective_gb_s"] = weight_bytes * result["decode_tok_s"] / 1e9
        result["copy_gb_s"] = copy_bw / 1e9
        result["bandwidth_fraction"] = weight_bytes * result["decode_tok_s"] / copy_bw
    ref = llama_cpp_reference(model) if model.device == "gpu" else None
    if ref is not None:
        result["llama_cpp_h200"] = {"label": ref[0], "prefill_tok_s": ref[1], "decode_tok_s": ref[2],
                                    "prefill_ratio": result["prefill_tok_s"] / ref[1],
                                    "decode_ratio": result["decode_tok_s"] / ref[2]}
    if model.device == "cpu":
        result["threads"] = f"prefill {model.n_threads}, decode {model.decode_threads}"
    mem = getattr(model.backend, "memory_stats", None)
    if mem is not None:
        result["device_memory"] = mem()
    return result


def _format_memory(stats: dict) -> str:
    """memory_stats() as one line: byte counts in MiB, nested dicts flattened."""
    parts = []

    def walk(prefix, d):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (int, np.integer)) and ("bytes" in k) and not isinstance(v, bool):
                parts.append(f"{key}={v / 2**20:.1f} MiB")
            else:
                parts.append(f"{key}={v}")
    walk("", stats)
    return ", ".join(parts)


def run_bench(args) -> dict:
    """The CLI entry: load, benchmark, print a table."""
    import rocmforge_lab as rf

    model = rf.load(args.model, device=args.device, progress=sys.stderr.isatty())
    if args.threads:
        model.n_threads = args.threads
    if getattr(args, "decode_threads", None):
        model.decode_threads = args.decode_threads
    r = bench_model(model, n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions,
                    fast=not args.no_fast)
    fd, _session = r.pop("profile_decoder", (None, None))
    print(f"model   : {r['model']}  ({r['path']})")
    print(f"device  : {r['device']}" + (f"  (BLAS threads: {r['threads']})" if "threads" in r else ""))
    first = (f"; first call of this length {r['prefill_first_tok_s']:.1f} tok/s, before its graph"
             if r.get("prefill_first_tok_s") else "")
    print(f"prefill : {r['prefill_tok_s']:10.1f} tok/s   (pp{r['n_prompt']}, median of {args.repetitions}{first})")
    print(f"decode  : {r['decode_tok_s']:10.1f} tok/s   (tg{r['n_gen']}, median of {args.repetitions}; {r['decode_path']})")
    if "bandwidth_fraction" in r:
        print(f"bandwidth: {r['weight_mib_per_token']:.1f} MiB of weights per token x decode tok/s = "
              f"{r['effective_gb_s']:.0f} GB/s = {100 * r['bandwidth_fraction']:.1f}% of the device's copy "
              f"bandwidth ({r['copy_gb_s']:.0f} GB/s, measured now)")
    if "llama_cpp_h200" in r:
        ref = r["llama_cpp_h200"]
        print(f"vs llama.cpp: prefill {ref['prefill_ratio']:.2f}x, decode {ref['decode_ratio']:.2f}x of its H200 "
              f"figures "
              f"for {ref['label']} ({ref['prefill_tok_s']:,} / {ref['decode_tok_s']:,} tok/s at pp512 / tg128; "
              f"compare on an H200 with -p 512 -n 128)")
    print(f"memory  : {r['peak_rss_mib']:10.1f} MiB peak host RSS")
    if "device_memory" in r:
        print(f"device memory: {_format_memory(r['device_memory'])}")
    if args.profile:
        if fd is None:
            print("--profile: per-kernel GPU times need the GPU fast path (--device gpu, without --no-fast)")
        else:
            from .backend.profile import format_profile, profile_decode_step

            print(format_profile(profile_decode_step(fd)))
    return r
