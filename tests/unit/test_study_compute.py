"""The compute-matched study (raytopk.tune.compute, compute_reports, selection, experiments):
step counts from a step table, cut points, the equal-compute comparison, the joint lr x
parameter choice on the validation day over seeds, and resuming from the committed row log."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from raytopk.tune.compute import load_step_table, trial_plan
from raytopk.tune.compute_results import comparison_rows, plateau, recut
from raytopk.tune.selection import choose, choose_joint, chosen_lrs, lr_extensions

JOBS = Path(__file__).resolve().parents[2] / "jobs"
CONFIGS = JOBS / "configs"


def _table(tmp_path: Path, rows: dict[tuple[str, int], float], batch: int = 128) -> Path:
    p = tmp_path / "step_times.json"
    p.write_text(json.dumps({
        "batch_size": batch, "machine": {"device_name": "test cpu", "cpu_cores": 2},
        "rows": [{"method": m, "N": n, "median_s": s} for (m, n), s in rows.items()],
    }))
    return p


def test_steps_from_the_table_give_equal_compute(tmp_path: Path) -> None:
    t = load_step_table(_table(tmp_path, {("dftopk", 200): 0.1, ("softsort", 200): 0.25,
                                          ("bce", 200): 0.08}))  # fmt: skip
    methods = ["dftopk", "softsort", "bce"]
    budget = t.budget(methods, 200, 300)
    assert budget == pytest.approx(75.0)  # the slowest (softsort) gets S_N = 300 steps
    steps = {m: t.steps(m, 200, budget) for m in methods}
    assert steps == {"dftopk": 750, "softsort": 300, "bce": 937}
    for m in methods:  # every method's steps cost at most T_N, and one more step would not fit
        assert steps[m] * t.t(m, 200) <= budget + 1e-9 < (steps[m] + 1) * t.t(m, 200)
    plan = trial_plan(t, methods, "dftopk", 200, 300, [0.25, 0.5, 1.0], 8)
    assert plan.steps == 750 and plan.compute_cuts == [187, 375, 750]
    assert plan.step_cuts == [75, 150, 300]
    assert plan.test_steps == [75, 150, 187, 300, 375, 750]
    assert len(plan.eval_steps) >= 8 and plan.eval_steps[-1] == 750
    assert set(plan.test_steps) <= set(plan.eval_steps)
    s = plan.as_samples(128)
    assert s["max_samples"] == 750 * 128 and 750 * 128 not in s["eval_at_samples"]
    assert s["test_at_samples"] == [x * 128 for x in plan.test_steps]


def test_step_table_errors_name_the_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_step_table(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch_size": 128, "rows": [{"method": "dftopk", "N": 40}]}))
    with pytest.raises(ValueError, match=r"bad.json.*rows\[0\] lacks method/N/median_s"):
        load_step_table(bad)
    t = load_step_table(_table(tmp_path, {("dftopk", 40): 0.05}))
    with pytest.raises(KeyError, match="no row for lapsum at N=40"):
        t.t("lapsum", 40)


def _final_row(op: str, seed: int, curve: list[tuple[int, float, float | None]]) -> dict:
    pts = []
    for i, (step, valid, test) in enumerate(curve, 1):
        p = {"point": i, "steps": step, "valid_joint_recall@10@20": valid}
        if test is not None:
            p["test_joint_recall@10@20"] = test
        pts.append(p)
    return {"status": "ok", "op": op, "sample_num": 160, "seed": seed, "phase": "final",
            "anytime_curve": pts}


def test_equal_compute_and_equal_steps_cut_points(tmp_path: Path) -> None:
    t = load_step_table(_table(tmp_path, {("dftopk", 200): 0.1, ("softsort", 200): 0.2}))
    # S_N = 4: softsort 4 steps, dftopk 8 in the same compute. Cuts 1/2 and 1.
    rows = []
    for seed, bump in ((1, 0.0), (2, 0.02), (3, 0.01)):
        rows.append(_final_row("dftopk", seed, [(2, .1, .20 + bump), (4, .2, .30 + bump),
                                                (8, .3, .50 + bump)]))  # fmt: skip
        rows.append(_final_row("softsort", seed, [(2, .1, .25 + bump), (4, .2, .40 + bump)]))
    comp = comparison_rows(rows, t, {160: 4}, [0.5, 1.0], "joint_recall@10@20", "dftopk")
    get = {(r["comparison"], r["fraction"], r["method"]): r for r in comp}
    # Equal steps: both at step 4 (and 2); softsort ahead by 0.10 on every seed.
    assert get[("steps", 1.0, "dftopk")]["step"] == get[("steps", 1.0, "softsort")]["step"] == 4
    assert get[("steps", 1.0, "softsort")]["diff_to_ref"] == pytest.approx(0.10)
    # Equal compute: dftopk at step 8, softsort at 4 (0.8 s each); dftopk ahead by 0.10.
    c = get[("compute", 1.0, "softsort")]
    assert (get[("compute", 1.0, "dftopk")]["step"], c["step"]) == (8, 4)
    assert c["compute_s"] == get[("compute", 1.0, "dftopk")]["compute_s"] == pytest.approx(0.8)
    assert c["diff_to_ref"] == pytest.approx(-0.10) and c["diff_high"] < 0
    assert get[("compute", 0.5, "dftopk")]["step"] == 4
    assert get[("steps", 1.0, "dftopk")]["seeds"] == 3
    pl = plateau(rows, "joint_recall@10@20")[200]
    assert pl["method"] == "dftopk" and pl["last_quarter_gain"] == pytest.approx(0.1)


def test_recut_reads_validation_interpolated_for_another_device(tmp_path: Path) -> None:
    res = tmp_path / "res"
    res.mkdir()
    (res / "study.yaml").write_text(
        "study: {slowest_steps: {160: 4}, compute_cuts: [1.0], reference_op: dftopk}\n"
        "train: {model: {stages: [dssm, din]}}\n"
    )
    rows = [_final_row("dftopk", 1, [(2, .1, None), (4, .2, None), (8, .4, None)]),
            _final_row("softsort", 1, [(2, .1, None), (4, .3, None)]),
            # a final trial of a setting the selection later moved away from: not reported
            _final_row("dftopk", 1, [(2, .9, None), (4, .9, None), (8, .9, None)])]
    for r, name in zip(rows, ("dftopk-tau5-s1", "softsort-tau1-s1", "dftopk-tau50-s1")):
        r["trial"] = name
    rows.append({**rows[0], "status": "error: killed", "anytime_curve": []})  # a failed retry
    (res / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (res / "results.csv").write_text("trial,op\ndftopk-tau5-s1,dftopk\nsoftsort-tau1-s1,softsort\n")
    # Another device where dftopk costs 2/3 of softsort: T = 4 x 0.3 = 1.2 s -> dftopk 6 steps.
    other = _table(tmp_path, {("dftopk", 200): 0.2, ("softsort", 200): 0.3})
    comp = recut(res, other, tmp_path / "recut")
    d = next(r for r in comp if r["comparison"] == "compute" and r["method"] == "dftopk")
    assert d["step"] == 6 and d["mean"] == pytest.approx(0.3)  # between (4, .2) and (8, .4)
    assert d["seeds"] == 1
    assert "VALIDATION" in (tmp_path / "recut" / "equal_compute.md").read_text()
    with pytest.raises(ValueError, match="results directory"):
        recut(res, other, res)  # never over the study's own equal_compute files
    # The command: same files; a directory that is not a study's results is named.
    spec = importlib.util.spec_from_file_location("study_recut", JOBS / "study_recut.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--results", str(res), "--step-table", str(other),
                     "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "equal_compute.csv").read_text() == (
        tmp_path / "recut" / "equal_compute.csv").read_text()
    assert job.main(["--results", str(tmp_path), "--step-table", str(other),
                     "--out", str(tmp_path / "x")]) == 2


def test_joint_choice_averages_seeds_over_lr_and_parameter() -> None:
    key = "valid_joint_recall@10@20"

    def row(v, lr, seed, score, status="ok", op="dftopk"):
        return {"op": op, "sample_num": 0, "value": v, "lr": lr, "seed": seed,
                "status": status, key: score}

    rows = [
        row(0.5, 0.01, 1, 0.50), row(0.5, 0.01, 2, 0.40),  # mean 0.45
        row(0.5, 0.03, 1, 0.60), row(0.5, 0.03, 2, 0.20),  # mean 0.40
        row(5.0, 0.01, 1, 0.47), row(5.0, 0.01, 2, 0.46),  # mean 0.465: best
        row(50., 0.01, 1, 0.90), row(50., 0.01, 2, 0.1, "stopped early (ASHA)"),  # one seed only
        row("", 0.003, 1, 0.3, op="bce"), row("", 0.003, 2, 0.3, op="bce"),
        row("", 0.01, 1, 0.2, op="bce"), row("", 0.01, 2, 0.2, op="bce"),
    ]
    joint = choose_joint(rows, "joint_recall@10@20", base_lr=0.01)
    assert joint[("dftopk", 0)] == {"value": 5.0, "lr": 0.01, "score": 0.465, "seeds": 2}
    assert joint[("bce", 0)]["value"] is None and joint[("bce", 0)]["lr"] == 0.003
    assert choose(rows, "joint_recall@10@20") == {"dftopk": {0: 5.0}}
    assert chosen_lrs(joint) == {"dftopk": {0: 0.01}, "bce": {0: 0.003}}
    # The chosen lr is the edge of those tried with the chosen value: one step further out.
    ext = lr_extensions(rows, joint, 3.0)
    assert ("dftopk", 0, 5.0, 0.00333333) in ext and ("bce", 0, None, 0.001) in ext
    # Only 0.01 was tried with 5.0 (0.03 was tried with 0.5): it extends both ways; bce's
    # chosen 0.003 is inside on the high side.
    assert ("dftopk", 0, 5.0, 0.03) in ext and len(ext) == 3


def test_row_log_skips_a_last_row_cut_short_and_names_a_corrupt_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from raytopk.tune.experiments import logged_rows

    study = SimpleNamespace(results_dir=str(tmp_path), output_dir=str(tmp_path))
    ok = {"phase": "final", "status": "ok", "config_digest": "a1"}
    log = tmp_path / "trials.jsonl"
    log.write_text(json.dumps(ok) + "\n" + '{"phase": "final", "sta')  # killed mid-write
    assert set(logged_rows(study, "final")) == {"a1"}
    from raytopk.tune.experiments import _append_row

    _append_row(log, {**ok, "config_digest": "b2"})  # the next row replaces the cut one
    assert log.read_text().count("\n") == 2 and set(logged_rows(study, "final")) == {"a1", "b2"}
    log.write_text('{"phase": "fin\n' + json.dumps(ok) + "\n")  # not the last line: an error
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        logged_rows(study, "final")


def test_a_run_per_n_keeps_the_other_ns_selection_and_final_rows(tmp_path: Path) -> None:
    """study.sample_nums=[0], then [2] as a second run on the same row log: selection.json
    keeps N = 0's trials and choice, and logged_finals gives back N = 0's reported final rows
    (not a final of a setting the selection moved away from)."""
    from raytopk.train.config import from_dict, to_dict
    from raytopk.tune.experiments import ROW_LOG, config_digest
    from raytopk.tune.selection import param_grid, run_selection, selection_trials
    from raytopk.tune.study import _budgeted, earlier_ns, load_study, logged_finals, trial_configs

    res, out = tmp_path / "res", tmp_path / "out"
    args = ["study.ops=[dftopk,softsort]", "study.seeds=[1,2]", "study.select=true",
            "study.grid_size=1", "study.grid_extend=0", "study.lrs=[0.003,0.01]",
            "study.select_seeds=[1,2]", "study.budget_seconds=5", f"study.output_dir={out}",
            f"study.results_dir={res}", "study.sample_nums=[2]"]
    study, base = load_study(CONFIGS / "study_quick.yaml", args)
    budgeted = _budgeted(study, base)
    ops = ["dftopk", "softsort"]
    grid = {op: param_grid(op, study.grid_size, study.grid_factor, study.grids.get(op))
            for op in ops}
    sel = selection_trials(ops, [0, 2], [1, 2], grid, budgeted, out, study.loss_forms,
                           list(study.lrs))
    key = "valid_joint_recall@10@20"
    best_lr = {0: 0.003, 2: 0.01}  # N = 0 and N = 2 choose different learning rates
    rows = [{**{k: t[k] for k in ("trial", "phase", "op", "sample_num", "seed", "param",
                                  "value", "lr")},
             "status": "ok", key: 0.5 + 0.1 * (t["lr"] == best_lr[t["sample_num"]]),
             "config_digest": config_digest(t["train"])} for t in sel]
    chosen = {op: {0: grid[op][0]} for op in ops}
    finals = trial_configs(replace(study, sample_nums=[0]), base, chosen,
                           {op: {0: 0.003} for op in ops})
    stale = trial_configs(replace(study, sample_nums=[0]), base,
                          {op: {0: grid[op][0] * 10} for op in ops},
                          {op: {0: 0.003} for op in ops})
    rows += [{"trial": t["trial"], "phase": "final", "op": t["op"], "sample_num": 0,
              "seed": t["seed"], "status": "ok", "config_digest": config_digest(t["train"])}
             for t in finals + stale]
    # A selection row at N = 0 from another config (another budget): not chosen from.
    other = from_dict(to_dict(budgeted))
    other.run.max_train_seconds = 99.0
    foreign = selection_trials(["dftopk"], [0], [1, 2], {"dftopk": grid["dftopk"]}, other, out,
                               study.loss_forms, [0.01])
    rows += [{**{k: t[k] for k in ("trial", "phase", "op", "sample_num", "seed", "param",
                                   "value", "lr")},
              "trial": t["trial"] + "-other", "status": "ok", key: 0.99,
              "config_digest": config_digest(t["train"])} for t in foreign]
    rows += [{"trial": t["trial"], "phase": "final", "op": t["op"], "sample_num": 0,
              "seed": t["seed"], "status": "error: killed", "config_digest": "x" + t["trial"]}
             for t in finals]  # failed attempts: never a reported row
    res.mkdir()
    (res / ROW_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert earlier_ns(study) == [0]
    # Every N = 2 selection trial is logged: nothing runs, the files are written.
    joint = run_selection(study, budgeted, ops, [1, 2], out, None, 1, 2, False, results=res)
    assert {(op, n): c["lr"] for (op, n), c in joint.items()} == {
        (op, n): best_lr[n] for op in ops for n in (0, 2)}
    doc = json.loads((res / "selection.json").read_text())
    assert {op: sorted(c) for op, c in doc["chosen"].items()} == {op: ["0", "2"] for op in ops}
    assert {t["sample_num"] for t in doc["trials"]} == {0, 2} and len(doc["trials"]) == 16
    # Each listed trial carries its digest: the foreign rows are not among them.
    assert {t["config_digest"] for t in doc["trials"]} == {
        r["config_digest"] for r in rows if r["phase"] == "select"
        and not r["trial"].endswith("-other")}
    got = logged_finals(study, base, [0], chosen, {op: {0: 0.003} for op in ops})
    assert sorted(r["trial"] for r in got) == sorted(t["trial"] for t in finals)
    assert logged_finals(study, base, [], chosen) == []


def test_a_run_for_one_n_refuses_a_row_log_whose_other_n_it_cannot_rebuild(
    tmp_path: Path,
) -> None:
    from raytopk.train.config import ConfigError
    from raytopk.tune.compute import compute_planner
    from raytopk.tune.experiments import ROW_LOG
    from raytopk.tune.study import check_earlier, earlier_ns, load_study

    res = tmp_path / "res"
    res.mkdir()
    (res / ROW_LOG).write_text(json.dumps({"trial": "dftopk-n0-s1", "phase": "final",
                                           "sample_num": 0, "status": "ok",
                                           "config_digest": "d0"}) + "\n")
    table = _table(tmp_path, {("dftopk", 200): 0.1, ("softsort", 200): 0.2}, batch=64)
    args = ["study.ops=[dftopk,softsort]", "study.budget_seconds=0", f"study.step_table={table}",
            "study.sample_nums=[160]", "train.data.batch_size=64", f"study.results_dir={res}"]
    study, base = load_study(CONFIGS / "study_quick.yaml", [*args, "study.slowest_steps={160: 4}"])
    plan, _ = compute_planner(study, base)
    assert earlier_ns(study) == [0]
    with pytest.raises(ConfigError, match=r"study.slowest_steps has no entry for sample_num \[0\]"):
        check_earlier(study, base, [0], plan)
    study, base = load_study(CONFIGS / "study_quick.yaml",
                             [*args, "study.slowest_steps={0: 4, 160: 4}"])
    plan, _ = compute_planner(study, base)
    with pytest.raises(ConfigError, match="no step time for dftopk at N=40"):
        check_earlier(study, base, [0], plan)  # the table has N = 200 only
    check_earlier(study, base, [], plan)  # nothing earlier: nothing to check


def test_step_tables_compared_as_ratios_to_dftopk(tmp_path: Path) -> None:
    from raytopk.bench.step_times import compare_tables

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _table(tmp_path / "a", {("dftopk", 200): 0.2, ("softsort", 200): 0.4, ("bce", 40): 0.1})
    b = _table(tmp_path / "b", {("dftopk", 200): 0.4, ("softsort", 200): 0.6})
    md = compare_tables([str(a), str(b)])
    assert "| 200 | softsort | 2.00 | 1.50 | 1.33 |" in md  # twice, then 1.5x DFTopK's step
    assert "| 40 | bce | - | - |  |" in md  # no DFTopK row at N = 40: no ratio
    assert f"[2] {b}" in md


def _study_dir(tmp_path: Path, name: str, sample_num: int, rows: list[dict],
               table: dict[tuple[str, int], float]) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "study.yaml").write_text(
        f"study: {{slowest_steps: {{{sample_num}: 4}}, compute_cuts: [1.0], "
        "reference_op: dftopk}\ntrain: {model: {stages: [dssm, din]}}\n")
    for i, r in enumerate(rows):
        r["trial"], r["sample_num"] = f"t{i}", sample_num
    (d / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.csv").write_text("trial\n" + "".join(f"t{i}\n" for i in range(len(rows))))
    _table(d, table).rename(d / "step_table.json")
    return d


def test_claims_per_n_from_equal_steps_and_equal_compute(tmp_path: Path) -> None:
    from raytopk.tune.claims import claims_rows, read_studies, verdict_a

    # N = 200: softsort costs 2x dftopk's step, so dftopk trains 8 steps to softsort's 4 (S_N).
    # Equal steps (4): softsort ahead by 0.10; equal compute: dftopk ahead by 0.10 -> the lead
    # changes by +0.20 (its own gain 4 -> 8 steps: +0.20). lapsum: same cost, level throughout.
    rows = []
    for seed, bump in ((1, 0.0), (2, 0.02), (3, 0.01)):
        rows.append(_final_row("dftopk", seed, [(2, .1, .20 + bump), (4, .2, .30 + bump),
                                                (8, .3, .50 + bump)]))  # fmt: skip
        rows.append(_final_row("softsort", seed, [(2, .1, .25 + bump), (4, .2, .40 + bump)]))
        rows.append(_final_row("lapsum", seed, [(4, .2, .30 + bump + .01 * (seed - 2)),
                                                (8, .3, .50 + bump - .01 * (seed - 2))]))
    rows.append({"op": "diffsort", "seed": 1, "phase": "final",
                 "status": "does not fit: a training step needs ~9.0 GiB"})
    d200 = _study_dir(tmp_path, "n200", 160, rows, {("dftopk", 200): 0.1, ("softsort", 200): 0.2,
                                                   ("lapsum", 200): 0.1})  # fmt: skip
    studies = read_studies([d200])
    assert studies[0].selected is None  # no selection.json: the horizon reads the whole log
    (d200 / "selection.json").write_text(json.dumps(
        {"trials": [{"trial": "a", "config_digest": "d1"}, {"trial": "b"}]}))
    assert read_studies([d200])[0].selected == {"d1"}
    (d200 / "selection.json").write_text(json.dumps({"chosen": {}}))
    with pytest.raises(ValueError, match=r"n200/selection.json' is not a study's selection"):
        read_studies([d200])
    (d200 / "selection.json").unlink()
    repeat = load_step_table(_table(tmp_path, {("dftopk", 200): 0.1, ("softsort", 200): 0.15,
                                               ("lapsum", 200): 0.09}))  # fmt: skip
    c = claims_rows(studies, [repeat])
    (e,) = c["per_n"]
    assert e["N"] == 200 and e["steps"] == {"dftopk": 8, "softsort": 4, "lapsum": 8}
    assert e["budget_s"] == pytest.approx(0.8)
    assert e["not_run"] == {"diffsort": "does not fit: a training step needs ~9.0 GiB"}
    assert e["a"]["steps"]["verdict"] == "not best (measurably behind softsort)"
    assert e["a"]["compute"]["verdict"] == (
        "tied for best: none measurably ahead (level with lapsum)")
    assert e["a"]["compute"]["diffs"]["softsort"]["mean"] == pytest.approx(-0.10)
    soft, lap = e["methods"]["softsort"], e["methods"]["lapsum"]
    assert soft["b"] == {"sample_ratio": 2.0, "step_time_ratio": 2.0, "other_tables": [1.5],
                         "tables_without_row": 0, "range": [1.5, 2.0], "more": True}
    assert lap["b"]["more"] is False  # 1.0 here, 0.9 in the repeat
    # (c), on the validation curves: at softsort's 4 steps dftopk is level (0.2 each); its
    # extra 4 steps add 0.1. lapsum trains as many steps as dftopk: nothing to test.
    assert soft["c"]["applies"] and soft["c"]["lead_equal_samples"]["mean"] == pytest.approx(0)
    assert soft["c"]["gain"]["mean"] == pytest.approx(0.10)
    assert soft["c"]["lead_equal_compute"]["mean"] == pytest.approx(0.10)
    assert e["reference_gain"]["mean"] == pytest.approx(0.20)  # test day, 4 -> 8 steps
    assert lap["c"] == {"applies": False, "why": "dftopk trains no more steps than lapsum at T_N"}

    assert verdict_a({"a": {"mean": -.1, "low": -.2, "high": -.05, "seeds": 3}}) == "best alone"
    assert verdict_a({"a": {"mean": -.1, "low": -.1, "high": -.1, "seeds": 1}}).startswith(
        "undecided")

    # Two studies side by side; the same N twice and a directory that is not a study are named.
    d40 = _study_dir(tmp_path, "n40", 0, [_final_row("dftopk", 1, [(4, .2, .3)])],
                     {("dftopk", 40): 0.1})
    assert [e["N"] for e in claims_rows(read_studies([d200, d40]))["per_n"]] == [40, 200]
    with pytest.raises(ValueError, match="N = 200 is reported by both"):
        read_studies([d200, d200])
    with pytest.raises(ValueError, match=r"has no study.yaml"):
        read_studies([tmp_path])
    # A study still selecting (no results.csv, no step table yet) is reported as in progress,
    # with what it has logged; its N takes no place in the claims.
    running = tmp_path / "n1000"
    running.mkdir()
    (running / "study.yaml").write_text((d200 / "study.yaml").read_text())
    (running / "trials.jsonl").write_text(json.dumps(
        {"op": "dftopk", "sample_num": 960, "phase": "select", "seed": 1,
         "status": "stopped early (ASHA)", "samples_seen": 4}) + "\n")
    (running / "selection.json").write_text("{")  # not read while the study runs
    both = claims_rows(read_studies([d200, running]))
    assert [e["N"] for e in both["per_n"]] == [200]
    assert both["in_progress"] == [{"source": str(running), "logged": {"N = 1000, select": 1}}]
    from raytopk.tune.claims import claims_markdown

    assert f"In progress, no final trials reported yet: {running}" in claims_markdown(both)
    (running / "results.csv").write_text("trial\n")  # reports written: the table must be there
    with pytest.raises(ValueError, match=r"n1000' has no step_table.json"):
        read_studies([running])
    bad = tmp_path / "bad"
    shutil.copytree(d200, bad)
    (bad / "study.yaml").write_text("study: {slowest_steps: {0: 4}, reference_op: dftopk}\n")
    with pytest.raises(ValueError, match=r"bad/study.yaml.*train.model.stages"):
        read_studies([bad])
    (bad / "study.yaml").write_text((d200 / "study.yaml").read_text().replace("160: 4", "0: 4"))
    with pytest.raises(ValueError, match=r"slowest_steps has no entry for sample_num \[160\]"):
        read_studies([bad])
    (bad / "study.yaml").write_text("study: [\n")
    with pytest.raises(ValueError, match=r"bad/study.yaml' is not YAML"):
        read_studies([bad])
    # No reference trials at an N: (a) says so, (b) and (c) are left out, nothing fails.
    only = claims_rows([replace(studies[0], rows=[r for r in rows if r["op"] != "dftopk"])])
    assert only["per_n"][0]["a"]["compute"]["verdict"] == "no dftopk trials"
    assert "b" not in only["per_n"][0]["methods"]["softsort"]

    # Compute spent, from every row of a log: two full trials timed, one stopped at half.
    from raytopk.tune.claims import compute_spent

    log = [{"op": "dftopk", "phase": "select", "sample_num": 160, "max_samples": 800,
            "samples_seen": 800, "wall_seconds": 360.0, "status": "ok"},
           {"op": "dftopk", "phase": "select", "sample_num": 160, "max_samples": 800,
            "samples_seen": 800, "wall_seconds": 360.0, "status": "ok"},
           {"op": "dftopk", "phase": "select", "sample_num": 160, "samples_seen": 400,
            "status": "stopped early (ASHA)"}]  # fmt: skip
    (spent,) = compute_spent(log)
    assert spent == {"N": 200, "phase": "select", "method": "dftopk", "trials": 3,
                     "full_trials": 2.5, "hours_recorded": 0.2, "hours_estimated": 0.05,
                     "untimed": 1}  # fmt: skip

    # DFTopK's diagnostics: averaged over seeds and stages at the first, middle and last point.
    from raytopk.tune.claims import diagnostics

    diag = []
    for seed in (1, 2):
        r = _final_row("dftopk", seed, [(2, .1, None), (4, .2, None), (8, .3, None)])
        for i, pt in enumerate(r["anytime_curve"]):
            for st in (0, 1):
                pt[f"diag_psum_over_k{st}"] = 3.0 - i + st * 0.2 * seed
                pt[f"diag_boundary_grad_share{st}"] = 0.5
                pt[f"diag_score_std_over_tau{st}"] = 1.0 + i
        r["op_params"] = '{"tau": 0.5}'
        diag.append(r)
    (d,) = diagnostics(diag + [_final_row("softsort", 1, [(2, .1, None)])])
    assert d["N"] == 200 and d["seeds"] == 2 and d["params"] == ['{"tau": 0.5}']
    assert [pt["steps"] for pt in d["points"]] == [2, 4, 8]
    assert d["points"][0] == {"steps": 2, "psum_over_k": 3.15, "boundary_grad_share": 0.5,
                              "score_std_over_tau": 1.0}  # fmt: skip

    # Wall time: the sum of the run log's windows, per sample_nums of the run.
    runs = [{"started": "2026-12-06T01:00:00+00:00", "ended": "2026-12-06T02:30:00+00:00",
             "status": "interrupted", "sample_nums": [160]},
            {"started": "2026-12-06T03:00:00+00:00", "ended": "2026-12-06T03:30:00+00:00",
             "status": "finished", "sample_nums": [160], "source": "backfilled"}]
    (d200 / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    from raytopk.tune.claims import wall_time

    assert wall_time("x", runs) == {"source": "x", "runs": 2, "hours": 2.0,
                                    "hours_by_n": {"200": 2.0}, "overlapping": 0,
                                    "backfilled": 1}  # fmt: skip
    inside = {"started": "2026-12-06T02:00:00+00:00", "ended": "2026-12-06T03:15:00+00:00",
              "sample_nums": [160]}  # overlaps both: only its 30 minutes between them count
    assert wall_time("x", [*runs, inside])["hours"] == 2.5
    assert wall_time("x", [*runs, inside])["overlapping"] == 2
    with pytest.raises(ValueError, match="run log: a row without a valid started/ended"):
        wall_time("x", [{"started": "yesterday", "ended": "today"}])
    with pytest.raises(ValueError, match="ends before it starts"):
        wall_time("x", [{"started": "2026-12-06T02:00:00", "ended": "2026-12-06T01:00:00"}])
    with pytest.raises(ValueError, match="with and without a time zone"):
        wall_time("x", [runs[0], {"started": "2026-12-06T02:00:00",
                                  "ended": "2026-12-06T02:10:00"}])

    spec = importlib.util.spec_from_file_location("study_claims", JOBS / "study_claims.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--results", str(d200), str(d40), "--out", str(tmp_path / "out")]) == 0
    assert f"| {d200} | 2 (1 backfilled from the runs' console logs) | 2 | N = 200: 2 h |" in (
        tmp_path / "out" / "claims.md").read_text()
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "| 200 | softsort | 4 | 2 | 1.5, 2 | 1.5–2 | yes |" not in md  # no repeat table here
    assert "| 200 | softsort | 4 | 2 | – | 2–2 | yes |" in md
    assert "not best (measurably behind softsort)" in md
    assert "Not run at N = 200: diffsort, does not fit" in md
    assert json.loads((tmp_path / "out" / "claims.json").read_text())["per_n"][1]["N"] == 200
    assert job.main(["--results", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_selection_horizon_names_what_a_shorter_selection_would_choose(tmp_path: Path) -> None:
    from raytopk.tune.claims import claims_markdown, selection_horizon

    key = "valid_joint_recall@10@20"

    def sel(tau: float, seed: int, curve: list[tuple[int, float]], status: str = "ok",
            digest: str = "", n: int = 160) -> dict:
        r = _final_row("dftopk", seed, [(s, v, None) for s, v in curve])
        r.update(phase="select", status=status, lr=0.01, param="tau", value=tau, sample_num=n,
                 config_digest=digest or f"{tau}-{seed}-{n}")
        if status == "ok":
            r[key] = curve[-1][1]
        else:
            r.pop("anytime_curve")
        return r

    # Validation points at uneven steps (1, 2, 3, 8), as the studies' cut points make them.
    log = []
    for seed, bump in ((1, 0.0), (2, 0.01)):
        log.append(sel(0.5, seed, [(1, .1), (2, .2), (3, .3), (8, .8 + bump)]))
        log.append(sel(5.0, seed, [(1, .3), (2, .4), (3, .42), (8, .5 + bump)]))
    # tau 50: seed 1 restored with only its end point; it leads early on seed 2 alone, which
    # the every-seed rule does not let win.
    log.append(sel(50.0, 1, [(8, .7)]))
    log.append(sel(50.0, 2, [(1, .9), (2, .9), (3, .9), (8, .7)]))
    # tau 500: ASHA stopped seed 2, so it is not chosen, though seed 1 leads throughout.
    log.append(sel(500.0, 1, [(1, .95), (2, .95), (3, .95), (8, .95)]))
    log.append(sel(500.0, 2, [], status="stopped early (ASHA)"))
    # tau 0.05 on seed 2: a stale row, then its rerun's row under the same digest (which counts).
    log.append(sel(0.05, 1, [(1, .1), (2, .1), (3, .1), (8, .85)]))
    log.append(sel(0.05, 2, [(1, .1), (2, .1), (3, .1), (8, .85)], digest="x"))
    log.append(sel(0.05, 2, [(1, .1), (2, .1), (3, .1), (8, .1)], digest="x"))
    log.append({**sel(0.5, 1, [(8, .99)]), "phase": "final", "config_digest": "f"})
    log.append({**sel(0.5, 1, [(8, .7)]), "op": "lapsum", "config_digest": "l"})  # one setting
    log += [sel(0.5, 1, [(8, .7)], n=0), sel(5.0, 1, [(8, .6)], n=0)]  # N = 40, left out below
    (h,) = selection_horizon(log, "joint_recall@10@20", fractions=(0.25, 0.5, 0.9),
                             base_lr=0.01, sample_nums={160})
    assert h["N"] == 200 and h["method"] == "dftopk" and h["seeds"] == 2
    assert h["settings"] == 4 and h["chosen"] == "tau 0.5, lr 0.01"  # 0.5, 5, 50, 0.05
    assert h["chosen_value"] == pytest.approx(0.805)
    # 0.25 of 8 steps: step 2, tau 5 ahead. 0.5: step 4, interpolated between 3 and 8 (tau 0.5
    # 0.40, tau 5 0.436; the point before, step 3, and the one after, step 8, disagree).
    # 0.9: step 7.2, tau 0.5 ahead: the end's choice.
    assert [(p["fraction"], p["setting"], p["same"]) for p in h["at"]] == [
        (0.25, "tau 5, lr 0.01", False), (0.5, "tau 5, lr 0.01", False),
        (0.9, "tau 0.5, lr 0.01", True)]
    assert [p["behind"] for p in h["at"]] == pytest.approx([0.3, 0.3, 0.0])
    assert len(selection_horizon(log, "joint_recall@10@20")) == 2  # N = 40 too, by default
    # Rows the log holds from another config of the study (tau 15 far ahead at the end): read
    # when no digests are given, left out when given the ones the study chose from.
    other = [sel(15.0, s, [(1, .3), (2, .4), (3, .42), (8, .99)], digest=f"old{s}")
             for s in (1, 2)]
    (o,) = selection_horizon(log + other, "joint_recall@10@20", base_lr=0.01, sample_nums={160})
    assert o["chosen"] == "tau 15, lr 0.01"
    mine = {r["config_digest"] for r in log}
    assert selection_horizon(log + other, "joint_recall@10@20", fractions=(0.25, 0.5, 0.9),
                             base_lr=0.01, sample_nums={160}, digests=mine) == [h]
    # The claims a study writes beside its results read them so too: selection.json's digests
    # and the study's base learning rate, as jobs/study_claims.py does.
    from types import SimpleNamespace

    from raytopk.tune.compute_results import write_compute_reports

    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log + other))
    (tmp_path / "selection.json").write_text(json.dumps(
        {"trials": [{"config_digest": d} for d in sorted(mine)]}))
    finals = [_final_row("dftopk", seed, [(4, .2, .3), (8, .3, .5)]) for seed in (1, 2)]
    study = SimpleNamespace(step_table=str(_table(tmp_path, {("dftopk", 200): 0.1})),
                            slowest_steps={160: 8}, compute_cuts=[1.0], reference_op="dftopk")
    base = SimpleNamespace(model=SimpleNamespace(stages=["dssm", "din"]),
                           optim=SimpleNamespace(lr=0.01))
    write_compute_reports(finals, tmp_path, study, base)
    (written,) = json.loads((tmp_path / "claims.json").read_text())["selection_horizon"]
    assert written["chosen"] == "tau 0.5, lr 0.01" and written["settings"] == 4
    md = claims_markdown({"per_n": [], "selection_horizon": [h]})
    assert ("| 200 | dftopk | 4 | tau 0.5, lr 0.01 (0.8050) | tau 5, lr 0.01 (−0.3000) | "
            "tau 5, lr 0.01 (−0.3000) | same |") in md


def test_study_plan_counts_trials_and_compute_before_running(tmp_path: Path) -> None:
    from raytopk.train.config import ConfigError
    from raytopk.tune.compute import asha_share, plan_markdown, study_plan
    from raytopk.tune.study import load_study

    table = _table(tmp_path, {("dftopk", 200): 0.1, ("softsort", 200): 0.25,
                              ("diffsort", 200): 1.0})  # fmt: skip
    args = ["study.ops=[dftopk,softsort,diffsort]", "study.sample_nums=[160]",
            f"study.step_table={table}", "study.slowest_steps={160: 300}", "study.select=true",
            "study.lrs=[0.003,0.01]", "study.select_seeds=[1,2]", "study.seeds=[1,2,3]",
            "study.grids={dftopk: [0.5, 5], softsort: [1]}", "study.eval_points=8",
            "study.asha_reduction=3", "study.mem_budget_gb=3", "study.budget_seconds=0",
            "train.data.batch_size=128"]
    study, base = load_study(CONFIGS / "study_quick.yaml", args)
    p = study_plan(study, base)
    by = {r["method"]: r for r in p["methods"]}
    # diffsort at N = 200 needs ~4 GiB > 3: not run, and it does not set T_N (softsort does).
    assert not by["diffsort"]["fits"] and "mem_budget_gb" in by["diffsort"]["why"]
    assert by["softsort"]["steps"] == 300 and by["dftopk"]["steps"] == 750
    # dftopk: 0.5, 5 and the paper's 500; softsort: 1 and the paper's 50; x 2 lrs x 2 seeds
    assert by["dftopk"]["selection_trials"] == 3 * 2 * 2
    assert by["softsort"]["selection_trials"] == 2 * 2 * 2
    (e,) = p["per_n"]
    assert e["budget_s"] == pytest.approx(75.0) and e["final_trials"] == 6
    # ASHA, grace 1/8, factor 3: decisions at the first validation points at or after 1/8 and
    # 3/8 of the steps. softsort (300 steps): points at 38 and 112, and 300 x 3/8 = 112.5 falls
    # past 112, so the second decision is at the next point, 150 (a cut point).
    assert by["softsort"]["asha_share"] == pytest.approx(
        38 / 300 + (150 - 38) / 300 / 3 + (300 - 150) / 300 / 9, abs=1e-3)
    assert asha_share([94, 282, 750], 750, 1 / 8, 3) == pytest.approx(
        94 / 750 + 188 / 750 / 3 + 468 / 750 / 9)
    # A point just short of a milestone (281 < 281.25) moves the decision to the next (375).
    assert asha_share([94, 281, 375, 750], 750, 1 / 8, 3) == pytest.approx(
        94 / 750 + 281 / 750 / 3 + 375 / 750 / 9)
    assert asha_share([100, 200], 800, 1 / 8, 3) == pytest.approx(1 / 8 + (1 - 1 / 8) / 3)
    assert e["selection_trials"] == 20
    assert e["selection_full_trials_asha"] == pytest.approx(
        12 * by["dftopk"]["asha_share"] + 8 * by["softsort"]["asha_share"], abs=0.1)
    # The trials a row log already holds are counted apart.
    logged = [{"phase": "select", "op": "dftopk", "sample_num": 160}] * 3
    assert study_plan(study, base, logged)["per_n"][0]["selection_logged"] == 3
    # Where the study would stop, the plan stops too: a method without a row in the table.
    study.ops = ["dftopk", "softsort", "lapsum"]
    with pytest.raises(ConfigError, match=r"no step time for \['lapsum'\] at N=200"):
        study_plan(study, base)
    assert e["compute_hours_finals"] == pytest.approx(6 * 75.0 / 3600, abs=0.01)
    assert "| 200 | diffsort | not run: over study.mem_budget_gb 3" in plan_markdown(p)
    # The aim of a selection no costlier than the finals: met here (~5.8 full trials under
    # ideal ASHA against 6 finals), named where even ideal ASHA misses it (one final seed).
    assert e["selection_over_finals"] is False
    assert "misses the aim" not in plan_markdown(p)
    study, base = load_study(CONFIGS / "study_quick.yaml", [*args, "study.seeds=[1]"])
    (one,) = study_plan(study, base)["per_n"]
    assert one["selection_over_finals"] is True and one["final_full_trials"] == 2
    assert (f"N = 200: the selection's first round alone, under ideal ASHA, trains "
            f"{one['selection_full_trials_asha']:g} full trials against the finals' 2, so it "
            "misses the aim") in plan_markdown(study_plan(study, base))
