"""The transformer, written once as a program of named ops over a Backend.

`Transformer.program` is a flat list of `Op`s named after GGUF tensors (the hook names of
DESIGN.md: `token_embd`, `blk.{i}.attn_norm`, ..., `output_norm`, `logits`). Running a forward
pass means executing the ops in order over a `ForwardState`; stepping, tracing and
interventions (session.py, trace.py) all go through `Transformer.execute`, so the step path
and the plain path compute the same thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .arch import ArchSpec
from .backend.base import Array, Backend
from .config import ModelConfig
from .gguf_file import GGUFFile, GGUFFormatError


@dataclass
class ForwardState:
    """Everything one forward pass reads and writes: inputs, cache and every op's output."""

    ids: Array                # [n] int32 token ids (backend array)
    positions: Array          # [n] int32 absolute positions
    start: int                # position of the first token (= tokens already in the cache)
    k_cache: Array            # [n_layer, n_head_kv, n_ctx, head_dim]
    v_cache: Array
    logits_rows: slice = field(default_factory=lambda: slice(None))  # which rows get logits
    values: dict[str, Array] = field(default_factory=dict)           # op name -> output
    scratch: dict[str, Any] = field(default_factory=dict)            # fused products shared by ops

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_keys(self) -> int:
        return self.start + self.n_tokens


@dataclass(frozen=True)
class FusedLinear:
    """Matrices that read the same input (a layer's Q/K/V, or gate/up), stacked into one.

    `weight` is [sum of outs, in]; `bias` the stacked biases or None; `names` the member tensors
    and `bounds` their [start, stop) output columns."""

    weight: Any
    bias: Any
    names: tuple[str, ...]
    bounds: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Op:
    """One named step of the program.

    `inputs` lists the state values it reads (for display and stepping); `run` computes
    its output from the state.
    """

    name: str
    kind: str
    layer: int | None
    inputs: tuple[str, ...]
    run: Callable[[ForwardState], Array]


Hook = Callable[[Op, Array, ForwardState], Any]  # returns None (read-only) or a replacement array


class Transformer:
    """A llama-like decoder over a Backend: weights + the op program."""

    def __init__(self, config: ModelConfig, arch: ArchSpec, backend: Backend, weights: dict[str, Any]):
        self.config = config
        self.arch = arch
        self.backend = backend
        self.weights = weights  # tensor name -> backend Weight
        self.fused: dict[str, FusedLinear] = self._fuse_linears()  # "blk.{i}.qkv" / "blk.{i}.ffn_gate_up"
        self.program: list[Op] = self._build_program()
        self._dead_after = self._release_points()  # op index -> values no later op reads

    # --- construction -------------------------------------------------------------
    @staticmethod
    def check_shapes(gf: GGUFFile, config: ModelConfig, arch: ArchSpec) -> list[str]:
        """Every tensor the program needs, checked against the file. Returns their names.

        A missing tensor or wrong shape raises GGUFFormatError naming the tensor, the expected
        and the found shape, before any weight is loaded.
        """
        specs = arch.global_weights(config)
        for i in range(config.n_layer):
            specs += arch.layer_weights(config, i)
        names = []
        for spec in specs:
            t = gf.tensors.get(spec.tensor)
            if t is None:
                if spec.optional:
                    continue
                raise GGUFFormatError(
                    f"{gf.path}: tensor '{spec.tensor}' is missing (expected shape {spec.shape})"
                )
            if tuple(t.shape) != tuple(spec.shape):
                raise GGUFFormatError(
                    f"{gf.path}: tensor '{spec.tensor}' has shape {tuple(t.shape)}, expected {spec.shape}"
                )
            names.append(spec.tensor)
        return names

    @classmethod
    def from_gguf(cls, gf: GGUFFile, config: ModelConfig, arch: ArchSpec, backend: Backend,
                  progress: bool = False) -> "Transformer":
        """Check every shape, then load every weight into the backend."""
        from tqdm.auto import tqdm

        names = cls.check_shapes(gf, config, arch)
        weights = {}
        for name in tqdm(names, desc="load weights", unit="tensor", disable=not progress, leave=False):
            try:
                weights[name] = backend.load_weight(gf.tensors[name])
            except ValueError as exc:
                raise GGUFFormatError(f"{gf.path}: {exc}") from exc
        return cls(config, arch, backend, weights)

    def _w(self, name: str):
        return self.weights[name]

    def _fuse_linears(self) -> dict[str, FusedLinear]:
        """Stack each layer's Q/K/V and gate/up matrices where the backend can (`fuse_rows`: the
        NumPy engine), so that one product per group serves its ops; the member weights become
        views into the stacked matrix. The ops and their hook names stay the same."""
        fuse = getattr(self.backend, "fuse_rows", None)
        if fuse is None:
            return {}
        groups: dict[str, FusedLinear] = {}
        for i in range(self.config.n_layer):
            p = f"blk.{i}."
            for key, roles, has_bias in (("qkv", ("attn_q", "attn_k", "attn_v"), self.config.qkv_bias),
                                         ("ffn_gate_up", ("ffn_gate", "ffn_up"), False)):
                names = tuple(p + r + ".weight" for r in roles)
                weight, views = fuse([self.weights[n] for n in names])
                bias = None
                if has_bias:
                    bias_names = [p + r + ".bias" for r in roles]
                    bias, bias_views = fuse([self.weights[n] for n in bias_names])
                    self.weights.update(zip(bias_names, bias_views))
                self.weights.update(zip(names, views))
                bounds, start = [], 0
                for v in views:
                    bounds.append((start, start + v.shape[0]))
                    start += v.shape[0]
                groups[p + key] = FusedLinear(weight, bias, names, tuple(bounds))
        return groups

    def _linear(self, s: ForwardState, x_name: str, weight_name: str, bias_name: str | None,
                group: str | None = None) -> Array:
        """weight_name's product with the value x_name (+ bias). In a fused group, the first member
        computes the stacked product once and the others slice it, as long as their input is the
        very array it was computed from (an intervention that replaced it gets its own product)."""
        x = s.values[x_name]
        fused = self.fused.get(group) if group else None
        if fused is None:
            return self.backend.linear(x, self._w(weight_name), self._w(bias_name) if bias_name else None)
        cached = s.scratch.get(group)
        if cached is None or cached[0] is not x:
            cached = (x, self.backend.linear(x, fused.weight, fused.bias))  # [n, sum of outs]
            s.scratch[group] = cached
        member = fused.names.index(weight_name)
        if member == len(fused.names) - 1:
            del s.scratch[group]
        start, stop = fused.bounds[member]
        return cached[1][:, start:stop]  # [n, out]

    def _build_program(self) -> list[Op]:
        cfg, be = self.config, self.backend
        ops: list[Op] = []

        def op(name, kind, layer, inputs, run):
            ops.append(Op(name, kind, layer, tuple(inputs), run))

        op("token_embd", "embed", None, ["ids"],
           lambda s: be.embed(self._w("token_embd.weight"), s.ids))  # [n, d_model]
        resid = "token_embd"
        for i in range(cfg.n_layer):
            resid = self._layer_ops(op, i, resid)
        op("output_norm", "rms_norm", None, [resid],
           lambda s, r=resid: be.rms_norm(s.values[r][s.logits_rows], self._w("output_norm.weight"), cfg.rms_eps))
        out_name = "token_embd.weight" if cfg.tied_output else "output.weight"
        op("logits", "linear", None, ["output_norm"],
           lambda s: be.linear(s.values["output_norm"], self._w(out_name)))  # [n_rows, vocab]
        return ops

    def _layer_ops(self, op, i: int, resid: str) -> str:
        cfg, be = self.config, self.backend
        p = f"blk.{i}."
        n_head, n_kv, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        scale = 1.0 / math.sqrt(hd)

        def bias(role):
            return p + role + ".bias" if cfg.qkv_bias else None

        op(p + "attn_norm", "rms_norm", i, [resid],
           lambda s: be.rms_norm(s.values[resid], self._w(p + "attn_norm.weight"), cfg.rms_eps))
        for role in ("attn_q", "attn_k", "attn_v"):
            op(p + role, "linear", i, [p + "attn_norm"],
               lambda s, r=role: self._linear(s, p + "attn_norm", p + r + ".weight", bias(r), p + "qkv"))
        op(p + "attn_q_rope", "rope", i, [p + "attn_q"],  # [n, n_head, head_dim]
           lambda s: be.rope(s.values[p + "attn_q"].reshape(s.n_tokens, n_head, hd), s.positions,
                             cfg.rope_dim, cfg.rope_base, cfg.rope_style))
        op(p + "attn_k_rope", "rope", i, [p + "attn_k"],  # [n, n_head_kv, head_dim]
           lambda s: be.rope(s.values[p + "attn_k"].reshape(s.n_tokens, n_kv, hd), s.positions,
                             cfg.rope_dim, cfg.rope_base, cfg.rope_style))

        def scores(s: ForwardState):
            v = s.values[p + "attn_v"].reshape(s.n_tokens, n_kv, hd)
            be.kv_store(s.k_cache, s.v_cache, i, s.values[p + "attn_k_rope"], v, s.start)
            return be.attn_scores(s.values[p + "attn_q_rope"], s.k_cache, i, s.start, s.n_keys, scale)

        op(p + "attn_scores", "attn_scores", i, [p + "attn_q_rope", p + "attn_k_rope", p + "attn_v"], scores)
        op(p + "attn_probs", "softmax", i, [p + "attn_scores"],  # [n_head, n, n_keys]
           lambda s: be.softmax(s.values[p + "attn_scores"]))
        op(p + "attn_out", "attn_mix", i, [p + "attn_probs"],    # [n, n_head * head_dim]
           lambda s: be.attn_mix(s.values[p + "attn_probs"], s.v_cache, i, s.n_keys))
        op(p + "attn_output", "linear", i, [p + "attn_out"],
           lambda s: be.linear(s.values[p + "attn_out"], self._w(p + "attn_output.weight")))
        op(p + "resid_mid", "add", i, [resid, p + "attn_output"],
           lambda s: be.add(s.values[resid], s.values[p + "attn_output"]))
        op(p + "ffn_norm", "rms_norm", i, [p + "resid_mid"],
           lambda s: be.rms_norm(s.values[p + "resid_mid"], self._w(p + "ffn_norm.weight"), cfg.rms_eps))
        for role in ("ffn_gate", "ffn_up"):
            op(p + role, "linear", i, [p + "ffn_norm"],  # [n, d_ff]
               lambda s, r=role: self._linear(s, p + "ffn_norm", p + r + ".weight", None, p + "ffn_gate_up"))
        op(p + "ffn_act", "swiglu", i, [p + "ffn_gate", p + "ffn_up"],
           lambda s: be.swiglu(s.values[p + "ffn_gate"], s.values[p + "ffn_up"]))
        op(p + "ffn_down", "linear", i, [p + "ffn_act"],
           lambda s: be.linear(s.values[p + "ffn_act"], self._w(p + "ffn_down.weight")))
        op(p + "resid_post", "add", i, [p + "resid_mid", p + "ffn_down"],
           lambda s: be.add(s.values[p + "resid_mid"], s.values[p + "ffn_down"]))
        return p + "resid_post"

    # --- execution ----------------------------------------------------------------
    def new_state(self, ids, start: int, k_cache, v_cache, last_only: bool = False) -> ForwardState:
        """A ForwardState for token `ids` (host sequence) at positions start.. ."""
        ids_np = np.asarray(ids, dtype=np.int32).reshape(-1)
        positions = np.arange(start, start + ids_np.shape[0], dtype=np.int32)
        be = self.backend
        return ForwardState(
            ids=be.from_numpy(ids_np), positions=be.from_numpy(positions), start=start,
            k_cache=k_cache, v_cache=v_cache,
            logits_rows=slice(-1, None) if last_only else slice(None),
        )

    def execute(self, state: ForwardState, hooks: list[Hook] | tuple = (),
                release: bool = True) -> Iterator[tuple[Op, Array]]:
        """Run the program op by op, yielding (op, output) after each one.

        Each hook sees (op, output, state) and may return a replacement output. With `release`,
        intermediate values are dropped once no later op reads them (keeps memory flat).
        """
        # interventions first, observers (traces) last, so traces record the values actually used
        hooks = sorted(hooks, key=lambda h: bool(getattr(h, "observer", False)))
        for idx, op in enumerate(self.program):
            out = op.run(state)
            for hook in hooks:
                replaced = hook(op, out, state)
                if replaced is not None:
                    out = replaced
            state.values[op.name] = out
            yield op, out
            if release:
                for name in self._dead_after.get(idx, ()):
                    state.values.pop(name, None)

    def _release_points(self) -> dict[int, list[str]]:
        """For each op index, the values whose last reader it is (the logits are always kept)."""
        last: dict[str, int] = {}
        for idx, op in enumerate(self.program):
            last.setdefault(op.name, idx)
            for name in op.inputs:
                last[name] = idx
        dead: dict[int, list[str]] = {}
        for name, idx in last.items():
            if name != "logits":
                dead.setdefault(idx, []).append(name)
        return dead

    def forward(self, state: ForwardState, hooks: list[Hook] | tuple = ()) -> Array:
        """Run the whole program; returns the `logits` output (backend array).

        Without hooks this is a plain loop over the ops (no generator, no hook dispatch: ~2 ms
        less per decoded token on the NumPy engine); with hooks it goes through `execute`."""
        if hooks:
            for _ in self.execute(state, hooks):
                pass
            return state.values["logits"]
        values, dead_after = state.values, self._dead_after
        for idx, op in enumerate(self.program):
            values[op.name] = op.run(state)
            dead = dead_after.get(idx)
            if dead:
                for name in dead:
                    values.pop(name, None)
        return values["logits"]
