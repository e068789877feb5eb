"""The NumPy engine's stacked Q/K/V and gate/up products (model.Transformer._fuse_linears).

Stacking is an execution detail: the ops, their hook names and their values must be what the
separate products give, and an intervention on one member or on the shared input must act as if
the products were separate.
"""
from __future__ import annotations

import numpy as np
import pytest

import rocmforge_lab as rf
from rocmforge_lab import synth

PROMPT = "The capital of France is"


def _forward_trace(model, ids, patterns, hooks=None):
    s = model.session()
    if hooks:
        with s.hooks(hooks), s.trace(patterns) as tr:
            logits = s.forward(ids)
    else:
        with s.trace(patterns) as tr:
            logits = s.forward(ids)
    return logits, tr


def _unfused(model):
    """Run `model` with the per-tensor products (the member weights are views: same numbers)."""
    class Unfused:
        def __enter__(self):
            self.saved = model.transformer.fused
            model.transformer.fused = {}

        def __exit__(self, *exc):
            model.transformer.fused = self.saved
    return Unfused()


@pytest.fixture(scope="module")
def qwen2_tiny(tmp_path_factory):
    path = synth.make_gguf(tmp_path_factory.mktemp("fused") / "tiny-qwen2.gguf", arch="qwen2", shape="tiny",
                           qtype="q8_0", seed=5)
    return rf.load(path, device="cpu", progress=False)


@pytest.mark.parametrize("which", ["smollm2", "qwen2_tiny"])
def test_stacked_products_equal_separate_ones(which, request):
    model = request.getfixturevalue("smollm2_cpu" if which == "smollm2" else "qwen2_tiny")
    tf = model.transformer
    assert set(tf.fused) == {f"blk.{i}.{g}" for i in range(model.config.n_layer) for g in ("qkv", "ffn_gate_up")}
    # the member weights are views into the stacked matrix, not copies
    g = tf.fused["blk.0.qkv"]
    assert np.shares_memory(tf.weights["blk.0.attn_k.weight"], g.weight)
    if model.config.qkv_bias:
        assert g.bias is not None and np.shares_memory(tf.weights["blk.0.attn_v.bias"], g.bias)
    ids = model.tokenizer.encode(PROMPT)
    patterns = ["blk.*.attn_q", "blk.*.attn_k", "blk.*.attn_v", "blk.*.ffn_gate", "blk.*.ffn_up", "logits"]
    for n in (len(ids), 1):  # prefill and a one-token (decode) pass
        fused_logits, fused_tr = _forward_trace(model, ids[:n], patterns)
        with _unfused(model):
            plain_logits, plain_tr = _forward_trace(model, ids[:n], patterns)
        # same numbers up to BLAS summation order over a differently sized product
        np.testing.assert_allclose(fused_logits, plain_logits, rtol=1e-5, atol=1e-4)
        for name in ("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v", "blk.0.ffn_gate", "blk.0.ffn_up"):
            np.testing.assert_allclose(fused_tr[name], plain_tr[name], rtol=1e-5, atol=1e-5)


def test_intervention_on_one_member_leaves_the_others(smollm2_cpu):
    model = smollm2_cpu
    ids = model.tokenizer.encode(PROMPT)
    names = ["blk.2.attn_q", "blk.2.attn_k", "blk.2.attn_v", "blk.2.ffn_gate", "blk.2.ffn_up"]
    clean_logits, clean = _forward_trace(model, ids, names)
    # (Q feeds the attention, and so this layer's FFN input: zero Q and the gate in separate runs)
    for zeroed, untouched in (("blk.2.attn_q", ("blk.2.attn_k", "blk.2.attn_v")),
                              ("blk.2.ffn_gate", ("blk.2.ffn_up",))):
        logits, tr = _forward_trace(model, ids, names, {zeroed: lambda x: np.zeros_like(x)})
        assert not np.any(tr[zeroed])
        for name in untouched:
            np.testing.assert_array_equal(tr[name], clean[name])
        assert not np.allclose(logits, clean_logits, atol=1e-2)


def _scale_by(factor):
    return lambda x: factor * x


def test_intervention_on_the_shared_input_reaches_every_member(smollm2_cpu):
    model = smollm2_cpu
    ids = model.tokenizer.encode(PROMPT)
    names = ["blk.1.attn_q", "blk.1.attn_v", "blk.1.ffn_gate", "blk.1.ffn_up"]
    _, clean = _forward_trace(model, ids, names)
    # linear and bias-free (SmolLM2): scaling the shared input scales every member's output
    for norm, factor, members in (("blk.1.attn_norm", 2.0, ("blk.1.attn_q", "blk.1.attn_v")),
                                  ("blk.1.ffn_norm", 3.0, ("blk.1.ffn_gate", "blk.1.ffn_up"))):
        _, tr = _forward_trace(model, ids, names, {norm: _scale_by(factor)})
        for name in members:
            np.testing.assert_allclose(tr[name], factor * clean[name], rtol=1e-4, atol=1e-4)


def test_backend_ops_leave_their_inputs_unchanged():
    """Ops work in place on their own outputs only (a hook or trace holds the inputs)."""
    from rocmforge_lab.backend.numpy_backend import NumpyBackend

    be = NumpyBackend()
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x = rng.standard_normal((n, 4, 8)).astype(np.float32)
        keep = x.copy()
        for style in ("normal", "neox"):
            be.rope(x, np.arange(n, dtype=np.int32) + 5, 8, 10000.0, style)
            be.rope(x, np.arange(n, dtype=np.int32) + 5, 4, 10000.0, style)
        h = rng.standard_normal((n, 16)).astype(np.float32)
        g, u, sc = h.copy(), h[:, ::-1].copy(), rng.standard_normal((2, n, 5)).astype(np.float32)
        kept = [h.copy(), g.copy(), u.copy(), sc.copy()]
        be.rms_norm(h, np.ones(16, np.float32), 1e-5)
        be.swiglu(g, u)
        be.softmax(sc)
        np.testing.assert_array_equal(x, keep)
        for a, b in zip((h, g, u, sc), kept):
            np.testing.assert_array_equal(a, b)
