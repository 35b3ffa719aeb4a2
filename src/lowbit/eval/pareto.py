"""The Pareto front of checkpoints: fewer bits and lower loss, neither beaten on both (pure)."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, loss) that no other point dominates — another point dominates
    one when it is no worse on both and better on at least one. Both are minimised. Sorted by cost
    (then loss); equal points are all kept. NaN points are never on the front."""
    ok = [i for i, (c, l) in enumerate(points) if c == c and l == l]
    front = []
    for i in ok:
        ci, li = points[i]
        dominated = any(points[j][0] <= ci and points[j][1] <= li and (points[j][0] < ci or points[j][1] < li)
                        for j in ok if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))
