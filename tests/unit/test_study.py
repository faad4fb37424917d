"""The sample-scaling study's pure parts: config loading, the trial grid, resource planning,
the O(N²) memory skip, and the reports (no Ray)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from raytopk.losses import default_form, list_methods
from raytopk.ops import list_ops
from raytopk.train.config import ConfigError, validate
from raytopk.train.resources import plan_resources
from raytopk.tune.study import (
    _TRIAL_CPU,
    compute_planner,
    load_study,
    step_bytes,
    study_ops,
    trial_configs,
    write_reports,
)

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
STUDIES = sorted(CONFIGS.glob("study*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_yamls_load_and_every_trial_validates(path: Path) -> None:
    study, base = load_study(path)
    if study.step_table:  # compute matched: every trial's steps from the committed table
        study.step_table = str(CONFIGS.parents[1] / study.step_table)
        base.run.valid_day = "2024-02-20"  # resolve_base's held-out day (no data generated here)
    planner = compute_planner(study, base)
    trials = trial_configs(study, base, plan=planner[0] if planner else None)
    ops = study.ops or list_methods()
    assert study_ops(study, base) == ops
    assert len(trials) == len(ops) * len(study.sample_nums) * len(study.seeds)
    names = {t["trial"] for t in trials}
    assert len(names) == len(trials)  # one output dir per trial: resume finds its checkpoint
    from raytopk.train.config import from_dict

    for t in trials:
        cfg = validate(from_dict(t["train"]))
        assert cfg.op.name == t["op"] and cfg.data.sample_num == t["sample_num"]
        assert cfg.loss.form == t["loss_form"] == default_form(t["op"])
        assert cfg.run.max_train_seconds == study.budget_seconds
        if study.step_table and t["op"] != "diffsort":
            assert cfg.run.max_samples >= 128 * min(study.slowest_steps.values())
            assert len(cfg.run.eval_at_samples) >= study.eval_points - 1
            assert cfg.run.test_at_samples and cfg.run.diagnostics == (t["op"] == "dftopk")
        assert cfg.run.output_dir.endswith(t["trial"])
        assert cfg.op.params == {} or set(cfg.op.params) <= {"tau", "alpha", "l", "steepness"}


def test_quick_study_covers_every_operator() -> None:
    study, base = load_study(CONFIGS / "study_quick.yaml")
    assert study.ops == [] and study.sample_nums == [0, 160] and len(study.seeds) == 1
    assert study.select is False and study.trial_backend == "local"
    ops = {t["op"] for t in trial_configs(study, base)}
    assert ops == {*list_ops(), "bce"}  # every operator and the bce baseline


def test_study_loss_forms_and_the_bce_baseline() -> None:
    study, base = load_study(
        CONFIGS / "study_quick.yaml",
        ["study.ops=[sparse_topk,bce]", "study.loss_forms={sparse_topk: bce_logits}"],
    )
    forms = {t["op"]: t["loss_form"] for t in trial_configs(study, base)}
    assert forms == {"sparse_topk": "bce_logits", "bce": "bce"}
    assert step_bytes("bce", 64, 200) > 0
    with pytest.raises(ConfigError, match="study.loss_forms.bce"):
        load_study(CONFIGS / "study_quick.yaml", ["study.loss_forms={bce: mse}"])
    with pytest.raises(ConfigError, match="study.ops: unknown operator 'nope'"):
        load_study(CONFIGS / "study_quick.yaml", ["study.ops=[nope]"])


def test_overrides_and_unknown_keys(tmp_path: Path) -> None:
    path = CONFIGS / "study_quick.yaml"
    study, base = load_study(
        path, ["study.budget_seconds=3", "study.ops=[dftopk,lapsum]", "train.data.batch_size=64"]
    )
    assert study.budget_seconds == 3 and study.ops == ["dftopk", "lapsum"]
    assert base.data.batch_size == 64
    # The training config's typed loader: the closest valid key, typed values.
    def fails(override: str, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            load_study(path, [override])

    fails("study.budget_second=3", r"'study\.budget_second' \(did you mean 'study\.budget_seconds'")
    fails("train.data.batch_sise=3", r"'train\.data\.batch_sise' \(did you mean 'train\.data\.b")
    fails("study.budget_seconds=soon", r"study\.budget_seconds: expected a number, got 'soon'")
    fails("budget_seconds=3", r"unknown config key 'budget_seconds'.*study\.budget_seconds")
    with pytest.raises(ConfigError, match="unknown operator 'nope'"):
        load_study(path, ["study.ops=[nope]"])
    with pytest.raises(ConfigError, match="set at least one budget"):
        load_study(path, ["study.budget_seconds=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {}\ntrain: {}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'extra'"):
        load_study(bad)


def test_op_params_reset_per_operator() -> None:
    study, base = load_study(
        CONFIGS / "study_quick.yaml",
        ["study.ops=[dftopk,lapsum]", "study.op_params={lapsum: {alpha: 2.0}}"],
    )
    by_op = {t["op"]: t["train"]["op"]["params"] for t in trial_configs(study, base)}
    assert by_op == {"dftopk": {}, "lapsum": {"alpha": 2.0}}


def _trial_plan(cluster: dict[str, float], concurrent: int = 0):
    # How run_study plans its trials: the one planner the training driver uses too.
    return plan_resources(
        cluster, num_workers=1, use_gpu=False, trial_cpu=_TRIAL_CPU, concurrent=concurrent,
        max_cpus_per_worker=1.0,
    )


def test_resource_plan_leaves_cpus_to_ray_data() -> None:
    plan = _trial_plan({"CPU": 2.0})
    assert plan.concurrent == 1 and plan.cpus_per_worker == 0.9  # 2 - 1 (Ray Data) - 0.1
    plan = _trial_plan({"CPU": 16.0})
    per, conc = plan.cpus_per_worker, plan.concurrent
    assert per == 1.0 and conc >= 8 and conc * (per + 0.1) <= 16 - 4 + 1e-9
    with pytest.raises(ValueError, match="leave less than one"):
        _trial_plan({"CPU": 2.0}, concurrent=4)


def test_local_trials_keep_no_cpu_for_ray_data() -> None:
    # study.trial_backend=local: trials read their days in their own process, without Ray
    # Data, so two one-CPU trials may fill a 2-CPU machine; three may not.
    def plan(conc: int, per: float | str = 1.0):
        return plan_resources({"CPU": 2.0}, num_workers=1, cpus_per_worker=per, use_gpu=False,
                              concurrent=conc, max_cpus_per_worker=1.0, ray_data=False)

    p = plan(2)
    assert (p.concurrent, p.cpus_per_worker, p.threads) == (2, 1.0, 1)
    assert plan(0, "auto").concurrent == 2  # as many as fit
    with pytest.raises(ValueError, match="need more than the cluster's 2 CPUs"):
        plan(3)
    with pytest.raises(ValueError, match="leave less than one"):  # with Ray Data: refused
        plan_resources({"CPU": 2.0}, num_workers=1, cpus_per_worker=1.0, use_gpu=False,
                       concurrent=2, max_cpus_per_worker=1.0)


def test_step_memory_comes_from_the_registry() -> None:
    from raytopk.ops import get_spec

    # Two stages, each running the operator and its loss: twice the registry's per-stage bytes.
    for op in list_ops():
        assert step_bytes(op, 64, 200) == 2 * get_spec(op).step_bytes(64, 200)
    assert step_bytes("dftopk", 64, 200, num_stages=3) == 3 * get_spec("dftopk").step_bytes(64, 200)
    # DiffSort's autograd keeps ~N layers of B x N x N: at N = 680 far beyond any budget,
    # while an O(N) operator stays small.
    assert step_bytes("diffsort", 1024, 680) > 100 * 1024**3
    assert step_bytes("dftopk", 1024, 680) < 1024**3


def test_reports_rank_ops_and_keep_failed_trials(tmp_path: Path) -> None:
    def row(op: str, n: int, seed: int, joint: float, seen: int, status: str = "ok") -> dict:
        return {
            "trial": f"{op}-n{n}-s{seed}",
            "op": op,
            "sample_num": n,
            "seed": seed,
            "status": status,
            "samples_seen": seen,
            "train_seconds": 10.0,
            "samples_per_second": seen / 10.0,
            "joint_recall@10@20": joint,
            "corpus_recall@10@100": 0.2,
            "num_candidates": 40 + n,
        }

    rows = [
        row("dftopk", 0, 1, 0.5, 1000),
        row("dftopk", 0, 2, 0.7, 1200),
        row("neuralsort", 0, 1, 0.4, 500),
        row("neuralsort", 160, 1, 0.0, 0, status="skipped: needs ~9.0 GiB"),
        row("dftopk", 160, 1, 0.45, 900),
    ]
    paths = write_reports(rows, tmp_path)
    with paths["csv"].open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 5 and "corpus_recall@10@100" in got[0]
    assert {r["status"] for r in got} == {"ok", "skipped: needs ~9.0 GiB"}
    md = paths["md"].read_text()
    sec0 = md.split("## sample_num = 0")[1].split("## sample_num = 160")[0]
    assert sec0.index("dftopk") < sec0.index("neuralsort")  # ranked by joint recall
    # mean ± 95% t-interval over the two seeds: t(0.975, 1) * 0.1414 / sqrt(2) = 1.2706
    assert "0.6000 ± 1.2706" in sec0
    assert "skipped: needs ~9.0 GiB" in md.split("## sample_num = 160")[1]
    assert paths["png"].is_file() and paths["png"].stat().st_size > 0
    assert not (tmp_path / "results.csv.tmp").exists()
