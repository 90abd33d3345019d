"""Statistics for accuracy tables: the Wilson score interval of a proportion (Wilson 1927) and the exact McNemar test
of two methods on the same items (McNemar 1947; exact: a two-sided binomial test on the discordant pairs)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (``(0.0, 1.0)`` for ``n == 0``)."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: items only the first method got right, and items
    only the second got right. Under the null each discordant item is a fair coin."""
    if only_first < 0 or only_second < 0:
        raise ValueError("discordant counts cannot be negative")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """A method against a reference on the items both answered: the items only it got right (``wins``), only the
    reference got right (``losses``), how many items were paired, and the exact McNemar p-value."""

    wins: int
    losses: int
    paired: int
    p_value: float

    def __str__(self) -> str:
        return f"+{self.wins}/-{self.losses} of {self.paired}, p={self.p_value:.2g}"


def paired_comparison(method: Mapping[str, bool], reference: Mapping[str, bool]) -> PairedComparison:
    """``method`` against ``reference`` (item id -> correct) on the item ids they share."""
    shared = method.keys() & reference.keys()
    wins = sum(method[i] and not reference[i] for i in shared)
    losses = sum(reference[i] and not method[i] for i in shared)
    return PairedComparison(wins, losses, len(shared), mcnemar_exact(wins, losses))
