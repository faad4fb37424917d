"""Cost model of the benchmarks' skip rules: the complexity exponent of a registry complexity
string and the extrapolation of a line's time to a larger shape.

Notation: B = rows, N = scores per row, e = the exponent of N in a line's time per row.

Memory is not modelled here: each operator declares its own estimate with its registry entry
(``get_spec(name).step_bytes(batch, n, itemsize)``, raytopk/ops/<name>.py).
"""

from __future__ import annotations

__all__ = ["OVERHEAD_S", "complexity_exponent", "estimate_seconds"]

# Per-call fixed cost (Python dispatch of a few ops) that does not grow with B·N^e; left
# in, a 0.5 ms call at N=10 would extrapolate to seconds at N=200 for an O(N²) op.
OVERHEAD_S = 2.5e-4


def complexity_exponent(complexity: str) -> float:
    """Exponent e of N in a registry complexity string ("O(N)", "O(N log N)", "O(N^2)", …)."""
    c = complexity.replace(" ", "").replace("²", "^2").replace("³", "^3")
    if "N^3" in c:
        return 3.0
    if "N^2" in c:
        return 2.0
    if "logN" in c:
        return 1.1
    return 1.0


def estimate_seconds(
    history: list[tuple[int, int, float]], batch: int, n: int, exponent: float
) -> float | None:
    """Extrapolate from the largest measured (B, N) whose work B·N^e is below this one's: the
    fastest call there minus a fixed overhead, scaled by the work ratio, plus the overhead."""
    work = batch * n**exponent
    below = [(b * m**exponent, t) for b, m, t in history if b * m**exponent <= work]
    if not below:
        return None
    w, t = max(below)
    return OVERHEAD_S + max(t - OVERHEAD_S, 0.0) * work / w
