"""Session: token history, position and KV cache of one conversation with a model.

`forward()` appends tokens to the cache and returns their logits; `generate()` / `stream()`
run prefill + decode with a sampler; `trace()` and `stepper()` give the inspection views
(trace.py, stepper.py) over the same op program.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .loader import Model


class ContextOverflowError(ValueError):
    """The tokens do not fit in the session's context window."""


@dataclass
class GenerationResult:
    """What `generate()` returns."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str                  # "stop" (EOS / stop string) | "length"
    timings: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


class TextStream:
    """Iterator of generated text pieces; `.result` is the full GenerationResult once exhausted."""

    def __init__(self, pieces: Iterator[str], result: GenerationResult):
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class Session:
    """Tokens, position and KV cache. Create with `model.session()`."""

    def __init__(self, model: "Model", n_ctx: int | None = None):
        self.model = model
        cfg = model.config
        self.n_ctx = int(min(n_ctx or min(cfg.n_ctx, 4096), cfg.n_ctx))
        if self.n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.k_cache, self.v_cache = model.backend.new_kv_cache(cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)
        self.tokens: list[int] = []
        self._hooks: list = []

    # --- state --------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Tokens already in the KV cache."""
        return len(self.tokens)

    def reset(self) -> None:
        """Forget every token (the cache is overwritten as new tokens arrive)."""
        self.tokens = []

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise ValueError("no tokens to process (empty input)")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocabulary size {vocab}")
        if self.n_past + len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(ids)} tokens after {self.n_past} cached exceed the context of {self.n_ctx} tokens "
                f"(model maximum {self.model.config.n_ctx}; pass n_ctx=... to session())"
            )
        return ids

    # --- forward ------------------------------------------------------------------
    def begin_forward(self, ids: Sequence[int], last_only: bool = False, release: bool = True):
        """Start a forward pass of `ids`: returns (state, op iterator). The tokens count as cached
        only after `finish_forward`. Used by `forward` and by the stepper."""
        ids = self._check_ids(ids)
        tf = self.model.transformer
        state = tf.new_state(ids, self.n_past, self.k_cache, self.v_cache, last_only=last_only)
        return state, tf.execute(state, self._hooks, release=release)

    def finish_forward(self, state) -> np.ndarray:
        """Commit a completed forward pass: its tokens join the cache; returns host logits."""
        self.tokens.extend(int(i) for i in self.model.backend.to_numpy(state.ids))
        return self.model.backend.to_numpy(state.values["logits"])

    def forward(self, ids: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Run `ids` through the model after the cached tokens; returns float32 logits [len(ids), vocab]
        (or [1, vocab] for the last position with `last_only`). Appends to the KV cache."""
        if last_only and not self._hooks and self.model.backend.name == "cupy" and len(ids) > 1:
            from .backend.prefill import prefill_for

            pf = prefill_for(self.model)  # the fused GPU prefill (None where it does not apply)
            if pf is not None:
                return pf.run(self, ids)
        state, ops = self.begin_forward(ids, last_only=last_only)
        with self.model.threads(state.n_tokens):
            if self._hooks:
                for _ in ops:
                    pass
            else:  # no hooks: the plain loop, without the op iterator's per-op work
                self.model.transformer.forward(state)
        return self.finish_forward(state)

    def truncate(self, n_tokens: int) -> None:
        """Rewind to the first `n_tokens` tokens (their cache entries stay valid; later ones are dropped)."""
        if not 0 <= n_tokens <= self.n_past:
            raise ValueError(f"truncate({n_tokens}): session holds {self.n_past} tokens")
        del self.tokens[n_tokens:]

    def fork(self) -> "Session":
        """An independent copy of this session (tokens and KV cache), to try another continuation."""
        other = Session.__new__(Session)
        other.model, other.n_ctx = self.model, self.n_ctx
        other.k_cache, other.v_cache = self.k_cache.copy(), self.v_cache.copy()
        other.tokens = list(self.tokens)
        other._hooks = list(self._hooks)
        return other

    def hooks(self, mapping: dict):
        """Context manager installing interventions: {hook-name glob: fn(x, info) -> array | None}
        (see interventions.py)."""
        from .interventions import HookSet

        return HookSet(self, mapping)

    # --- generation ---------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty: give at least one character or token")
            ids = self.model.tokenizer.encode(prompt, add_special=self.n_past == 0)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        return ids

    def _step_tokens(self, logits: np.ndarray, sampler: Sampler, history: list[int], max_tokens: int,
                     stop_ids: set[int], next_logits=None) -> Iterator[int]:
        """Sample, feed back, repeat. `next_logits(token)` computes the logits after `token`: the
        op-by-op path by default; the GPU fast path's graph replay for sampled GPU generation (the
        logits then come back to the host sampler: one synchronisation per token, unlike greedy
        decoding, whose argmax stays on the device)."""
        next_logits = next_logits or (lambda token: self.forward([token], last_only=True)[-1])
        for step in range(max_tokens):
            token = sampler(logits, history)
            yield token
            if token in stop_ids or step + 1 == max_tokens:
                return
            history.append(token)
            logits = next_logits(token)

    def _fast_tokens(self, fast, logits: np.ndarray, max_tokens: int, stop_ids: set[int]) -> Iterator[int]:
        """Greedy tokens from the GPU fast path (one graph replay per token)."""
        first = int(np.argmax(logits))
        yield first
        if first not in stop_ids and max_tokens > 1:
            yield from fast.stream_tokens(first, max_tokens - 1, stop_ids)

    def _fast_decoder(self):
        """The GPU fast decoder when it applies: GPU backend, no hooks or traces."""
        if self.model.backend.name == "numpy" or self._hooks:
            return None
        from .backend.fast_decode import fast_decoder_for

        return fast_decoder_for(self)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 64, stop: Sequence[str] = (),
               **sampling) -> "TextStream":
        """Text pieces as they are generated; iterate over the returned `TextStream`, whose `.result`
        (a GenerationResult with token ids, finish reason and timings) is complete once it is
        exhausted. Arguments as for `generate`."""
        params = SamplingParams(**sampling)
        prompt_ids = self._prompt_ids(prompt)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        result = GenerationResult("", [], prompt_ids, "length")
        return TextStream(self._generate(prompt_ids, max_tokens, stop, params, result), result)

    def _generate(self, prompt_ids: list[int], max_tokens: int, stop: Sequence[str] | str,
                  params: SamplingParams, res: "GenerationResult") -> Iterator[str]:
        tok = self.model.tokenizer
        stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        stop_ids = set(tok.stop_ids)
        history = list(self.tokens) + prompt_ids

        t0 = time.perf_counter()
        logits = self.forward(prompt_ids, last_only=True)[-1]
        t_prefill = time.perf_counter() - t0
        fast = self._fast_decoder()
        if fast is None:
            source = self._step_tokens(logits, Sampler(params), history, max_tokens, stop_ids)
        elif params.plain_argmax:
            source = self._fast_tokens(fast, logits, max_tokens, stop_ids)
        else:
            source = self._step_tokens(logits, Sampler(params), history, max_tokens, stop_ids, fast.step_logits)
        res.timings["path"] = (f"{self.model.backend.name} step" if fast is None else
                               f"gpu fast ({fast.mode}{'' if params.plain_argmax else ', host sampling'})")
        emitted = ""
        generated: list[int] = []
        n_produced = 0
        stopped_by_string = False
        t1 = time.perf_counter()
        try:
            for token in source:
                n_produced += 1
                if token in stop_ids:
                    res.finish_reason = "stop"
                    break
                generated.append(token)
                text = tok.decode(generated)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                    continue
                hit = next((s for s in stop if s in text), None)
                if hit is not None:
                    piece = text[:text.index(hit)][len(emitted):]
                    emitted += piece
                    res.finish_reason = "stop"
                    stopped_by_string = True
                    if piece:
                        yield piece
                    break
                # hold back text that could be the start of a stop string
                hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                ready = text[:len(text) - hold]
                if len(ready) > len(emitted):
                    yield ready[len(emitted):]
                    emitted = ready
        finally:
            source.close()  # a fast-path generator syncs and records the fed tokens on close
        if not stopped_by_string:
            tail = tok.decode(generated).rstrip("\ufffd")
            if len(tail) > len(emitted):  # flush text held back for a stop string that never came
                yield tail[len(emitted):]
                emitted = tail
        t_decode = time.perf_counter() - t1
        n_decoded = max(n_produced - 1, 0)  # the first token came from the prefill's logits
        res.text = emitted
        res.token_ids = generated
        res.timings.update({
            "prefill_tokens": len(prompt_ids),
            "prefill_s": t_prefill,
            "prefill_tok_s": len(prompt_ids) / t_prefill if t_prefill > 0 else float("inf"),
            "decode_tokens": n_decoded,
            "decode_s": t_decode,
            "decode_tok_s": n_decoded / t_decode if n_decoded and t_decode > 0 else float("nan"),
        })

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, stop: Sequence[str] = (),
                 **sampling) -> GenerationResult:
        """Continue `prompt` (text or token ids) by up to `max_tokens` tokens.

        Sampling keywords: temperature (0 = greedy, the default), top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, penalty_last_n, seed.
        Stops at an end-of-sequence token or a `stop` string (not included in the text).
        On the GPU, plain greedy decoding without hooks runs the graphed fast path.
        `result.timings["decode_tokens"]` counts forward passes after the prefill (the first
        generated token comes from the prefill's logits).
        """
        stream = self.stream(prompt, max_tokens=max_tokens, stop=stop, **sampling)
        for _ in stream:
            pass
        return stream.result

    # --- inspection ---------------------------------------------------------------
    def trace(self, patterns: str | Sequence[str] | None = None, **kwargs):
        """Context manager capturing op outputs as host arrays (see trace.Trace)."""
        from .trace import Trace

        return Trace(self, patterns, **kwargs)

    def stepper(self, prompt: str | Sequence[int]):
        """Step through the forward pass of `prompt` op by op (see stepper.Stepper)."""
        from .stepper import Stepper

        return Stepper(self, prompt)
