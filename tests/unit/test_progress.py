"""Progress lines of the long phases: counts, ETA, silence for a short phase, the closing line;
and that converting and generating data report through them."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytopk import progress as progress_mod
from raytopk.progress import Progress, duration


def test_lines_count_estimate_and_close() -> None:
    lines: list[str] = []
    p = Progress("converting", 4, "days", every=0.0, out=lines.append)
    for _ in range(4):
        p.advance()
    p.done()
    assert lines[0].startswith("[raytopk] converting: 1/4 days (25%)") and "ETA" in lines[0]
    assert lines[3].startswith("[raytopk] converting: 4/4 days (100%)") and "done in" in lines[3]
    assert len(lines) == 4  # done() adds no line: the last one already said it
    p2 = Progress("converting", 4, "days", every=0.0, out=lines.append)
    p2.advance()
    p2.every = 3600.0
    p2.advance(3)
    p2.done()  # the closing line: 4/4, not yet printed
    assert len(lines) == 6 and lines[5].startswith("[raytopk] converting: 4/4 days (100%)")


def test_a_short_phase_stays_silent_and_unknown_totals_give_rates() -> None:
    lines: list[str] = []
    quiet = Progress("evaluating test", 40, "batches", every=3600.0, out=lines.append)
    quiet.advance(40)
    quiet.done()
    assert lines == []
    open_ended = Progress("evaluating test", None, "batches", every=0.0, out=lines.append)
    open_ended.advance(3)
    assert lines[-1].startswith("[raytopk] evaluating test: 3 batches, ") and "/s" in lines[-1]
    off = Progress("x", 2, "days", every=0.0, out=lines.append, enabled=False)
    off.advance(2)
    off.done()
    assert len(lines) == 1


def test_duration_text() -> None:
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_generating_and_converting_report_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raytopk.data.convert import convert
    from raytopk.data.synthetic import generate

    seen: list[str] = []
    real = progress_mod.Progress.__init__

    def every_day(self, label, total, unit, **kw):  # every unit prints, into `seen`
        real(self, label, total, unit, **{**kw, "every": 0.0, "out": seen.append})

    monkeypatch.setattr(progress_mod.Progress, "__init__", every_day)
    raw = generate(tmp_path / "raw", days=2, requests_per_day=30, seed=0)
    convert(raw, tmp_path / "pq")
    assert any(s.startswith(f"[raytopk] generating {raw}: 2/2 days") for s in seen)
    assert any(s.startswith(f"[raytopk] converting into {tmp_path / 'pq'}: 2/2 days")
               for s in seen)  # fmt: skip
