"""Statistics for comparing methods on the same problems: intervals, paired differences and paired tests.

Every comparison in docs/results.md is paired: two policies (or two methods) answer the same problems, so the
question is whether one is right where the other is wrong more often than chance allows. The helpers here work on
per-problem correctness (one bool per problem, in the same order for both sides):

- `wilson_interval`: the 95% interval of one accuracy.
- `paired_comparison`: the difference of two accuracies on the same problems, Newcombe's score interval for a
  paired difference (his method 10) and the exact McNemar test (a two-sided binomial test on the problems where
  exactly one side is right).
- `holm`: Holm's step-down adjustment when one claim rests on several tests.

They are written here rather than taken from scipy/statsmodels, which the rest of the stack does not need: each is
a few lines of closed-form arithmetic, and the tests check them against known values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["PairedComparison", "holm", "mcnemar_exact", "paired_comparison", "wilson_interval"]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of `correct` out of `n` (95% for z = 1.96), as fractions."""
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance, if both sides were equally good, of a split of the discordant
    problems (`only_a` right only for A, `only_b` right only for B) at least this uneven."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_exact needs counts >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedComparison:
    """A vs B on the same `n` problems.

    Args:
        n: problems.
        correct_a, correct_b: problems each side got right.
        only_a, only_b: problems only A (only B) got right (the discordant pairs).
        difference: accuracy of A minus accuracy of B.
        ci95: Newcombe's 95% interval of the difference.
        p_value: exact two-sided McNemar p-value.
    """

    n: int
    correct_a: int
    correct_b: int
    only_a: int
    only_b: int
    difference: float
    ci95: tuple[float, float]
    p_value: float

    @property
    def accuracy_a(self) -> float:
        return self.correct_a / self.n

    @property
    def accuracy_b(self) -> float:
        return self.correct_b / self.n

    def verdict(self, alpha: float = 0.05) -> str:
        """'A better', 'B better' or 'no difference shown' at level `alpha` (two-sided)."""
        if self.p_value >= alpha:
            return "no difference shown"
        return "A better" if self.difference > 0 else "B better"

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": list(self.ci95), "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b}


def paired_comparison(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> PairedComparison:
    """Compare two per-problem correctness vectors on the same problems (same order).

    The interval is Newcombe's (1998) method 10 for a difference of paired proportions: it combines the two Wilson
    intervals with the correlation of the pairs, and unlike the Wald interval it behaves near 0% and 100%.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_comparison needs the same problems on both sides, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("paired_comparison needs at least one problem")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denominator) if denominator else 0.0
    low = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return PairedComparison(
        n=n,
        correct_a=both + only_a,
        correct_b=both + only_b,
        only_a=only_a,
        only_b=only_b,
        difference=difference,
        ci95=(max(-1.0, difference - low), min(1.0, difference + high)),
        p_value=mcnemar_exact(only_a, only_b),
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): reject where the adjusted value is < alpha, and
    the family-wise error stays below alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
