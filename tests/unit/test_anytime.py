"""The study's instrument inside one run, on the local backend (no Ray): anytime evaluation
points on the validation day (their time excluded from the training clock), the steady-state
throughput, and pairing by seed (same seed -> same batches, negatives and initial weights for
every operator)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from raytopk.train.config import ConfigError, TrainConfig, load_config
from raytopk.train.driver import dataset_specs, run
from raytopk.train.prepare import prepare

TRAIN = ["2024-01-13", "2024-01-14"]
VALID, TEST = "2024-01-15", "2024-01-16"



def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"data.path={data}",
            f"data.train_days=[{TRAIN[0]}..{TRAIN[-1]}]",
            f"data.test_day={TEST}",
            f"run.valid_day={VALID}",
            "data.batch_size=16",
            "data.eval_batch_size=40",
            "data.sample_num=8",
            "scaling.use_gpu=false",
            "scaling.cpus_per_worker=1",
            "run.backend=local",
            "run.report_every_steps=4",
            "run.corpus_ms=[]",
            "run.eval_max_batches=1",
            "run.epochs=50",
            f"run.output_dir={out}",
            "run.name=anytime",
            *extra,
        ],
    )


def test_eval_points_report_validation_and_exclude_their_time(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import raytopk.train.trainer as trainer

    pause = 1.0  # every evaluation takes at least this long
    real = trainer.evaluate

    def slow_evaluate(*a, **kw):
        time.sleep(pause)
        return real(*a, **kw)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    m = run(_cfg(tiny, out, "run.max_samples=192", "run.eval_points=4"), verbose=False)
    with open(out / "progress.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "valid"]
    assert len(rows) == 4 and [int(r["eval_point"]) for r in rows] == [1, 2, 3, 4]
    seen = [int(r["samples_seen"]) for r in rows]
    # Points at 192 * i / 4 requests (the first step at or past each), the last at the budget.
    assert [s >= 48 * i for i, s in enumerate(seen, 1)] == [True] * 4 and seen == sorted(seen)
    assert all(0.0 <= float(r["valid_joint_recall@10@20"]) <= 1.0 for r in rows)
    assert m["eval_points_done"] == 4 and len(m["anytime_curve"]) == 4
    last = float(rows[-1]["valid_joint_recall@10@20"])
    assert m["valid_joint_recall@10@20"] == pytest.approx(last)
    # Between two points the wall clock advanced by an evaluation (>= pause) that the training
    # clock did not count.
    for a, b in zip(rows, rows[1:]):
        wall = float(b["time"]) - float(a["time"])
        trained = float(b["train_seconds"]) - float(a["train_seconds"])
        assert wall - trained >= 0.9 * pause, (wall, trained)
    assert "joint_recall@10@20" in m  # the test day is still evaluated at the end
    assert m["steady_samples_per_s"] > 0 and m["max_step_seconds"] > 0


def test_selection_runs_never_build_the_test_day(tiny: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny, tmp_path / "sel", "run.max_samples=32", "run.eval_points=2",
               "run.test_eval=false", f"data.test_day={VALID}")
    specs = dataset_specs(prepare(cfg))
    days = {d for s in specs.values() for d in s.days}
    assert TEST not in days and VALID in days and "test" not in specs
    m = run(cfg, verbose=False)
    assert "joint_recall@10@20" not in m and 0.0 <= m["valid_joint_recall@10@20"] <= 1.0


def test_eval_points_need_a_validation_day_and_a_budget(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a budget"):
        _cfg(tiny, tmp_path, "run.eval_points=3")
    with pytest.raises(ConfigError, match="run.valid_day 2024-01-16 is the test day"):
        _cfg(tiny, tmp_path, f"run.valid_day={TEST}")
    with pytest.raises(ConfigError, match="also a training day"):
        _cfg(tiny, tmp_path, f"run.valid_day={TRAIN[0]}")


def _first_batch(cfg: TrainConfig):
    import torch

    from raytopk.train.local_session import LocalSession
    from raytopk.train.session import train_key

    prep = prepare(cfg)
    session = LocalSession(prep, dataset_specs(prep), torch.device("cpu"), False)
    groups = session.dataset(train_key(TRAIN[0]), cfg.data.batch_size, 0)()
    return next(iter(groups))  # a CascadeBatch


def test_same_seed_pairs_data_negatives_and_initial_weights(tiny: Path, tmp_path: Path) -> None:
    budget = ("run.max_samples=16", "run.eval_max_batches=1")
    a = _cfg(tiny, tmp_path / "a", "op.name=dftopk", *budget)
    b = _cfg(tiny, tmp_path / "b", "op.name=lapsum", *budget)
    c = _cfg(tiny, tmp_path / "c", "op.name=dftopk", "run.seed=7", *budget)
    ba, bb, bc = _first_batch(a), _first_batch(b), _first_batch(c)
    assert ba.request_id.tolist() == bb.request_id.tolist()  # same order
    assert (ba.items == bb.items).all()  # same sampled negatives
    assert ba.request_id.tolist() != bc.request_id.tolist()  # another seed, another order
    ma, mb, mc = (run(x, verbose=False) for x in (a, b, c))
    assert ma["init_param_digest"] == mb["init_param_digest"] != mc["init_param_digest"]


def test_explicit_points_test_points_and_dftopk_diagnostics(tiny: Path, tmp_path: Path) -> None:
    # The study's step budgets: points at given sample counts, the test day evaluated at the cut
    # points (here 64 and the end, 160), DFTopK's diagnostics at every point.
    cfg = _cfg(tiny, tmp_path / "pts", "op.name=dftopk", "op.params.tau=1", "run.max_samples=160",
               "run.eval_at_samples=[32,64,96]", "run.test_at_samples=[64,160]",
               "run.diagnostics=true")  # fmt: skip
    m = run(cfg, verbose=False)
    curve = m["anytime_curve"]
    # Each point at the first step at or past its count (120 requests a day: day 1 ends with a
    # batch of 8, so the end, the first step past 160, is at 168).
    assert [p["samples_seen"] for p in curve] == [32, 64, 96, 168] == [
        p["steps"] * 16 - (8 if p["steps"] > 8 else 0) for p in curve
    ]
    has_test = ["test_joint_recall@10@20" in p for p in curve]
    assert has_test == [False, True, False, True]
    # The end's test point is the run's own final test evaluation.
    assert curve[-1]["test_joint_recall@10@20"] == m["joint_recall@10@20"]
    for p in curve:
        for s in (0, 1):
            assert p[f"diag_psum_over_k{s}"] > 0
            assert 0.0 <= p[f"diag_boundary_grad_share{s}"] <= 1.0
            assert p[f"diag_score_std_over_tau{s}"] >= 0.0


def test_diagnostics_by_hand() -> None:
    import torch

    from raytopk.data import schema
    from raytopk.data.batch import random_batch
    from raytopk.ops.dftopk import dftopk
    from raytopk.train.diagnostics import diagnostics
    from raytopk.train.model import CascadeModel

    vocab = {t: 30 for t in set(schema.EMBEDDING_TABLE.values())}
    vocab |= {"weekday": 9, "hour": 26, "minute": 62}
    torch.manual_seed(0)
    model = CascadeModel(["dssm", "din"], vocab, 8, "dftopk", {"tau": 0.5}, [10, 10], 10)
    batch = random_batch(6, 30, vocab, seed=3)
    d = diagnostics(model, batch)
    # Stage 0 by hand: Σp/k over rows with more than k valid slots; score std / τ.
    with torch.no_grad():
        x = model.scores(batch)[0]
    rows = batch.cand_mask.sum(-1) > 10
    p = dftopk(x[rows], 10, batch.cand_mask[rows], tau=0.5)
    assert d["diag_psum_over_k0"] == pytest.approx(float((p.sum(-1) / 10).mean()), abs=1e-4)
    sd = torch.stack([x[r][batch.cand_mask[r]].std(unbiased=False) for r in range(6) if rows[r]])
    assert d["diag_score_std_over_tau0"] == pytest.approx(float((sd / 0.5).mean()), abs=1e-3)
    assert 0.0 < d["diag_boundary_grad_share0"] < 1.0
    # Another method: nothing measured.
    lap = CascadeModel(["dssm", "din"], vocab, 8, "lapsum", {}, [10, 10], 10)
    assert diagnostics(lap, batch) == {}


def test_explicit_points_are_checked(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="counts samples"):
        _cfg(tiny, tmp_path, "run.max_train_seconds=5", "run.eval_at_samples=[16]")
    with pytest.raises(ConfigError, match="<= run.max_samples 64"):
        _cfg(tiny, tmp_path, "run.max_samples=64", "run.eval_at_samples=[16,80]")
    with pytest.raises(ConfigError, match=r"run.test_at_samples \[48\] are not anytime points"):
        _cfg(tiny, tmp_path, "run.max_samples=64", "run.eval_at_samples=[16,32]",
             "run.test_at_samples=[48]")  # fmt: skip
