"""The fused GPU prefill (backend/prefill.py) against the op-by-op program on the same backend.

Both paths multiply f16 inputs by f16-dequantized weights with f32 accumulation; they differ in
where the residual add and the f32 -> f16 roundings happen, so logits agree to ~1e-5 relative L2
(held to 1e-3: an indexing or RoPE mistake gives O(1)).
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

CASES = [("llama", "q4_1", {"n_layer": 2, "head_dim": 64}),
         ("qwen2", "q4_k_m", "tiny"),
         ("qwen2", "q8_0", "tiny"),
         ("llama", "q6_k", {"n_layer": 2, "head_dim": 128}),
         ("llama", "q4_1", {"base": "smollm2-135m", "n_layer": 2}),
         ("qwen2", "q4_k_m", {"base": "qwen2.5-0.5b", "n_layer": 2})]

_MODELS: dict = {}


def _model(tmp_path_factory, arch, qtype, shape):
    import rocmforge_lab as rf
    from rocmforge_lab import synth

    key = (arch, qtype, str(shape))
    if key not in _MODELS:
        _MODELS.clear()
        tag = shape if isinstance(shape, str) else "-".join(f"{k}{v}" for k, v in shape.items())
        path = synth.make_gguf(tmp_path_factory.mktemp("prefill") / f"{arch}-{qtype}-{tag}.gguf", arch=arch,
                               shape=shape, qtype=qtype, seed=4, random_bytes=not isinstance(shape, str))
        _MODELS[key] = rf.load(str(path), device="gpu", progress=False)
    return _MODELS[key]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _step_forward(session, ids):
    """The op-by-op program (what stepping and tracing run)."""
    state, ops = session.begin_forward(ids, last_only=True)
    for _ in ops:
        pass
    return session.finish_forward(state)


@pytest.mark.parametrize("arch,qtype,shape", CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_fused_prefill_equals_op_by_op(tmp_path_factory, arch, qtype, shape):
    from rocmforge_lab.backend.prefill import prefill_for

    m = _model(tmp_path_factory, arch, qtype, shape)
    pf = prefill_for(m)
    assert pf is not None
    ref_s, got_s = m.session(n_ctx=300), m.session(n_ctx=300)
    vocab = m.config.vocab_size
    p1 = [int(t) for t in np.random.default_rng(1).integers(0, vocab, 150)]
    p2 = [7, 8, 9, 300, 301]
    for p in (p1, p2):  # the second prompt continues after cached tokens
        ref = _step_forward(ref_s, p)
        got = got_s.forward(p, last_only=True)     # the plain path takes the fused prefill
        assert got.shape == ref.shape == (1, vocab)
        assert _rel(got, ref) < 1e-3, _rel(got, ref)
        assert ref_s.tokens == got_s.tokens
    # the caches agree: one op-by-op step from each gives the same logits
    assert _rel(_step_forward(got_s, [5]), _step_forward(ref_s, [5])) < 1e-3


def test_graph_replays_serve_any_start_and_length(tmp_path_factory):
    """Chunks are padded to 16, 32, ... tokens and replayed from graphs captured on the second use
    of a length (and cache); the same graph at other start positions, and the padding rows' K/V
    written past the prompt, change nothing: every prompt and the token after them match the
    op-by-op program."""
    from rocmforge_lab.backend.prefill import graph_tokens, prefill_for

    m = _model(tmp_path_factory, "qwen2", "q4_k_m", "tiny")
    pf = prefill_for(m)
    assert pf is not None
    rng = np.random.default_rng(3)
    vocab = m.config.vocab_size
    # padded to 32 (eager), 16 (eager), 16 (captured, replayed), 16 (replayed at another start),
    # 32 (eager: start 56 + 32 would run past n_ctx)
    lengths = [20, 9, 13, 14, 30]
    n_ctx = sum(lengths) + 1
    assert [graph_tokens(n) for n in lengths] == [32, 16, 16, 16, 32]
    ref_s, got_s = m.session(n_ctx=n_ctx), m.session(n_ctx=n_ctx)
    before = pf.graph_replays
    for n in lengths:
        p = [int(t) for t in rng.integers(0, vocab, n)]
        ref = _step_forward(ref_s, p)
        got = got_s.forward(p, last_only=True)
        assert _rel(got, ref) < 1e-3, (n, _rel(got, ref))
    if m.backend.is_hip:
        assert pf.graph_replays == before
    else:
        assert pf.graph_error is None, pf.graph_error
        assert pf.graph_replays - before == 2
    assert _rel(_step_forward(got_s, [5]), _step_forward(ref_s, [5])) < 1e-3


def test_long_prompts_run_in_chunks(tmp_path_factory, monkeypatch):
    from rocmforge_lab.backend import prefill

    m = _model(tmp_path_factory, "qwen2", "q8_0", "tiny")
    ids = [int(t) for t in np.random.default_rng(2).integers(0, m.config.vocab_size, 100)]
    whole = m.session(n_ctx=128).forward(ids, last_only=True)
    monkeypatch.setattr(prefill, "CHUNK", 7)
    s = m.session(n_ctx=128)
    chunked = s.forward(ids, last_only=True)
    assert s.n_past == 100
    assert _rel(chunked, whole) < 1e-4
    assert _rel(_step_forward(s, [3]), _step_forward(m.session(n_ctx=128), ids + [3])) < 1e-3


def test_not_used_with_hooks_or_unsupported_heads(tmp_path_factory):
    from rocmforge_lab.backend.prefill import prefill_for

    m = _model(tmp_path_factory, "llama", "q8_0", "tiny")  # head_dim 32: no prefill attention kernel
    assert prefill_for(m) is None
    s = m.session(n_ctx=64)
    assert s.forward([1, 2, 3], last_only=True).shape == (1, m.config.vocab_size)  # op-by-op fallback
    m2 = _model(tmp_path_factory, "qwen2", "q8_0", "tiny")
    seen = []
    s2 = m2.session(n_ctx=64)
    with s2.hooks({"blk.0.attn_norm": lambda x: seen.append(x.shape)}):
        s2.forward([1, 2, 3], last_only=True)
    assert seen == [(3, m2.config.d_model)]  # hooks see every op: the op-by-op program ran
