"""The study end to end on the session's local Ray: selection on the validation day under ASHA,
then paired final trials with anytime points, local trials inside Tune (small sizes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from raytopk.tune.study import load_study, run_study

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(600)
def test_selection_then_paired_final_trials(ray_cluster: Any, tmp_path: Path) -> None:
    out = tmp_path / "study"
    study, base = load_study(
        CONFIGS / "study_quick.yaml",
        [
            "study.ops=[dftopk,softsort]",
            "study.sample_nums=[0]",
            "study.seeds=[1,2]",
            "study.select=true",
            "study.grid_size=2",
            "study.grid_factor=10",
            "study.grid_extend=1",
            "study.eval_points=3",
            "study.budget_seconds=2",
            "study.cpus_per_worker=1",
            f"study.output_dir={out}",
            f"train.data.synthetic.root={tmp_path}/data",
            "train.data.synthetic.requests_per_day=300",
            "train.run.eval_max_batches=1",
            "train.data.eval_batch_size=100",
            "train.data.batch_size=64",
            "train.run.corpus_ms=[100]",
        ],
    )
    rows = run_study(study, base, verbose=False)
    assert sorted((r["op"], r["seed"]) for r in rows) == [
        ("dftopk", 1), ("dftopk", 2), ("softsort", 1), ("softsort", 2)
    ]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    sel = json.loads((out / "selection.json").read_text())
    assert set(sel["chosen"]) == {"dftopk", "softsort"}
    # A grid of 2 values always has its best on an edge: one extension round, one value a
    # factor 10 further out per op, run without ASHA and chosen from with the rest.
    first = [t for t in sel["trials"] if not t.get("round")]
    ext = [t for t in sel["trials"] if t.get("round") == 1]
    assert len(first) == 4 and len(ext) == 2, sel["trials"]
    for t in ext:
        vals = sorted(f["value"] for f in first if f["op"] == t["op"])
        assert t["value"] in (vals[0] / 10, vals[-1] * 10) and t["value"] in sel["grid"][t["op"]]
    for op, d in sel["chosen"].items():
        assert d["0"]["value"] in sel["grid"][op] and d["0"]["seeds"] == 1
        chosen = {json.loads(r["op_params"])[next(iter(json.loads(r["op_params"])))]
                  for r in rows if r["op"] == op}
        assert chosen == {d["0"]["value"]}  # the final trials ran with the chosen value
    for t in sel["trials"]:  # selection never evaluated the test day
        assert t["status"] == "ok" or t["status"].startswith("stopped early"), t
    for r in rows:
        assert 0.0 <= r["joint_recall@10@20"] <= 1.0 and len(r["anytime_curve"]) == 3
    digests = {r["seed"]: set() for r in rows}
    for r in rows:
        digests[r["seed"]].add(r["init_param_digest"])
    assert all(len(d) == 1 for d in digests.values())  # paired: same initial weights per seed
    with (out / "anytime.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 12
    md = (out / "results.md").read_text()
    assert "Parameter selection (validation day" in md and "vs dftopk (paired)" in md
    # The same command again: selection and every final trial are found done, nothing re-runs.
    finals = sorted(p.name for p in (out / "tune").iterdir() if "_final_" in p.name)
    again = run_study(study, base, verbose=False)
    assert sorted(p.name for p in (out / "tune").iterdir() if "_final_" in p.name) == finals
    assert sorted((r["trial"], r["joint_recall@10@20"]) for r in again) == sorted(
        (r["trial"], r["joint_recall@10@20"]) for r in rows)


@pytest.mark.timeout(600)
def test_compute_matched_study_resumes_from_its_row_log_alone(
    ray_cluster: Any, tmp_path: Path
) -> None:
    import shutil

    out, res = tmp_path / "study", tmp_path / "results"
    table = tmp_path / "step_times.json"  # softsort 3x dftopk's step: 3x the steps for dftopk
    table.write_text(json.dumps({"batch_size": 64, "machine": {"device_name": "test"},
                                 "rows": [{"method": "dftopk", "N": 40, "median_s": 0.1},
                                          {"method": "softsort", "N": 40, "median_s": 0.3}]}))
    args = [
        "study.ops=[dftopk,softsort]", "study.sample_nums=[0]", "study.seeds=[1,2]",
        "study.select=true", "study.grid_size=1", "study.grid_extend=0",
        "study.lrs=[0.003,0.01]", "study.select_seeds=[1,2]", "study.eval_points=2",
        "study.budget_seconds=0", f"study.step_table={table}", "study.slowest_steps={0: 2}",
        "study.compute_cuts=[0.5,1.0]", "study.cpus_per_worker=1",
        f"study.output_dir={out}", f"study.results_dir={res}",
        f"train.data.synthetic.root={tmp_path}/data", "train.data.synthetic.requests_per_day=320",
        "train.run.eval_max_batches=1", "train.data.eval_batch_size=100",
        "train.data.batch_size=64", "train.run.corpus_ms=[100]",
    ]
    study, base = load_study(CONFIGS / "study_quick.yaml", args)
    rows = run_study(study, base, verbose=False)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    steps = {r["op"]: r["max_samples"] // 64 for r in rows}
    assert steps == {"softsort": 2, "dftopk": 6}  # T = 2 x 0.3 s: dftopk gets 6 steps
    for r in rows:
        curve = r["anytime_curve"]
        assert curve[-1]["steps"] == steps[r["op"]] and len(curve) >= 2
        tested = sorted(p["steps"] for p in curve if "test_joint_recall@10@20" in p)
        # equal steps at 1 and 2 (S = 2), equal compute at half and all of the op's steps
        assert tested == sorted({1, 2, steps[r["op"]] // 2, steps[r["op"]]})
        if r["op"] == "dftopk":
            assert "diag_psum_over_k0" in curve[0]
    sel = json.loads((res / "selection.json").read_text())
    assert len(sel["trials"]) == 2 * 2 * 2  # 2 ops x 2 lrs x 2 seeds, one parameter value
    assert {c["0"]["lr"] for c in sel["chosen"].values()} <= {0.003, 0.01}
    # The mean over the seeds that reached the end (ASHA may stop one seed of a setting).
    assert all(c["0"]["seeds"] in (1, 2) for c in sel["chosen"].values())
    assert not (res / "trials").exists()  # trial directories stay in output_dir
    comp = (res / "equal_compute.csv").read_text()
    assert "compute" in comp and "steps" in comp and (res / "plateau.json").is_file()
    claims = json.loads((res / "claims.json").read_text())["per_n"]
    assert [e["N"] for e in claims] == [40] and claims[0]["steps"] == steps
    assert claims[0]["methods"]["softsort"]["b"]["sample_ratio"] == 3.0
    logged = (res / "trials.jsonl").read_text().splitlines()
    assert len(logged) == 8 + 4  # every selection and final trial, once
    # selection.json names the rows chosen from by digest, and the study's own claims read
    # the selection back as jobs/study_claims.py does.
    from raytopk.tune.claims import claims_rows, read_studies

    assert {t["config_digest"] for t in sel["trials"]} == {
        r["config_digest"] for r in map(json.loads, logged) if r["phase"] == "select"}
    assert read_studies([res])[0].selected == {t["config_digest"] for t in sel["trials"]}
    assert json.loads((res / "claims.json").read_text()).get("selection_horizon") == (
        claims_rows(read_studies([res])).get("selection_horizon"))
    # A fresh clone: no Tune storage, no trial directories, only the committed results.
    shutil.rmtree(out)
    again = run_study(study, base, verbose=False)
    assert not (out / "tune").exists()  # nothing ran: no Tune experiment was started
    assert sorted((r["trial"], r["joint_recall@10@20"]) for r in again) == sorted(
        (r["trial"], r["joint_recall@10@20"]) for r in rows)
    # Each run's wall-clock window is logged beside the row log: 12 trials, then none.
    runs = [json.loads(x) for x in (res / "runs.jsonl").read_text().splitlines()]
    assert [(r["status"], r["rows_logged"], r["sample_nums"]) for r in runs] == [
        ("finished", 12, [0]), ("finished", 0, [0])]
    assert all(r["started"] <= r["ended"] for r in runs)
    assert (res / "trials.jsonl").read_text().splitlines() == logged


@pytest.mark.timeout(300)
def test_an_interrupted_experiment_logs_only_finished_trials(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # Ctrl-C makes Tune's fit() return with trials unfinished: they must not be logged as ended
    # (a resumed study would skip them), nor the study go on to choose from a partial selection.
    import os
    from types import SimpleNamespace

    from raytopk.tune.experiments import StudyInterrupted, logged_rows, run_experiment

    def interrupting(config: dict[str, Any]) -> None:
        # Defined here so that Ray pickles it by value (a test module is not importable in a
        # worker). It finishes, or (the second trial) reports a validation point and sends the
        # driver the SIGINT of a Ctrl-C, as a user stopping the study would.
        import os
        import signal
        import time

        import ray.tune

        t = config["trial"]
        ray.tune.report({"samples_seen": 10, "valid_joint_recall@10@20": 0.5})
        if t["trial"] == "second":
            os.kill(t["driver_pid"], signal.SIGINT)
            time.sleep(120)
        ray.tune.report({"status": "ok", "samples_seen": 20, "valid_joint_recall@10@20": 0.6,
                         **{k: t[k] for k in ("trial", "phase", "op", "seed")}})  # fmt: skip


    study = SimpleNamespace(output_dir=str(tmp_path), results_dir="", storage_path="",
                            budget_seconds=0)  # fmt: skip
    trials = [{"trial": name, "phase": "select", "op": "dftopk", "seed": 1,
               "driver_pid": os.getpid(), "train": {"run": {"seed": i}}}
              for i, name in enumerate(["first", "second", "third"])]  # fmt: skip
    with pytest.raises(StudyInterrupted, match=r"did not finish \(second"):
        run_experiment(study, "interrupted", trials, interrupting, 1, None,
                       2, False, "samples_seen")  # fmt: skip
    logged = logged_rows(study, "select")
    assert [r["trial"] for r in logged.values()] == ["first"]
