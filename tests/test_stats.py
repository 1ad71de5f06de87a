"""The statistics behind docs/results.md: Wilson intervals, paired differences, McNemar, Holm."""

import random

import pytest

from rstar_trl.stats import holm, mcnemar_exact, paired_comparison, wilson_interval


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError, match="correct <= n"):
        wilson_interval(11, 10)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant problems on one side
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_paired_comparison_counts_and_direction():
    a = [True, True, False, False, True, False]
    b = [True, False, True, False, False, False]
    c = paired_comparison(a, b)
    assert (c.n, c.correct_a, c.correct_b, c.only_a, c.only_b) == (6, 3, 2, 2, 1)
    assert c.difference == pytest.approx(1 / 6)
    assert c.ci95[0] < c.difference < c.ci95[1]
    swapped = paired_comparison(b, a)
    assert swapped.difference == pytest.approx(-c.difference)
    assert swapped.ci95 == pytest.approx((-c.ci95[1], -c.ci95[0]))
    assert swapped.p_value == c.p_value


def test_identical_sides_show_no_difference_and_a_clear_win_does():
    same = [i % 3 == 0 for i in range(300)]
    c = paired_comparison(same, same)
    assert c.difference == 0 and c.p_value == 1.0 and c.ci95[0] < 0 < c.ci95[1]
    assert c.verdict() == "no difference shown"
    better = [True] * 300
    c = paired_comparison(better, same)
    assert c.ci95[0] > 0.5 and c.p_value < 1e-10 and c.verdict() == "A better"
    assert paired_comparison(same, better).verdict() == "B better"


def test_paired_comparison_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same problems"):
        paired_comparison([True, False], [True])
    with pytest.raises(ValueError, match="at least one"):
        paired_comparison([], [])


def test_newcombe_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Simulated paired problems with a known difference: the interval must cover it close to 95% of the time
    (a Wald interval on these small, skewed accuracies covers noticeably less)."""
    rng = random.Random(0)
    trials, n, covered = 600, 120, 0
    # P(both) 0.15, P(A only) 0.15, P(B only) 0.05: true difference 0.10.
    for _ in range(trials):
        a, b = [], []
        for _ in range(n):
            u = rng.random()
            a.append(u < 0.30)
            b.append(u < 0.15 or 0.30 <= u < 0.35)
        low, high = paired_comparison(a, b).ci95
        covered += low <= 0.10 <= high
    assert 0.92 <= covered / trials <= 0.985


def test_holm_adjusts_in_step_down_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    assert holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])
