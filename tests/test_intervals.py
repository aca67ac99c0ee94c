"""grpo_math/intervals.py against values worked out by hand or from the textbook formulas."""

import math

import pytest

from grpo_math.intervals import detectable_difference, mcnemar, paired_difference, pooled_difference, wilson


@pytest.mark.parametrize("k, n, low, high", [
    (50, 100, 0.4038, 0.5962),  # Wilson's interval for 50%, n = 100, as tabulated
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 3, 0.0615, 0.7923),
])
def test_wilson(k, n, low, high):
    got = wilson(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)
    assert got[0] <= k / n <= got[1]  # exactly, also at 0 and n


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (0, 0)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(k, n)


def test_paired_difference_is_the_mean_change_with_a_bootstrap_interval():
    before = [0] * 60 + [1] * 40
    after = [1] * 20 + [0] * 40 + [1] * 40  # 20 questions gained, none lost
    d = paired_difference(before, after)
    assert d["difference"] == pytest.approx(0.2) and d["n"] == 100
    # every resample gains and loses nothing else, so the interval is that of a 20% proportion
    assert 0.1 < d["low"] < 0.2 < d["high"] < 0.3
    assert paired_difference(before, before) == {"difference": 0.0, "low": 0.0, "high": 0.0, "n": 100}
    assert paired_difference(before, after) == d  # seeded: the same interval every time


def test_paired_difference_refuses_unequal_lists():
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1, 0], [1])


def test_mcnemar_counts_the_discordant_questions():
    before = [True] * 3 + [False] * 10 + [True] * 7
    after = [False] * 3 + [True] * 10 + [True] * 7
    m = mcnemar(before, after)
    assert (m["only_a"], m["only_b"]) == (3, 10)
    # exact two-sided binomial: 2 * P(X <= 3), X ~ Binomial(13, 1/2)
    assert m["p_value"] == pytest.approx(2 * sum(math.comb(13, i) for i in range(4)) / 2**13)
    assert mcnemar(before, before)["p_value"] == 1.0  # no disagreement: no evidence either way


# The two-level bootstrap of a study over training seeds, on outcomes whose answer is known.
def test_pooled_difference_above_zero_when_every_seed_improves():
    before = [0] * 50 + [1] * 50
    gains = [[1] * k + [0] * (50 - k) + [1] * 50 for k in (10, 15, 20)]  # 10, 15, 20 questions gained, none lost
    d = pooled_difference([(before, after) for after in gains], reps=2000)
    assert d["difference"] == pytest.approx(0.15) and d["seeds"] == 3 and d["n"] == 300
    assert 0 < d["low"] < 0.15 < d["high"]
    everything = pooled_difference([([0] * 40, [1] * 40)] * 3, reps=500)  # every question, every seed
    assert (everything["difference"], everything["low"], everything["high"], everything["se"]) == (1, 1, 1, 0)


def test_pooled_difference_covers_zero_when_nothing_changed():
    same = [0, 1] * 50
    unchanged = pooled_difference([(same, same)] * 3, reps=500)
    assert unchanged["low"] == 0.0 == unchanged["high"]
    # each seed gains as many questions as it loses: changes, but no difference
    churn = [([0] * 10 + [1] * 10 + [0] * 80, [1] * 10 + [0] * 10 + [0] * 80)] * 3
    d = pooled_difference(churn, reps=2000)
    assert d["difference"] == 0 and d["low"] < 0 < d["high"]


def test_pooled_difference_is_wider_than_one_improving_seed():
    """One seed gains 30 points and two stay flat: the seeds disagree, and the pooled interval says so
    by being wider than the improving seed's own, which only knows that seed's questions."""
    before = [0] * 100
    improving = (before, [1] * 30 + [0] * 70)
    flat = (before, before)
    alone = paired_difference(*improving, reps=2000)
    pooled = pooled_difference([improving, flat, flat], reps=2000)
    assert pooled["difference"] == pytest.approx(0.1)
    assert pooled["high"] - pooled["low"] > alone["high"] - alone["low"]
    assert pooled["low"] <= 0.0  # two seeds in three flat: a resample of only those gains nothing


def test_pooled_difference_refuses_unequal_or_empty_outcomes():
    for pairs in ([], [([0, 1], [1])], [([], [])]):
        with pytest.raises(ValueError, match="equal, non-empty"):
            pooled_difference(pairs)


def test_detectable_difference_is_about_2_8_standard_errors():
    assert detectable_difference(0.05) == pytest.approx(0.140, abs=1e-3)
