"""Sampling filters and the Sampler: pure functions on logits vectors."""
import numpy as np
import pytest

from rocmforge_lab.sampling import (
    Sampler, SamplingParams, apply_penalties, filtered_distribution, min_p_filter, softmax,
    top_k_filter, top_p_filter,
)

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams())(LOGITS) == 0


def test_top_k_keeps_k():
    kept = np.isfinite(top_k_filter(LOGITS, 2))
    assert kept.tolist() == [True, True, False, False, False, False]


def test_top_p_keeps_smallest_set_reaching_mass():
    p = softmax(LOGITS)
    kept = np.isfinite(top_p_filter(LOGITS, float(p[0] + 0.01)))
    assert kept.sum() == 2
    assert np.isfinite(top_p_filter(LOGITS, 1e-6)).sum() == 1


def test_min_p_relative_threshold():
    p = softmax(LOGITS)
    kept = np.isfinite(min_p_filter(LOGITS, 0.3))
    assert kept.tolist() == (p >= 0.3 * p.max()).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_penalties(LOGITS, [0, 4], SamplingParams(repetition_penalty=2.0))
    assert out[0] == pytest.approx(1.0) and out[4] == pytest.approx(-2.0) and out[1] == LOGITS[1]


def test_presence_and_frequency_penalties():
    out = apply_penalties(LOGITS, [1, 1, 1], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[1] == pytest.approx(1.0 - 0.5 - 3 * 0.25)


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    params = SamplingParams(temperature=1.5, seed=7)
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(LOGITS) for _ in range(50)]
    seq2 = [s2(LOGITS) for _ in range(50)]
    assert seq1 == seq2
    s3 = Sampler(SamplingParams(temperature=1.5, seed=8))
    assert [s3(LOGITS) for _ in range(50)] != seq1


def test_temperature_sharpens():
    hot = filtered_distribution(LOGITS, [], SamplingParams(temperature=2.0))
    cold = filtered_distribution(LOGITS, [], SamplingParams(temperature=0.5))
    assert cold[0] > hot[0]
    assert hot.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_nan_logits_raise():
    with pytest.raises(FloatingPointError):
        Sampler(SamplingParams())(np.array([0.0, np.nan], np.float32))


def test_top_p_equals_a_full_stable_sort():
    """top_p_filter sorts only the likeliest candidates: the kept set must be exactly the one a full
    stable sort by descending probability gives (ties included, vocabularies of any size)."""
    from rocmforge_lab.sampling import softmax, top_p_filter

    def full_sort(logits, p):
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        keep = np.zeros(logits.shape, bool)
        keep[order[:n_keep]] = True
        return np.where(keep, logits, -np.inf).astype(np.float32)

    rng = np.random.default_rng(0)
    for case in range(200):
        n = int(rng.integers(1, 60000))
        logits = (rng.standard_normal(n) * rng.choice([0.1, 1.0, 3.0, 10.0, 30.0])).astype(np.float32)
        if case % 3 == 0:
            logits = np.round(logits)  # many exact ties
        p = float(rng.choice([0.01, 0.5, 0.9, 0.95, 0.999, 0.99999]))
        np.testing.assert_array_equal(top_p_filter(logits, p), full_sort(logits, p), err_msg=f"case {case}")
