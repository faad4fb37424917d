"""The budget measures training, equally for every operator (run.backend=local, no Ray): the step
clock (train_seconds) excludes a day's data start-up and the report barriers; max_train_seconds
stops within one step; max_samples at the cap; a second epoch draws new shuffles and negatives;
numba's threads follow the worker's allotment."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from local_runs import DAYS, local_config

from raytopk.train import local_session as local_backend
from raytopk.train.config import TrainConfig
from raytopk.train.driver import run
from raytopk.train.events import StepReport


def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return local_config(data, out, "run.report_every_steps=1", "run.eval_max_batches=1",
                        "run.corpus_ms=[]", "run.name=budget", *extra)  # fmt: skip


def _step_clock(out: Path) -> list[float]:
    with open(out / "progress.csv", newline="") as f:
        return [float(r["train_seconds"]) for r in csv.DictReader(f) if r["kind"] == "step"]


def test_time_budget_excludes_a_slow_start_and_the_reports(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, barrier, budget = 1.0, 0.4, 0.5
    real_groups, real_report = local_backend.iter_local_groups, local_backend.LocalSession.report

    def slow_start(*args, **kwargs):  # the reader sleeps before its first batch
        time.sleep(start)
        yield from real_groups(*args, **kwargs)

    def slow_report(self, report, *args, **kwargs):  # every step report is a slow barrier
        if isinstance(report, StepReport):
            time.sleep(barrier)
        return real_report(self, report, *args, **kwargs)

    monkeypatch.setattr(local_backend, "iter_local_groups", slow_start)
    monkeypatch.setattr(local_backend.LocalSession, "report", slow_report)
    out = tmp_path / "run"
    m = run(_cfg(tiny, out, f"run.max_train_seconds={budget}", "run.epochs=20"), verbose=False)
    assert m["budget_spent"] is True
    clock = _step_clock(out)
    steps = np.diff([0.0, *clock])
    # Training stopped within one step of the budget ...
    assert budget <= m["train_seconds"] <= budget + steps.max() + 1e-3
    # ... the slowed start and the report barriers went to the excluded time ...
    ex = m["excluded_seconds"]
    assert ex["first_batch_wait"] >= start - 0.05
    assert ex["between_steps"] >= barrier * (len(clock) - 1)
    # ... and not also into the step clock: the run's wall time holds them once (no timing of
    # the machine is asserted, so a loaded machine cannot fail this).
    assert m["train_seconds"] + ex["first_batch_wait"] + ex["between_steps"] <= m["wall_seconds"]


def test_sample_budget_stops_at_the_cap(tiny: Path, tmp_path: Path) -> None:
    m = run(_cfg(tiny, tmp_path / "cap", "run.max_samples=64"), verbose=False)
    assert m["budget_spent"] is True and m["samples_seen"] == 64  # two batches of 32
    assert m["loss_form"] == "bce" and m["op"] == "dftopk"


def test_a_second_epoch_draws_new_shuffles_and_negatives(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, np.ndarray, np.ndarray]] = []
    real_groups = local_backend.iter_local_groups

    def recording(*args, **kwargs):
        for g in real_groups(*args, **kwargs):
            if kwargs.get("train"):
                seen.append((kwargs["seed"], g["request_id"].copy(), g["cand_video_id"].copy()))
            yield g

    monkeypatch.setattr(local_backend, "iter_local_groups", recording)
    run(_cfg(tiny, tmp_path / "epochs", f"data.train_days=[{DAYS[0]}]", "run.epochs=2"),
        verbose=False)
    seeds = sorted({s for s, _, _ in seen})
    assert len(seeds) == 2  # one dataset per (epoch, day)
    first = [(r, v) for s, r, v in seen if s == seeds[0]]
    second = [(r, v) for s, r, v in seen if s == seeds[1]]
    rid0, rid1 = (np.concatenate([r for r, _ in e]) for e in (first, second))
    assert sorted(rid0.tolist()) == sorted(rid1.tolist())  # the same day, every request once
    assert not np.array_equal(rid0, rid1)  # another shuffle
    neg0 = {int(r): v[40:].tobytes() for rr, vv in first for r, v in zip(rr, vv)}
    neg1 = {int(r): v[40:].tobytes() for rr, vv in second for r, v in zip(rr, vv)}
    assert sum(neg0[r] != neg1[r] for r in neg0) > len(neg0) // 2  # other sampled negatives


def test_epoch_seeds_and_dataset_names() -> None:
    from raytopk.train.driver import day_seed
    from raytopk.train.session import EPOCH_DATASETS, train_key

    assert day_seed(42, 0, 3) == 45  # epoch 0: what a one-pass run always drew
    seeds = {day_seed(42, e, d) for e in range(4) for d in range(5)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)
    assert train_key("2024-01-13") == "train_2024-01-13"
    assert train_key("2024-01-13", 1) == "train_e1_2024-01-13"
    assert train_key("2024-01-13", EPOCH_DATASETS) == train_key("2024-01-13", 0)


def test_numba_threads_follow_the_worker() -> None:
    import numba
    import torch

    from raytopk.train.loop import set_threads

    before = (torch.get_num_threads(), numba.get_num_threads())
    try:
        assert set_threads(1) == 1
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
