"""The study's design, without Ray: selection never sees the test day, grids hold the paper's
value, the choice, ASHA per (op, N) group, the confidence-interval arithmetic against
scipy.stats, and the verdict words in results.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from scipy import stats

from raytopk.ops import get_spec, list_ops
from raytopk.train.config import TrainConfig, from_dict, to_dict
from raytopk.train.driver import dataset_specs
from raytopk.train.prepare import prepare
from raytopk.tune.experiments import ADDED_KEYS, config_digest, final_tag
from raytopk.tune.results import write_reports
from raytopk.tune.selection import (
    GroupedASHA,
    choose,
    choose_joint,
    completions,
    edge_extensions,
    latest_rows,
    logged_rounds,
    param_grid,
    selection_trials,
)
from raytopk.tune.stats import paired_difference, t_interval, time_to_fraction, verdict
from raytopk.tune.study import StudyConfig, _budgeted, load_study, resolve_base, trial_configs

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


# ---- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("xs", [[0.5, 0.7], [0.31, 0.29, 0.35, 0.30, 0.33], [1.0, 2.0, 4.0, 8.0]])
def test_t_interval_matches_scipy(xs: list[float]) -> None:
    ci = t_interval(xs)
    low, high = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / len(xs), scale=stats.sem(xs))
    assert ci.low == pytest.approx(low) and ci.high == pytest.approx(high)
    assert ci.mean == pytest.approx(sum(xs) / len(xs)) and ci.n == len(xs)


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    a = {1: 0.52, 2: 0.55, 3: 0.50, 4: 0.58, 5: 0.54}
    b = {1: 0.50, 2: 0.51, 3: 0.49, 4: 0.55, 5: 0.50, 9: 0.1}  # seed 9 has no pair: left out
    d = paired_difference(a, b)
    ref = stats.ttest_rel([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])
    low, high = ref.confidence_interval(0.95)
    assert d is not None and d.n == 5
    assert d.low == pytest.approx(low) and d.high == pytest.approx(high)
    assert verdict(d) == "better" and d.excludes_zero()
    assert verdict(paired_difference(b, a)) == "worse"
    noisy = paired_difference({1: 0.5, 2: 0.6, 3: 0.4}, {1: 0.55, 2: 0.5, 3: 0.45})
    assert verdict(noisy) == "no difference measured"
    assert verdict(paired_difference({1: 0.9}, {1: 0.1})).startswith("no interval")
    assert paired_difference({1: 0.5}, {2: 0.5}) is None


def test_one_value_and_time_to_fraction() -> None:
    one = t_interval([0.4])
    assert (one.low, one.high, one.n) == (0.4, 0.4, 1) and "no interval" in one.text()
    with pytest.raises(ValueError, match="'values'"):
        t_interval([])
    curve = [(10.0, 0.2), (20.0, 0.45), (30.0, 0.5)]
    assert time_to_fraction(curve, 0.4) == 20.0 and time_to_fraction(curve, 0.6) is None


# ---- grids and the choice ----------------------------------------------------------------------


@pytest.mark.parametrize("op", list_ops())
def test_grid_is_log_spaced_around_the_paper_value(op: str) -> None:
    default = get_spec(op).default
    g = param_grid(op, 5, 3.0)
    assert len(g) == 5 and default in g and g == sorted(g)
    ratios = [b / a for a, b in zip(g, g[1:])]
    assert all(r == pytest.approx(3.0, rel=1e-4) for r in ratios)
    assert default in param_grid(op, 2, 10.0, override=[1.0, 2.0])  # always in an explicit grid
    assert param_grid("bce", 5, 3.0) == []  # a baseline without a parameter: no search


def test_choose_best_valid_recall_ties_to_the_paper_value() -> None:
    key = "valid_joint_recall@10@20"
    rows = [
        {"op": "lapsum", "sample_num": 0, "value": 5.0, "status": "ok", key: 0.40},
        {"op": "lapsum", "sample_num": 0, "value": 15.0, "status": "ok", key: 0.40},
        {"op": "lapsum", "sample_num": 0, "value": 45.0, "status": "stopped early", key: 0.9},
        {"op": "lapsum", "sample_num": 40, "value": 1.67, "status": "ok", key: 0.30},
        {"op": "lapsum", "sample_num": 40, "value": 5.0, "status": "ok", key: 0.20},
    ]
    assert choose(rows, "joint_recall@10@20") == {"lapsum": {0: 5.0, 40: 1.67}}


class _Trial(SimpleNamespace):
    pass


def test_grouped_asha_compares_settings_within_their_group_only() -> None:
    sched = GroupedASHA("valid_m", "train_seconds", max_t=30.0, grace_period=5.0,
                        reduction_factor=3.0)
    assert sched.metric is None  # Tune must not require the metric in every (step) report

    def trial(tid: str, group: str) -> _Trial:
        return _Trial(trial_id=tid, config={"trial": {"group": group, "trial": tid}})

    good = [trial(f"a{i}", "dftopk-n0") for i in range(3)]
    for t in good:
        sched.on_trial_add(None, t)
    for i, t in enumerate(good):
        assert sched.on_trial_result(None, t, {"train_seconds": 5.1, "valid_m": 0.5 + i}) == (
            "CONTINUE"
        )
    # A weak setting of another group is not judged against dftopk's settings.
    other = trial("b0", "lapsum-n0")
    sched.on_trial_add(None, other)
    assert sched.on_trial_result(None, other, {"train_seconds": 5.1, "valid_m": 0.01}) == (
        "CONTINUE"
    )
    weak = trial("a9", "dftopk-n0")
    sched.on_trial_add(None, weak)
    assert sched.on_trial_result(None, weak, {"train_seconds": 5.1, "valid_m": 0.1}) == "STOP"
    assert sched.on_trial_result(None, weak, {"train_seconds": 1.0}) == "CONTINUE"  # no metric
    assert sched.stopped == ["a9"]


# ---- validation-only selection ------------------------------------------------------------------



def test_selection_trials_never_hold_the_test_day(tiny: Path, tmp_path: Path) -> None:
    study, base = load_study(
        CONFIGS / "study_quick.yaml",
        [f"train.data.path={tiny}", "train.data.synthetic.enabled=false",
         f"study.output_dir={tmp_path}", "study.select=true", "study.budget_seconds=5"],
    )
    resolved = resolve_base(study, base, tmp_path)
    days = ["2024-01-13", "2024-01-14", "2024-01-15", "2024-01-16"]
    test_day, valid_day = days[-1], days[-2]
    assert resolved.data.test_day == test_day and resolved.run.valid_day == valid_day
    assert resolved.data.train_days == days[:2]  # the validation day is never trained on
    ops = ["dftopk", "softsort"]
    grid = {op: param_grid(op, 3, 3.0) for op in ops}
    sel = selection_trials(ops, study.sample_nums, 42, grid, _budgeted(study, resolved), tmp_path)
    assert len(sel) == len(ops) * len(study.sample_nums) * 3
    for t in sel:
        assert test_day not in json.dumps(t)  # not in any key of the trial's config
        cfg = prepare(from_dict(t["train"]))
        specs = dataset_specs(cfg)
        assert {d for s in specs.values() for d in s.days} == {*days[:2], valid_day}
        assert cfg.cfg.run.eval_points == study.eval_points and not cfg.cfg.run.test_eval
    final = trial_configs(study, resolved, {"dftopk": {0: 1500.0}})
    by = {t["trial"]: from_dict(t["train"]) for t in final}
    d0 = by["dftopk-n0-tau1500-s42"]  # the value is in the name: a new value, a new trial dir
    assert d0.op.params == {"tau": 1500.0} and d0.data.test_day == test_day
    assert d0.run.valid_day == valid_day and d0.run.eval_points == study.eval_points
    specs = dataset_specs(prepare(d0))
    assert specs["test"].days == (test_day,) and specs["valid"].days == (valid_day,)
    # Paired seeds: every op's trial at one seed has the same data settings and seed.
    a, b = to_dict(by["dftopk-n0-tau1500-s42"]), to_dict(by["softsort-n0-tau50-s42"])
    assert a["data"] == b["data"] and a["run"]["seed"] == b["run"]["seed"]


def test_edge_extensions_bracket_the_best_value() -> None:
    def row(op, n, v, status="ok"):
        return {"op": op, "sample_num": n, "value": v, "status": status}

    rows = [row("dftopk", 0, v) for v in (5.0, 500.0, 50000.0)]
    rows += [row("dftopk", 40, v) for v in (5.0, 500.0)] + [row("dftopk", 40, 50000.0, "stopped")]
    rows += [row("lapsum", 0, v) for v in (0.05, 5.0, 500.0)]
    rows += [row("neuralsort", 0, 50.0)]
    chosen = {"dftopk": {0: 5.0, 40: 50000.0}, "lapsum": {0: 5.0}, "neuralsort": {0: 50.0}}
    got = edge_extensions(rows, chosen, 100.0)
    # low edge -> one step lower; an ASHA-stopped value still counts as tried (its edge too);
    # an inside value -> nothing; a grid of one value -> both ways
    assert got == [("dftopk", 0, 0.05), ("dftopk", 40, 5e6), ("neuralsort", 0, 0.5),
                   ("neuralsort", 0, 5000.0)]
    rows += [row("dftopk", 0, 0.05)]
    assert ("dftopk", 0, 0.0005) in edge_extensions(rows, {"dftopk": {0: 0.05}}, 100.0)
    assert edge_extensions(rows, {"dftopk": {0: 5.0}}, 100.0) == []  # now inside
    # A half-decade grid (ratios 3 and 3.33 at factor 3) is inside; a best value whose next
    # value tried is far off (the paper's 500 beside a grid ending at 5) is an edge on that side.
    grid = [row("dftopk", 0, v) for v in (0.05, 0.15, 0.5, 1.5, 5.0, 500.0)]
    assert edge_extensions(grid, {"dftopk": {0: 1.5}}, 3.0) == []
    assert edge_extensions(grid, {"dftopk": {0: 5.0}}, 3.0) == [("dftopk", 0, 15.0)]
    grid += [row("dftopk", 0, 15.0)]
    assert edge_extensions(grid, {"dftopk": {0: 15.0}}, 3.0) == [("dftopk", 0, 45.0)]


def test_trial_identity_is_what_it_trains(tmp_path: Path) -> None:
    study, base = load_study(CONFIGS / "study_quick.yaml",
                             [f"study.output_dir={tmp_path}", "study.seeds=[1]"])
    a = {t["trial"]: t for t in trial_configs(study, base, {"dftopk": {0: 5.0}})}
    b = {t["trial"]: t for t in trial_configs(study, base, {"dftopk": {0: 0.05}})}
    assert "dftopk-n0-tau5-s1" in a and "dftopk-n0-tau0.05-s1" in b
    same = [n for n in a if n in b]
    assert "lapsum-n0-alpha5-s1" in same and "bce-n0-s1" in same
    for n in same:  # unchanged trials: the same digest -> not run again
        assert config_digest(a[n]["train"]) == config_digest(b[n]["train"])
    da, db = config_digest(a["dftopk-n0-tau5-s1"]["train"]), config_digest(
        b["dftopk-n0-tau0.05-s1"]["train"])
    assert da != db
    moved = json.loads(json.dumps(a["lapsum-n0-alpha5-s1"]["train"]))
    moved["run"]["output_dir"], moved["run"]["name"] = "/elsewhere", "renamed"
    moved["data"]["path"], moved["data"]["synthetic"]["root"] = "/mnt/x", "/mnt/x"  # a clone
    assert config_digest(moved) == config_digest(a["lapsum-n0-alpha5-s1"]["train"])
    other = json.loads(json.dumps(moved))
    other["data"]["synthetic"]["requests_per_day"] += 1  # other data: another trial
    assert config_digest(other) != config_digest(moved)
    moved["optim"]["lr"] = 0.5
    assert config_digest(moved) != config_digest(a["lapsum-n0-alpha5-s1"]["train"])
    assert final_tag(list(a.values())) != final_tag(list(b.values()))
    # A config key added after rows were logged keeps their digest at its default (the rows'
    # configs never had it), and makes another trial at any other value.
    before = json.loads(json.dumps(a["lapsum-n0-alpha5-s1"]["train"]))
    for (section, key), default in ADDED_KEYS.items():
        assert before[section].pop(key) == default
    assert config_digest(before) == config_digest(a["lapsum-n0-alpha5-s1"]["train"])
    threads = json.loads(json.dumps(a["lapsum-n0-alpha5-s1"]["train"]))
    threads["run"]["eval_threads"] = 2
    assert config_digest(threads) != config_digest(before)


def test_study_rejects_bad_design_keys() -> None:
    from raytopk.train.config import ConfigError

    path = CONFIGS / "study_quick.yaml"
    with pytest.raises(ConfigError, match="distinct seeds"):
        load_study(path, ["study.seeds=[1,1]"])
    with pytest.raises(ConfigError, match="trial_backend"):
        load_study(path, ["study.trial_backend=slurm"])
    with pytest.raises(ConfigError, match="eval_points"):
        load_study(path, ["study.select=true", "study.eval_points=0"])
    with pytest.raises(ConfigError, match="grid_extend"):
        load_study(path, ["study.grid_extend=-1"])
    assert StudyConfig().reference_op == "dftopk"


def test_results_md_words_only_where_the_interval_excludes_zero(tmp_path: Path) -> None:
    head = "joint_recall@10@20"

    def row(op: str, seed: int, joint: float) -> dict:
        curve = [{"point": i, "train_seconds": 10.0 * i, "samples_seen": 100 * i,
                  "valid_" + head: joint * i / 3} for i in (1, 2, 3)]
        return {"trial": f"{op}-n0-s{seed}", "op": op, "sample_num": 0, "seed": seed,
                "status": "ok", "samples_seen": 300, "train_seconds": 30.0,
                "steady_samples_per_s": 10.0 + seed, head: joint, "anytime_curve": curve,
                "wall_seconds": 40.0, "eval_seconds": 3.0, "overhead_seconds": 7.0}

    rows = [row("dftopk", s, 0.50 + 0.01 * s) for s in (1, 2, 3)]
    rows += [row("lapsum", s, 0.40 + 0.01 * s) for s in (1, 2, 3)]  # always 0.10 below
    rows += [row("softsort", s, v) for s, v in zip((1, 2, 3), (0.60, 0.45, 0.52))]  # noisy
    rows.append({"trial": "diffsort-n0-s1", "op": "diffsort", "sample_num": 0, "seed": 1,
                 "status": "does not fit: a training step needs ~9.0 GiB"})
    paths = write_reports(rows, tmp_path)
    md = paths["md"].read_text()
    line = {op: next(x for x in md.splitlines() if x.startswith(f"| {op} |"))
            for op in ("dftopk", "lapsum", "softsort")}
    assert "| worse |" in line["lapsum"] and "-0.1000 ± 0.0000" in line["lapsum"]
    assert "no difference measured" in line["softsort"]
    assert "better" not in md.replace("'better'", "")
    assert "(reference)" in line["dftopk"]
    assert "| diffsort (seed 1) | does not fit: a training step needs ~9.0 GiB |" in md
    # Anytime: dftopk reaches 90% of the best final validation recall (0.52) at its last point.
    tt = next(x for x in md.splitlines() if x.startswith("| 0 | dftopk |"))
    assert tt.split("|")[3].strip() == "30.0"
    assert paths["anytime_png"].is_file() and paths["anytime_csv"].read_text().count("\n") == 28
    assert math.isclose(float(md.split("overhead ")[1].split(" s")[0]), 7.0)


def test_grouped_asha_judges_each_seed_against_its_own_runs() -> None:
    sched = GroupedASHA("valid_m", "samples_seen", max_t={"dftopk-n0": 80.0},
                        grace_period={"dftopk-n0": 10.0}, reduction_factor=3.0)  # fmt: skip

    def trial(tid: str, seed: int) -> _Trial:
        return _Trial(trial_id=tid, config={"trial": {"group": "dftopk-n0", "trial": tid,
                                                      "seed": seed}})  # fmt: skip

    a1 = trial("a1", 1)
    sched.on_trial_add(None, a1)
    assert sched.on_trial_result(None, a1, {"samples_seen": 10, "valid_m": 0.9}) == "CONTINUE"
    # Seed 2's data is harder: its first run is not judged against seed 1's 0.9.
    b2 = trial("b2", 2)
    sched.on_trial_add(None, b2)
    assert sched.on_trial_result(None, b2, {"samples_seen": 10, "valid_m": 0.5}) == "CONTINUE"
    c2 = trial("c2", 2)
    sched.on_trial_add(None, c2)
    assert sched.on_trial_result(None, c2, {"samples_seen": 10, "valid_m": 0.4}) == "STOP"
    assert sched.stopped == ["c2"]


def test_grouped_asha_replay_decides_as_an_uninterrupted_run() -> None:
    # A study interrupted mid-selection resumes from its row log: the trials left must be judged
    # against the logged ones as they would have been without the interruption.
    import random

    rng = random.Random(0)
    points = [12.0, 36.0, 60.0, 96.0]  # the validation points (clock values) of every trial
    runs = {f"t{i}": [rng.random() for _ in points] for i in range(12)}  # value per point

    def sched() -> GroupedASHA:
        return GroupedASHA("valid_m", "samples_seen", max_t={"dftopk-n0": 96.0},
                           grace_period={"dftopk-n0": 12.0}, reduction_factor=3.0)

    def play(s: GroupedASHA, name: str) -> tuple[str, list[list[float]]]:
        t = _Trial(trial_id=name, config={"trial": {"group": "dftopk-n0", "seed": 1}})
        s.on_trial_add(None, t)
        seen = []
        for x, v in zip(points, runs[name]):
            seen.append([x, v])
            if s.on_trial_result(None, t, {"samples_seen": x, "valid_m": v}) == "STOP":
                return "STOP", seen
        s.on_trial_complete(None, t, {"samples_seen": points[-1], "valid_m": runs[name][-1]})
        return "DONE", seen

    whole = sched()
    expected = {name: play(whole, name)[0] for name in runs}
    assert "STOP" in expected.values() and "DONE" in expected.values()

    first = sched()
    logged = []
    for name in list(runs)[:6]:  # the run is interrupted after six trials ...
        decision, seen = play(first, name)
        logged.append({"phase": "select", "op": "dftopk", "sample_num": 0, "seed": 1,
                       "asha_points": seen})
    resumed = sched()
    assert resumed.replay(logged, "samples_seen") == sum(len(r["asha_points"]) for r in logged)
    # ... and the six left decide as they did in the uninterrupted run; without the replay the
    # first of them would face empty rungs and could not be stopped at all.
    left = list(runs)[6:]
    assert "STOP" in [expected[n] for n in left]
    assert {n: play(resumed, n)[0] for n in left} == {n: expected[n] for n in left}
    fresh = sched()
    assert play(fresh, "t6")[0] == "DONE"


def test_completions_finish_a_setting_asha_cut_short_on_one_seed() -> None:
    # ASHA judges each seed's settings apart: it stopped tau 0.5 on seed 1 at 34,048 samples
    # while seed 2 took it to the best score of all. The choice prefers settings every seed
    # completed, so without a completion one early judgement would decide.
    key = "valid_joint_recall@10@20"

    def row(v: float, lr: float, seed: int, status: str, score: float, seen: int = 90752
            ) -> dict:  # fmt: skip
        return {"op": "dftopk", "sample_num": 160, "value": v, "lr": lr, "seed": seed,
                "status": status, key: score, "samples_seen": seen,
                "config_digest": f"{v}-{lr}-{seed}"}

    stop = "stopped early (ASHA) at samples_seen=34048"
    rows = [
        row(0.0167, 0.003, 1, "ok", 0.585), row(0.0167, 0.003, 2, "ok", 0.590),
        row(0.5, 0.01, 1, stop, 0.556, 34048), row(0.5, 0.01, 2, "ok", 0.597),
        row(0.15, 0.003, 1, stop, 0.557, 34048), row(0.15, 0.003, 2, "ok", 0.584),  # below
        row(5.0, 0.01, 1, stop, 0.30, 11392), row(5.0, 0.01, 2, stop, 0.32, 11392),
        row(500.0, 0.01, 1, "does not fit: ~9 GiB", 0.0), row(500.0, 0.01, 2, "ok", 0.9),
    ]
    head = "joint_recall@10@20"
    assert completions(rows, head, "samples_seen") == [("dftopk", 160, 0.5, 0.01, 1, 34048.0)]
    assert choose_joint(rows, head)[("dftopk", 160)]["value"] == 0.0167  # before: the full one
    done = rows + [row(0.5, 0.01, 1, "ok", 0.594)]  # the completion's row, logged after
    assert completions(done, head, "samples_seen") == []  # an ok row wins over ASHA's stop
    latest = latest_rows(done)
    assert len(latest) == len(rows) and latest[-1]["status"] == "ok"
    assert stop not in [r["status"] for r in latest if r["config_digest"] == "0.5-0.01-1"]
    assert choose_joint(latest, head)[("dftopk", 160)] == {
        "value": 0.5, "lr": 0.01, "score": 0.5955, "seeds": 2}
    # Both functions see one row per seed of a setting, whatever the order: the ok row.
    assert choose_joint(done[::-1], head) == choose_joint(latest, head)
    assert completions(done[::-1], head, "samples_seen") == []
    # With no setting every seed completed, the best one is completed ...
    partial = [r for r in rows if r["value"] not in (0.0167, 500.0)]
    assert completions(partial, head, "samples_seen") == [("dftopk", 160, 0.5, 0.01, 1, 34048.0)]
    # ... and nothing when the best one's other seed failed (a re-run runs it again) rather
    # than ASHA stopping it: no cascade down to weaker settings.
    failed = [r if r["config_digest"] != "0.5-0.01-1" else {**r, "status": "failed: oom"}
              for r in partial]
    assert completions(failed, head, "samples_seen") == []


def test_logged_rounds_carry_over_a_restart() -> None:
    rows = [
        {"sample_num": 0, "round": 0}, {"sample_num": 0, "round": None},
        {"sample_num": 0, "round": 1}, {"sample_num": 0, "round": 2},
        {"sample_num": 0, "round": 3, "completes": 4096.0},  # a completion: not an extension
        {"sample_num": 160, "round": 1}, {"sample_num": 160, "round": 1},
    ]
    assert logged_rounds(rows, {0, 160, 960}) == (3, {0: 2, 160: 1, 960: 0})
    assert logged_rounds([], {0}) == (0, {0: 0})


def test_a_completion_runs_again_and_replays_only_what_asha_saw() -> None:
    from raytopk.tune.experiments import split_logged

    base = to_dict(TrainConfig())
    stopped = {"status": "stopped early (ASHA) at samples_seen=36", "config_digest":
               config_digest(base)}
    again = {"trial": "a", "train": base, "completes": 36.0}
    assert split_logged([again], {stopped["config_digest"]: stopped}) == ([], [again])
    plain = {"trial": "a", "train": base}  # an ordinary re-run keeps ASHA's stop
    assert split_logged([plain], {stopped["config_digest"]: stopped}) == ([stopped], [])
    ok = {**stopped, "status": "ok"}
    assert split_logged([again], {ok["config_digest"]: ok}) == ([ok], [])

    sched = GroupedASHA("valid_m", "samples_seen", max_t={"dftopk-n0": 96.0},
                        grace_period={"dftopk-n0": 12.0}, reduction_factor=3.0)  # fmt: skip
    curve = [{"samples_seen": x, "valid_m": 0.5} for x in (12.0, 36.0, 60.0, 96.0)]
    done = {"phase": "select", "op": "dftopk", "sample_num": 0, "seed": 1,
            "anytime_curve": curve, "completes": 36.0}
    assert sched.replay([done], "samples_seen") == 2  # the rungs it had passed when stopped


def test_logged_selection_gives_every_logged_trial_this_config_would_run(
    tiny: Path, tmp_path: Path
) -> None:
    # A restarted selection chooses from everything the row log holds for its N (an earlier
    # run's extension rounds too), not only from the rounds it proposes again.
    from raytopk.tune.experiments import _append_row, row_log
    from raytopk.tune.selection import logged_selection

    study, base = load_study(
        CONFIGS / "study_quick.yaml",
        [f"train.data.path={tiny}", "train.data.synthetic.enabled=false",
         f"study.output_dir={tmp_path}", "study.select=true", "study.budget_seconds=5",
         "study.sample_nums=[0]"],
    )
    budgeted = _budgeted(study, resolve_base(study, base, tmp_path))
    key = "valid_joint_recall@10@20"
    sel = selection_trials(["dftopk"], [0, 40], [1], {"dftopk": [5.0, 15.0]}, budgeted, tmp_path)
    for i, t in enumerate(sel):
        _append_row(row_log(study), {**{k: t[k] for k in ("trial", "phase", "op", "sample_num",
                                                          "seed", "value", "lr")},
                                     "status": "ok", key: 0.1 * i,
                                     "config_digest": config_digest(t["train"])})
    other = {**sel[0], "status": "ok", key: 0.9, "config_digest": "another-config"}
    _append_row(row_log(study), {k: v for k, v in other.items() if k != "train"})
    now = logged_selection(study, budgeted, ["dftopk"], [1], tmp_path, None, {0})
    assert sorted((r["sample_num"], r["value"]) for r in now) == [(0, 5.0), (0, 15.0)]
    earlier = logged_selection(study, budgeted, ["dftopk"], [1], tmp_path)  # the other N
    assert sorted((r["sample_num"], r["value"]) for r in earlier) == [(40, 5.0), (40, 15.0)]
    assert max(r[key] for r in now + earlier) < 0.9  # another config's row is not chosen from
