"""Progress lines for the long phases (generating and converting data, evaluating, a study's
trials): ``[raytopk] converting: 3/20 days (15%), 4.1 s each, ETA 1m10s``.

A line at most every ``every`` seconds, none for a phase that ends before the first is due (a
short phase stays silent), and one at the end of a phase that printed any. With no ``total`` the
line gives the count and the rate only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """``advance(n)`` after each unit of work; ``done()`` at the end."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        *,
        every: float = 10.0,
        out: Callable[[str], None] | None = None,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.out = out or (lambda line: print(line, flush=True))
        self.enabled = enabled
        self.count = 0
        self.t0 = self._last = time.perf_counter()
        self.printed = False
        self._printed_at = -1  # the count of the last line printed

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / self.count if self.count else 0.0
        head = f"[raytopk] {self.label}: {self.count:,}"
        if self.total:
            head += f"/{self.total:,} {self.unit} ({self.count / self.total:.0%})"
        else:
            head += f" {self.unit}"
        if self.count and rate >= 1:
            head += f", {rate:.3g} s each"
        elif self.count:
            head += f", {self.count / max(elapsed, 1e-9):,.1f} {self.unit}/s"
        if self.total and self.count and self.count < self.total:
            head += f", ETA {duration(rate * (self.total - self.count))}"
        elif self.total and self.count >= self.total:
            head += f", done in {duration(elapsed)}"
        return head

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every:
            self._last = now
            self.printed, self._printed_at = True, self.count
            self.out(self.line())

    def done(self) -> None:
        """The closing line, when the phase printed any and not yet this state."""
        if self.enabled and self.printed and self._printed_at != self.count:
            self.out(self.line())
        self.printed = False
