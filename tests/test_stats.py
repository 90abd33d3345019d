"""The accuracy statistics (relay/stats.py) on known inputs: the Wilson interval against published values and its
defining equation, the exact McNemar test against direct enumeration of the binomial, and the pairing of items."""

from __future__ import annotations

import itertools
import math

import pytest

from latent_relay.relay.stats import mcnemar_exact, paired_comparison, wilson_interval

Z95 = 1.959963984540054


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (8, 16, (0.2800, 0.7200)),  # symmetric around 1/2
        (0, 10, (0.0, 0.2775)),  # Wilson (1927): no zero-width interval at the edge
        (10, 10, (0.7225, 1.0)),
        (81, 263, (0.2553, 0.3662)),  # Newcombe (1998), table I, example (81/263)
    ],
)
def test_wilson_interval_matches_published_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected[0], abs=5e-4) and high == pytest.approx(expected[1], abs=5e-4)


@pytest.mark.parametrize("k, n", [(1, 7), (13, 40), (99, 100), (250, 1000)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p0 satisfies |k/n - p0| = z sqrt(p0 (1 - p0) / n): the interval is the score test's inversion."""
    for p0 in wilson_interval(k, n):
        assert abs(k / n - p0) == pytest.approx(Z95 * math.sqrt(p0 * (1 - p0) / n), rel=1e-9)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(1, 4, confidence=1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def binomial_two_sided(b: int, c: int) -> float:
    """Two-sided binomial p by enumeration: the probability of every outcome no more likely than the observed one."""
    n = b + c
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(q for q in probs if q <= probs[b] * (1 + 1e-12)))


@pytest.mark.parametrize("b, c", list(itertools.product(range(0, 13, 3), range(0, 13, 4))))
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c) if b + c else 1.0)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_known_value_and_errors():
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_paired_comparison_uses_shared_items_only():
    method = {"0": True, "1": True, "2": False, "3": True, "9": True}
    reference = {"0": True, "1": False, "2": True, "3": False}
    result = paired_comparison(method, reference)
    assert (result.wins, result.losses, result.paired) == (2, 1, 4)
    assert result.p_value == pytest.approx(1.0)
    assert str(result) == "+2/-1 of 4, p=1"
