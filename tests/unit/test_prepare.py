"""The training driver's checks before any worker starts (raytopk.train.prepare): no Ray needed.

RecFlow's public copy lacks all_stage/2024-01-13.feather, the first training day of the paper's
protocol; the converter records such incomplete days in meta.json, and a run that asks for one
is refused before it starts, naming every absent day and, where known, the missing file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raytopk.train.config import load_config
from raytopk.train.prepare import prepare

DAYS = ["2024-01-13", "2024-01-14"]
TEST_DAY = "2024-01-15"



def _prepare(data: Path, out: Path, *extra: str):
    return prepare(load_config(None, [f"data.path={data}", f"run.output_dir={out}", *extra]))


def test_absent_protocol_days_are_named_before_any_worker_starts(
    tiny: Path, tmp_path: Path
) -> None:
    # A converted copy of the dataset whose first day was incomplete in the raw release.
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    shutil.rmtree(data / "requests" / f"day={DAYS[0]}")
    meta = json.loads((data / "meta.json").read_text())
    meta["days"] = [d for d in meta["days"] if d != DAYS[0]]
    meta["days_incomplete"] = {DAYS[0]: ["all_stage/2024-01-13.feather"]}
    (data / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(ValueError) as e:
        _prepare(
            data, tmp_path / "o", f"data.train_days=[{DAYS[0]}..{DAYS[1]}]",
            "data.test_day=2024-03-01",
        )
    msg = str(e.value)
    assert "2 day(s) absent" in msg
    assert "2024-01-13: incomplete in the raw data (all_stage/2024-01-13.feather missing)" in msg
    assert "2024-03-01: not converted" in msg
    # The complete days still train.
    prep = _prepare(
        data, tmp_path / "o", f"data.train_days=[{DAYS[1]}]", f"data.test_day={TEST_DAY}"
    )
    assert prep.cfg.data.train_days == [DAYS[1]]


def test_default_days_are_every_day_before_the_test_day(tiny: Path, tmp_path: Path) -> None:
    prep = _prepare(tiny, tmp_path / "o")  # no days given: the last day tests, the rest train
    assert prep.cfg.data.train_days == [*DAYS, TEST_DAY]
    assert prep.cfg.data.test_day == "2024-01-16"


def test_the_day_rules_hold_for_days_resolved_from_the_dataset(tiny: Path, tmp_path: Path) -> None:
    # The config's own check sees no test day (it defaults to the dataset's last day); the same
    # rule runs again once prepare has resolved it.
    with pytest.raises(ValueError, match="run.valid_day 2024-01-16 is the test day"):
        _prepare(tiny, tmp_path / "v", "data.train_days=[2024-01-13]", "run.valid_day=2024-01-16")
    prep = _prepare(tiny, tmp_path / "ok", "data.train_days=[2024-01-13]",
                    "run.valid_day=2024-01-14")  # fmt: skip
    assert (prep.cfg.data.test_day, prep.cfg.run.valid_day) == ("2024-01-16", "2024-01-14")
