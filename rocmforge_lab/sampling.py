"""Next-token sampling: penalties, top-k, top-p, min-p, temperature, seeded RNG.

The order follows llama.cpp's default chain: penalties -> top-k -> top-p -> min-p ->
temperature -> draw. `temperature == 0` means greedy (argmax after penalties).
Every filter is a pure function on a logits vector so the notebook can show what each does.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings. Defaults are greedy decoding (deterministic)."""

    temperature: float = 0.0
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1.0 = off; must be in (0, 1]
    min_p: float = 0.0                # 0.0 = off; must be in [0, 1)
    repetition_penalty: float = 1.0   # 1.0 = off; > 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64          # how many recent tokens the penalties look at
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.penalty_last_n < 0:
            raise ValueError(f"penalty_last_n must be >= 0, got {self.penalty_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_argmax(self) -> bool:
        """Greedy without penalties: the next token is the argmax of the raw logits (what the GPU
        fast path computes on the device)."""
        return (self.greedy and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0)


def apply_penalties(logits: np.ndarray, history: Sequence[int], params: SamplingParams) -> np.ndarray:
    """Repetition (CTRL-style, divide positive / multiply negative logits), presence and frequency
    penalties over the last `penalty_last_n` tokens of `history`."""
    if not history or params.penalty_last_n == 0 or (
        params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
    ):
        return logits
    out = logits.astype(np.float32, copy=True)
    counts = Counter(history[-params.penalty_last_n:])
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    vals = out[ids]
    rp = np.float32(params.repetition_penalty)
    vals = np.where(vals > 0, vals / rp, vals * rp)
    vals = vals - n * np.float32(params.frequency_penalty) - np.float32(params.presence_penalty)
    out[ids] = vals
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the boundary kept), others -> -inf. k = 0: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf).astype(np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of logits / temperature (float64 for a stable sum)."""
    z = logits.astype(np.float64) / max(temperature, 1e-8)
    z -= np.max(z)
    p = np.exp(z)
    return p / p.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of top tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    # The nucleus is a prefix of the tokens by descending probability (ties: lower id first). Sort
    # only the most likely candidates (every token with probability >= the k-th largest: exactly a
    # prefix of that order), growing k until their cumulative mass reaches p: the same set as a
    # full sort, ~10x faster on a 50k vocabulary.
    n = probs.shape[0]
    k = min(n, 256)
    while True:
        cand = np.flatnonzero(probs >= np.partition(probs, n - k)[n - k]) if k < n else np.arange(n)
        order = cand[np.argsort(-probs[cand], kind="stable")]
        cum = np.cumsum(probs[order])
        if k >= n or cum[-1] >= p:
            break
        k = min(n, 8 * k)
    n_keep = int(np.searchsorted(cum, p) + 1)
    keep = np.zeros(logits.shape, bool)
    keep[order[:n_keep]] = True
    return np.where(keep, logits, -np.inf).astype(np.float32)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(), logits, -np.inf).astype(np.float32)


def filtered_distribution(logits: np.ndarray, history: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The final distribution the sampler draws from (all filters applied), float64 [vocab]."""
    x = apply_penalties(np.asarray(logits, np.float32), history, params)
    if params.greedy:
        probs = np.zeros(x.shape, np.float64)
        probs[int(np.argmax(x))] = 1.0
        return probs
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    x = min_p_filter(x, params.min_p)
    return softmax(x, params.temperature)


class Sampler:
    """Draws next tokens; deterministic for a given seed."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """One token id from a logits vector [vocab]."""
        if np.isnan(logits).any():
            raise FloatingPointError("logits contain NaN: the forward pass produced non-finite values")
        if self.params.greedy:
            return int(np.argmax(apply_penalties(np.asarray(logits, np.float32), history, self.params)))
        probs = filtered_distribution(logits, history, self.params)
        return int(self.rng.choice(probs.shape[0], p=probs))
