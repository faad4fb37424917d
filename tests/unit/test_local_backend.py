"""The training loop without Ray (``run.backend: local``): the same loop, batches and outputs as
the Ray backend, in this process. No Ray is started here: these run in the unit suite.

(Equality with the Ray backend on 1 worker is tests/integration/test_train.py's
``test_local_backend_matches_ray_on_one_worker``.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from blocked_imports import blocked_run
from local_runs import DAYS, TEST_DAY, local_config

from raytopk.data import schema
from raytopk.metrics import metric_keys
from raytopk.train.config import TrainConfig
from raytopk.train.driver import run
from raytopk.train.prepare import latest_checkpoint


def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return local_config(
        data, out, "run.report_every_steps=2", "run.corpus_ms=[20]", "run.name=local", *extra
    )


def _requests(data: Path, days: list[str]) -> int:
    from raytopk.data.pipeline import day_files

    return sum(pq.ParquetFile(f).metadata.num_rows for d in days for f in day_files(data, d))


def test_local_run_trains_evaluates_and_writes_the_ray_outputs(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    m = run(_cfg(tiny, out), verbose=False)
    assert m["backend"] == "local" and m["num_workers"] == 1 and m["use_gpu"] is False
    assert m["days_trained"] == [f"0:{d}" for d in DAYS]
    assert m["samples_seen"] == _requests(tiny, DAYS)  # every request once, counted vs the data
    for key in (*metric_keys(2), "corpus_recall@10@20", "random_joint_recall@10@20"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["num_requests"] == _requests(tiny, [TEST_DAY])  # the whole test day was scored
    with open(out / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows if r["kind"] == "step"]
    assert len(losses) >= 3 and all(np.isfinite(losses))
    assert [r["kind"] for r in rows if r["kind"] == "day"] == ["day", "day"]
    assert json.loads((out / "metrics.json").read_text())["param_digest"] == m["param_digest"]
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name.endswith(f"{DAYS[-1]}_day")
    assert (ckpt / "state.pt").is_file()


def test_local_resume_and_capped_evaluation(tiny: Path, tmp_path: Path) -> None:
    """Stopped after day 1 and run again: continues at day 2 with the uninterrupted run's exact
    parameters; a 1-batch cap scores one batch of the test day."""
    ref = run(_cfg(tiny, tmp_path / "ref", "run.eval_max_batches=1"), verbose=False)
    out = tmp_path / "resumed"
    first = run(
        _cfg(tiny, out, f"data.train_days=[{DAYS[0]}]", "run.eval_max_batches=1"), verbose=False
    )
    assert first["days_trained"] == [f"0:{DAYS[0]}"]
    m = run(_cfg(tiny, out, "run.eval_max_batches=1"), verbose=False)
    assert m["starts"] == 2 and m["days_trained"] == [f"0:{d}" for d in DAYS]
    assert m["param_digest"] == ref["param_digest"]
    assert m["num_requests"] == ref["num_requests"] == 40  # one evaluation batch, not the day


def test_local_batches_are_the_pipeline_groups(tiny: Path) -> None:
    """The local reader's training groups: the day's every request once, shuffled, 40 + n
    candidates, negatives drawn from the same group (sampled slots have priority 0)."""
    from raytopk.data.batch import collate
    from raytopk.data.local_reader import iter_local_groups

    groups = [
        collate(g)
        for g in iter_local_groups(tiny, [DAYS[0]], train=True, sample_num=8, batch_size=32, seed=3)
    ]
    rid = np.concatenate([g.request_id.numpy() for g in groups])
    assert len(rid) == len(set(rid.tolist())) == _requests(tiny, [DAYS[0]])
    assert not np.array_equal(rid, np.sort(rid))
    assert all(g.num_candidates == schema.N_OWN + 8 for g in groups)
    assert all((g.priority[:, schema.N_OWN :] == 0).all() for g in groups)
    again = [collate(g).request_id for g in iter_local_groups(
        tiny, [DAYS[0]], train=True, sample_num=8, batch_size=32, seed=3
    )]
    assert all((a == g.request_id).all() for a, g in zip(again, groups))  # seeded: repeatable


_NO_RAY_RUN = blocked_run("jobs/train.py", {"ray"})


def test_local_backend_trains_end_to_end_without_ray(tiny: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "noray"
    args = [f"data.path={tiny}", f"data.train_days=[{DAYS[0]}..{DAYS[-1]}]",
            f"data.test_day={TEST_DAY}", "data.batch_size=32", "data.eval_batch_size=40",
            "data.sample_num=8", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
            "run.backend=local", "run.eval_max_batches=1", "run.corpus_ms=[]",
            f"run.output_dir={out}"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _NO_RAY_RUN, "--config", "jobs/configs/quickstart.yaml", *args],
        cwd=root, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "BLOCKED_IMPORTS_TRIED []" in proc.stdout, log
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "local" and 0.0 <= m["joint_recall@10@20"] <= 1.0


def test_prefetch_thread_ends_when_the_consumer_stops_before_the_end(tiny: Path) -> None:
    # A budget reached while the producer already queued the whole day and its end marker: the
    # producer must not stay blocked on the full queue (it used to, until a 60 s join timeout).
    import threading

    from raytopk.data.local_reader import iter_local_groups, prefetched

    groups = iter_local_groups(tiny, [DAYS[0]], train=True, sample_num=8, batch_size=60, seed=3)
    it = prefetched(groups, prefetch=1)  # 2 batches + the end marker: the queue fills up
    next(it)
    deadline = threading.Event()
    deadline.wait(1.0)  # let the producer fill the queue and block on the end marker
    it.close()  # the consumer stops early (budget)
    alive = [t for t in threading.enumerate() if t.name == "raytopk-local-data" and t.is_alive()]
    assert alive == []


def test_both_backends_implement_the_session_protocol(tiny: Path, tmp_path: Path) -> None:
    import inspect

    import torch

    from raytopk.ray_env import RayTrainSession
    from raytopk.train.driver import dataset_specs, loop_spec
    from raytopk.train.local_session import LocalSession
    from raytopk.train.prepare import prepare
    from raytopk.train.session import LoopSpec, Session

    prep = prepare(local_config(tiny, tmp_path / "s"))
    local = LocalSession(prep, dataset_specs(prep), torch.device("cpu"), False)
    assert isinstance(local, Session)
    steps = ("restored", "prepare_model", "dataset", "report")
    for name in steps:  # Ray's session needs a Train worker to exist: compare signatures
        ours = inspect.signature(getattr(RayTrainSession, name)).parameters
        want = inspect.signature(getattr(Session, name)).parameters
        assert list(ours) == list(want), name
    spec = loop_spec(prep, 1)
    assert LoopSpec.from_dict(spec.as_dict()) == spec  # through Ray Train's config dict
    assert spec.days == DAYS and spec.test_day == TEST_DAY


def test_progress_lines_show_the_runs_progress_and_eta(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from raytopk.train.driver import run
    from raytopk.train.outputs import eta_text
    from raytopk.train.prepare import planned_samples, prepare

    cfg = local_config(tiny, tmp_path / "eta", "run.report_every_steps=2", "run.corpus_ms=[]",
                       "run.eval_max_batches=1")  # fmt: skip
    assert planned_samples(prepare(cfg)) == 2 * 120  # two training days of 120 requests
    capped = local_config(tiny, tmp_path / "eta2", "run.max_samples=64")
    assert planned_samples(prepare(capped)) == 64
    timed = local_config(tiny, tmp_path / "eta3", "run.max_train_seconds=5")
    assert planned_samples(prepare(timed)) == 0  # a time budget: no sample total to show
    run(cfg, verbose=True)
    lines = [x for x in capsys.readouterr().out.splitlines() if " step " in x and "|" in x]
    assert lines and all("/240 samples (" in x and "training ETA " in x for x in lines)
    assert eta_text({"samples_seen": 60, "samples_per_s": 30.0}, 240) == (
        "60/240 samples (25%), training ETA 0m06s"
    )


def test_eval_threads_apply_to_the_test_day_only(tiny: Path, tmp_path: Path) -> None:
    """run.eval_threads: the test-day evaluation after training runs with that many threads;
    training keeps the worker's own (scaling.cpus_per_worker=1)."""
    import torch

    from raytopk.train.hooks import Hook

    seen: dict[str, int] = {}

    class Threads(Hook):
        def start(self, t):  # type: ignore[no-untyped-def]
            seen["train"] = torch.get_num_threads()

        def final(self, t, test):  # type: ignore[no-untyped-def]
            seen["test"] = torch.get_num_threads()
            return {}

    before = torch.get_num_threads()  # torch's pool started before the run sets its threads
    try:
        cfg = _cfg(tiny, tmp_path / "run", "run.eval_threads=2", "run.eval_max_batches=1")
        run(cfg, verbose=False, hooks=[Threads()])
    finally:
        torch.set_num_threads(before)
    assert seen == {"train": 1, "test": 2}
