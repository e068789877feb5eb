"""`rocmforge-lab` command line: generate, chat, inspect, models, bench, quant-eval."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Sequence

from . import __version__, models


class CLIError(Exception):
    """An error to print as one line, without a traceback."""


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed)


def _load(args):
    import rocmforge_lab as rf

    return rf.load(args.model, device=args.device, progress=sys.stderr.isatty())


def cmd_generate(args) -> int:
    m = _load(args)
    stream = m.session().stream(args.prompt, max_tokens=args.n, stop=args.stop or (), **_sampling(args))
    print(args.prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    res = stream.result
    t = res.timings
    print(f"[{t['prefill_tokens']} prompt tokens at {t['prefill_tok_s']:.1f} tok/s, "
          f"{len(res.token_ids)} generated at {t['decode_tok_s']:.1f} tok/s, finish: {res.finish_reason}]",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    m = _load(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {m.config.name} on {m.device}; empty line or Ctrl-D to quit", file=sys.stderr)
    session = m.session()
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        session.reset()
        reply = []
        for piece in session.stream(prompt, max_tokens=args.n, **_sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_inspect(args) -> int:
    from .gguf_file import open_gguf

    path = models.resolve(args.model, progress=sys.stderr.isatty())
    gf = open_gguf(path)
    print(f"file: {gf.path}  ({gf.path.stat().st_size:,} bytes, GGUF v{gf.version})")
    print(f"architecture: {gf.get('general.architecture', '?')}   name: {gf.get('general.name', '?')}")
    print("\nmetadata:")
    for key, value in gf.metadata.items():
        if isinstance(value, list):
            shown = f"[{len(value)} items] " + ", ".join(repr(v) for v in value[:4]) + (" ..." if len(value) > 4 else "")
        else:
            shown = repr(value)
            if len(shown) > 100:
                shown = shown[:97] + "..."
        print(f"  {key:<45} {shown}")
    print(f"\ntensors ({len(gf.tensors)}):")
    print(f"  {'name':<32} {'type':<6} {'shape':<18} {'bytes':>12}")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in gf.tensors.values():
        if not args.summary:
            print(f"  {t.name:<32} {t.type_name:<6} {str(list(t.shape)):<18} {t.n_bytes:>12,}")
        agg = totals[t.type_name]
        agg[0] += 1
        agg[1] += t.n_elements
        agg[2] += t.n_bytes
    print("\ntotals per type:")
    print(f"  {'type':<6} {'tensors':>8} {'params':>14} {'bytes':>14} {'bits/weight':>12}")
    all_p = all_b = 0
    for name, (count, params, nbytes) in sorted(totals.items(), key=lambda kv: -kv[1][2]):
        print(f"  {name:<6} {count:>8} {params:>14,} {nbytes:>14,} {8 * nbytes / max(params, 1):>12.2f}")
        all_p += params
        all_b += nbytes
    print(f"  {'all':<6} {len(gf.tensors):>8} {all_p:>14,} {all_b:>14,} {8 * all_b / max(all_p, 1):>12.2f}")
    from .loader import validate

    _, config = validate(gf)
    print(f"\ncheck: runnable ({config.arch}, {config.n_layer} layers, GQA {config.n_head}/{config.n_head_kv}, "
          f"rope {config.rope_style}, {'tied' if config.tied_output else 'separate'} output)")
    return 0


def cmd_models(args) -> int:
    if args.action == "list":
        for entry in models.list_models():
            mark = "cached" if models.is_cached(entry.name) else "-"
            default = " (default)" if entry.name == models.DEFAULT_MODEL else ""
            print(f"{entry.name:<30} {entry.size / 2**20:8.1f} MiB  {mark:<7} {entry.description}{default}")
        return 0
    if not args.name:
        raise CLIError(f"'models {args.action}' needs a model name (see 'rocmforge-lab models list')")
    if args.action == "pull":
        print(models.pull(args.name, force=args.force, progress=True))
    else:  # path
        print(models.model_path(args.name))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(args)
    return 0


def cmd_quant_eval(args) -> int:
    import time

    from .quant.eval import format_table, parse_types, quant_eval

    types = parse_types(args.types)
    text = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    t0 = time.perf_counter()
    m = _load(args)
    rows = quant_eval(m, types, text=text, n_tokens=args.tokens or None, incompatible=args.incompatible,
                      progress=sys.stderr.isatty())
    print(format_table(rows, title=f"quant-eval: {m.config.name} ({m.path.name}), rows that do not fit a "
                                   f"type: {args.incompatible}"))
    print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocmforge-lab", description="Run and look inside GGUF language models.")
    parser.add_argument("--version", action="version", version=f"rocmforge-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("-m", "--model", default=models.DEFAULT_MODEL, help="registry name or path to a .gguf")
        p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])

    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", type=int, default=64, help="maximum new tokens")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    model_args(p)
    _add_sampling_args(p, 0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat using the model's chat template")
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--system", default=None)
    model_args(p)
    _add_sampling_args(p, 0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="print metadata and the tensor table of a GGUF")
    p.add_argument("model", nargs="?", default=models.DEFAULT_MODEL, help="registry name or .gguf path")
    p.add_argument("--summary", action="store_true", help="only the per-type totals")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="list, pull or locate registry models")
    p.add_argument("action", choices=["list", "pull", "path"])
    p.add_argument("name", nargs="?")
    p.add_argument("--force", action="store_true", help="re-download even if cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="prefill/decode tokens per second and memory")
    model_args(p)
    p.add_argument("-p", "--n-prompt", type=int, default=64, help="prompt tokens for prefill")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="tokens to decode")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads for CPU prefill (default: cores)")
    p.add_argument("--decode-threads", type=int, default=None, help="BLAS threads for CPU decode (default: cores)")
    p.add_argument("--no-fast", action="store_true", help="GPU: prefill and decode op by op instead of the fused fast paths")
    p.add_argument("--profile", action="store_true", help="GPU: print per-kernel time of one fast decode step")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quant-eval", help="requantize a model into several types and measure the damage")
    model_args(p)
    p.add_argument("--types", default="q4_0,q4_1,q5_0,q8_0,q4_k,q6_k,mxfp4",
                   help="comma-separated GGUF types (default %(default)s)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the evaluation text (0 = all; default %(default)s)")
    p.add_argument("--text", default=None, help="evaluation text file (default: the shipped data/eval_text.txt)")
    p.add_argument("--incompatible", default="fallback", choices=["fallback", "simulate"],
                   help="rows a K-quant cannot hold: llama.cpp's fallback types, or simulate (pad rows)")
    p.set_defaults(func=cmd_quant_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (CLIError, models.ModelError, FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"rocmforge-lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
