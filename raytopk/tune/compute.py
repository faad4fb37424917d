"""Compute matched from measured step times: how many steps each method gets in the study.

Notation: t(m, N) = seconds per training step of method m at N candidates, from a step-time table
(jobs/bench_step.py's step_times.json: interleaved rounds on one machine, batch B); S_N = the
steps the slowest method of the study gets at N (``study.slowest_steps``); T_N = S_N · max_m
t(m, N), the compute budget per trial at N; steps(m, N) = ⌊T_N / t(m, N)⌋ ≥ S_N.

Cut points (``study.compute_cuts``, fractions f, e.g. ¼, ½, 1): the test day is evaluated at
- equal compute: step ⌊f · steps(m, N)⌋ of method m (the compute f · T_N on the table's device);
- equal steps: step ⌊f · S_N⌋ (every method trains at least S_N steps).
Quality per step does not depend on the device, so another device's table gives that device's
equal-compute comparison from the same runs (``recut``: by the validation-day curve, interpolated
between anytime points, since the test day was evaluated only at this table's cut points).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.losses.forms import step_fits
from raytopk.train.config import ConfigError, TrainConfig

__all__ = [
    "StepTable",
    "TrialPlan",
    "check_streaming",
    "compute_planner",
    "load_step_table",
    "asha_share",
    "plan_markdown",
    "study_plan",
    "trial_plan",
]


@dataclass(frozen=True)
class StepTable:
    """Seconds per step by (method, N), the batch size it was measured at, and its machine."""

    seconds: dict[tuple[str, int], float]
    batch_size: int
    machine: str
    path: str

    def t(self, method: str, n: int) -> float:
        """t(method, n); KeyError naming the table and what it holds when the row is missing."""
        try:
            return self.seconds[(method, n)]
        except KeyError:
            have = sorted({f"{m}@N={k}" for m, k in self.seconds})
            raise KeyError(
                f"step table {self.path!r} has no row for {method} at N={n}; it holds {have} "
                "(run jobs/bench_step.py --parts table with that method and N)"
            ) from None

    def budget(self, methods: list[str], n: int, slowest_steps: int) -> float:
        """T_N in seconds: the slowest of ``methods`` at ``n`` gets ``slowest_steps`` steps."""
        return slowest_steps * max(self.t(m, n) for m in methods)

    def steps(self, method: str, n: int, budget_s: float) -> int:
        """⌊T_N / t(method, n)⌋ (a small epsilon so the slowest gets exactly its S_N)."""
        return int(math.floor(budget_s / self.t(method, n) + 1e-9))


def load_step_table(path: str | Path) -> StepTable:
    """A step_times.json written by jobs/bench_step.py; ValueError naming the file and field."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"study.step_table: {str(p)!r} does not exist (jobs/bench_step.py)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"step table {str(p)!r} is not JSON: {e}") from e
    for key in ("rows", "batch_size"):
        if key not in doc:
            raise ValueError(f"step table {str(p)!r} has no {key!r} field")
    seconds = {}
    for i, r in enumerate(doc["rows"]):
        try:
            m, n, s = str(r["method"]), int(r["N"]), float(r["median_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"step table {str(p)!r}: rows[{i}] lacks method/N/median_s") from e
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"step table {str(p)!r}: rows[{i}] median_s={s} is not > 0")
        seconds[(m, n)] = s
    machine = doc.get("machine", {})
    desc = f"{machine.get('device_name', '?')}, {machine.get('cpu_cores', '?')} cores"
    return StepTable(seconds, int(doc["batch_size"]), desc, str(p))


@dataclass(frozen=True)
class TrialPlan:
    """One method's trial at one N: its steps, anytime points and test points (in steps)."""

    steps: int
    budget_s: float  # T_N
    slowest_steps: int  # S_N
    eval_steps: list[int]  # anytime points, ascending, the last = steps
    compute_cuts: list[int]  # ⌊f · steps⌋
    step_cuts: list[int]  # ⌊f · S_N⌋

    @property
    def test_steps(self) -> list[int]:
        return sorted(set(self.compute_cuts) | set(self.step_cuts))

    def as_samples(self, batch: int) -> dict[str, Any]:
        """run.max_samples / eval_at_samples / test_at_samples for global batch ``batch``."""
        return {
            "max_samples": self.steps * batch,
            "eval_at_samples": [s * batch for s in self.eval_steps if s < self.steps],
            "test_at_samples": [s * batch for s in self.test_steps],
        }


def trial_plan(
    table: StepTable,
    methods: list[str],
    method: str,
    n: int,
    slowest_steps: int,
    cuts: list[float],
    eval_points: int,
) -> TrialPlan:
    """``method``'s plan at ``n`` in a study of ``methods``: its steps in T_N, ``eval_points``
    evenly spaced anytime points, and every cut point added to them."""
    budget = table.budget(methods, n, slowest_steps)
    steps = table.steps(method, n, budget)
    compute = sorted({max(1, int(f * steps + 1e-9)) for f in cuts})
    by_steps = sorted({max(1, int(f * slowest_steps + 1e-9)) for f in cuts})
    even = {max(1, round(steps * i / eval_points)) for i in range(1, eval_points + 1)}
    points = sorted(even | set(compute) | set(by_steps) | {steps})
    return TrialPlan(steps, budget, slowest_steps, points, compute, by_steps)


def _study_table(study: Any, base: TrainConfig) -> StepTable:
    """study.step_table, refused (ConfigError) when measured at another batch size."""
    table = load_step_table(study.step_table)
    if table.batch_size != base.data.batch_size:
        raise ConfigError(
            f"study.step_table {study.step_table!r} was measured at batch {table.batch_size}, "
            f"the study trains at data.batch_size {base.data.batch_size}: measure it at that batch"
        )
    return table


def _no_row(study: Any, what: Any, n: int) -> ConfigError:
    """The error for a method (or methods) the study runs without a step time at N = ``n``."""
    return ConfigError(
        f"study.step_table {study.step_table!r} has no step time for {what} at N={n}: "
        "measure it (jobs/bench_step.py --parts table --append) or leave the method out"
    )


def compute_planner(study: Any, base: TrainConfig
                    ) -> tuple[Callable[[TrainConfig, str, int], None], dict[str, float]] | None:
    """With study.step_table: (plan, ASHA clock end per "op-nN" group). ``plan(cfg, op, n)``
    sets a trial's compute-matched budget in place: run.max_samples = steps(op, N) x the global
    batch, the anytime points (study.eval_points evenly, plus the cut points) and, when the
    trial evaluates the test day, the test points; DFTopK trials record their diagnostics."""
    if not study.step_table:
        return None
    table = _study_table(study, base)
    from raytopk.losses import list_methods

    ops = list(study.ops) if study.ops else list_methods()  # the study's methods
    batch = base.data.batch_size * study.workers_per_trial

    def fits(op: str, n: int) -> bool:
        stages = len(base.model.stages)
        return step_fits(op, base.data.batch_size, n, stages, study.mem_budget_gb)

    def plan_of(op: str, sample_num: int) -> Any:
        n = schema.N_OWN + sample_num
        fitting = [m for m in ops if fits(m, n) and (m, n) in table.seconds]
        return trial_plan(table, fitting or [op], op, n, study.slowest_steps[sample_num],
                          study.compute_cuts, study.eval_points)

    def plan(cfg: TrainConfig, op: str, sample_num: int) -> None:
        n = schema.N_OWN + sample_num
        if not fits(op, n):
            cfg.run.max_train_seconds, cfg.run.max_samples = 0.0, batch  # never trained: the
            cfg.run.eval_at_samples, cfg.run.test_at_samples = [], []  # trial records that it
            return  # does not fit (_trial_fn)
        if (op, n) not in table.seconds:
            raise _no_row(study, op, n)
        p = plan_of(op, sample_num).as_samples(batch)
        cfg.run.max_train_seconds = 0.0
        cfg.run.max_samples = p["max_samples"]
        cfg.run.eval_at_samples = p["eval_at_samples"]
        cfg.run.test_at_samples = p["test_at_samples"] if cfg.run.test_eval else []
        cfg.run.diagnostics = bool(study.diagnostics and op == "dftopk")

    groups = {}
    for op in ops:
        n_ok = [n for n in study.sample_nums if (op, schema.N_OWN + n) in table.seconds]
        for n in n_ok:
            groups[f"{op}-n{n}"] = float(plan_of(op, n).steps * batch)
    return plan, groups


def check_streaming(trials: list[dict[str, Any]], base: TrainConfig) -> None:
    """Compute-matched trials train one pass at most: the training days must hold every
    trial's requests (no request seen twice, the paper's streaming regime)."""
    from raytopk.data.convert import read_meta

    per_day = dict(read_meta(base.data.path).get("counts", {}).get("requests_per_day", {}))
    have = sum(int(per_day.get(d, 0)) for d in base.data.train_days)
    need = max((int(t["train"]["run"]["max_samples"]) for t in trials), default=0)
    if need > have:
        worst = max(trials, key=lambda t: int(t["train"]["run"]["max_samples"]))
        raise ConfigError(
            f"trial {worst['trial']} trains {need:,} requests but the training days "
            f"{base.data.train_days[0]}..{base.data.train_days[-1]} hold {have:,}: it would see "
            "requests twice. Generate more (train.data.synthetic.days / requests_per_day) or "
            "lower study.slowest_steps"
        )


def asha_share(eval_steps: list[int], steps: int, grace: float, r: float) -> float:
    """The expected share of a full trial that one selection trial trains under ASHA when each
    decision keeps the best 1/r: ASHA's milestones sit at grace·r^i of the trial's steps
    (below the end), and it decides at the first validation point at or after one (``eval_steps``,
    the trial's anytime points), so decision points can fall later than the milestones."""
    points = sorted({min([e for e in eval_steps if e >= grace * r**i * steps] or [steps])
                     for i in range(64) if grace * r**i < 1.0})
    points = [x for x in points if x < steps] + [steps]
    share, before = 0.0, 0
    for j, x in enumerate(points):
        share += (x - before) / steps / r**j
        before = x
    return share


def study_plan(study: Any, base: TrainConfig, logged: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    """What a compute-matched study will run, before it runs (``jobs/study.py --plan``): per
    (method, N) whether a step fits study.mem_budget_gb, t(m, N), steps(m, N), the requests it
    trains and T_N; the number of first-round selection trials (parameter values x learning
    rates x selection seeds, as raytopk.tune.selection.selection_trials makes them) and final
    trials, and of those the row log ``logged`` already holds (by phase, method and N); and
    their compute on the table's device in full-trial equivalents: the finals exactly, the
    selection's first round with every trial run to the end (the upper bound) and under ideal
    ASHA (:func:`asha_share`, at the trial's own validation points). Not counted: the
    edge-extension rounds (each up to 4 settings x the selection seeds per method and N, run to
    the end), the completion rounds (selection seeds ASHA stopped, run again to the end) and
    asynchronous ASHA's extra promotions while its rungs fill. ConfigError where
    the study itself would stop (a step table of another batch, a method without a row)."""
    from raytopk.losses import list_methods
    from raytopk.losses.forms import step_bytes
    from raytopk.tune.selection import latest_rows, param_grid

    if not study.step_table:
        raise ConfigError("study.step_table is empty: --plan is for compute-matched studies")
    table = _study_table(study, base)
    ops = list(study.ops) if study.ops else list_methods()
    stages = len(base.model.stages)
    batch = base.data.batch_size * study.workers_per_trial
    seeds = study.selection_seeds
    lrs = list(study.lrs)
    r, grace = float(study.asha_reduction), 1.0 / max(1, study.eval_points)
    done: dict[tuple[str, str, int], int] = {}
    for row in latest_rows(logged or []):  # a completed trial and ASHA's stop of it: one trial
        if row.get("op") and row.get("phase") and row.get("sample_num") not in (None, ""):
            key = (str(row["phase"]), str(row["op"]), int(row["sample_num"]))
            done[key] = done.get(key, 0) + 1
    rows, per_n = [], []
    for sample_num in study.sample_nums:
        n = schema.N_OWN + sample_num
        if sample_num not in study.slowest_steps:
            raise ConfigError(f"study.slowest_steps has no entry for sample_num {sample_num}")
        fit = {m: step_fits(m, base.data.batch_size, n, stages, study.mem_budget_gb) for m in ops}
        lacking = [m for m in ops if fit[m] and (m, n) not in table.seconds]
        if lacking:
            raise _no_row(study, lacking, n)
        timed = [m for m in ops if fit[m]]
        s_n = study.slowest_steps[sample_num]
        budget = table.budget(timed, n, s_n) if timed else 0.0
        tot = {"sel": 0, "final": 0, "asha": 0.0, "sel_logged": 0, "final_logged": 0}
        for m in ops:
            row: dict[str, Any] = {"N": n, "method": m, "fits": fit[m],
                                   "step_gib": round(step_bytes(m, base.data.batch_size, n,
                                                                stages) / 2**30, 2)}
            if not fit[m]:
                row["why"] = f"over study.mem_budget_gb {study.mem_budget_gb}"
                rows.append(row)
                continue
            plan = trial_plan(table, timed, m, n, s_n, study.compute_cuts, study.eval_points)
            values = len(param_grid(m, study.grid_size, study.grid_factor, study.grids.get(m)))
            settings = (values or (1 if lrs else 0)) * max(1, len(lrs))
            sel = settings * len(seeds) if study.select else 0
            share = asha_share(plan.eval_steps, plan.steps, grace, r)
            row.update(t_s=table.t(m, n), steps=plan.steps, requests=plan.steps * batch,
                       selection_trials=sel, final_trials=len(study.seeds),
                       asha_share=round(share, 3),
                       selection_logged=done.get(("select", m, sample_num), 0),
                       final_logged=done.get(("final", m, sample_num), 0))
            tot["sel"] += sel
            tot["final"] += len(study.seeds)
            tot["asha"] += sel * share
            tot["sel_logged"] += row["selection_logged"]
            tot["final_logged"] += row["final_logged"]
            rows.append(row)
        per_n.append({"N": n, "budget_s": round(budget, 1), "slowest_steps": s_n,
                      "selection_trials": tot["sel"], "final_trials": tot["final"],
                      "selection_logged": tot["sel_logged"], "final_logged": tot["final_logged"],
                      "selection_full_trials_max": tot["sel"],
                      "selection_full_trials_asha": round(tot["asha"], 1),
                      "final_full_trials": tot["final"],
                      "compute_hours_finals": round(tot["final"] * budget / 3600, 2),
                      "compute_hours_selection_asha": round(tot["asha"] * budget / 3600, 2),
                      # the aim: a selection no costlier than the finals; its first round under
                      # ideal ASHA is a lower bound on what the selection will cost
                      "selection_over_finals": round(tot["asha"], 1) > tot["final"]})
    return {"table": table.path, "machine": table.machine, "batch": batch,
            "reduction": r, "select_seeds": len(seeds), "methods": rows, "per_n": per_n}


def plan_markdown(p: dict[str, Any]) -> str:
    """:func:`study_plan` as text: one line per (method, N), then the totals per N."""
    out = [f"Step times from {p['table']} ({p['machine']}); global batch {p['batch']}.", "",
           "| N | method | step (s) | steps | requests | selection trials (logged) | "
           "ASHA share | final trials (logged) | step memory (GiB) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["methods"]:
        if "steps" in r:
            out.append(f"| {r['N']} | {r['method']} | {r['t_s']:.3f} | {r['steps']:,} | "
                       f"{r['requests']:,} | {r['selection_trials']} ({r['selection_logged']}) "
                       f"| {r['asha_share']:g} | {r['final_trials']} ({r['final_logged']}) | "
                       f"{r['step_gib']:g} |")
        else:
            out.append(f"| {r['N']} | {r['method']} | not run: {r['why']} | | | | | | "
                       f"{r['step_gib']:g} |")
    out += ["", "| N | T_N (s) | selection trials (logged) | final trials (logged) | full "
            "trials: selection (ideal ASHA / all to the end) | finals | compute hours: "
            "selection (ideal ASHA) + finals |", "|---:|---:|---:|---:|---|---:|---|"]
    for e in p["per_n"]:
        out.append(f"| {e['N']} | {e['budget_s']:g} | {e['selection_trials']} "
                   f"({e['selection_logged']}) | {e['final_trials']} ({e['final_logged']}) | "
                   f"{e['selection_full_trials_asha']:g} / {e['selection_full_trials_max']} | "
                   f"{e['final_full_trials']} | {e['compute_hours_selection_asha']:g} + "
                   f"{e['compute_hours_finals']:g} |")
    out += ["", "Every trial of the study is counted, those already in the row log too "
            "(in brackets). A full trial trains T_N of compute on the table's device. ASHA "
            f"share: the part of a full trial one selection trial trains when every decision "
            f"keeps the best 1/{p['reduction']:g}, decided at the trial's validation points. "
            "Not counted: asynchronous ASHA's extra promotions while its rungs fill (what "
            "trials really trained is in jobs/study_claims.py's \"Compute spent\"), the "
            "grid-extension rounds (each up to 4 settings x "
            f"{p['select_seeds']} selection seeds per method and N, run to the end), the "
            "completion rounds (seeds ASHA stopped of a setting best on its other seeds, run "
            "again to the end) and evaluation time. Hours are compute on the table's device, "
            "not this machine's wall time: trials that run side by side share its cores.", ""]
    over = [e for e in p["per_n"] if e.get("selection_over_finals")]
    for e in over:
        out.append(f"N = {e['N']}: the selection's first round alone, under ideal ASHA, trains "
                   f"{e['selection_full_trials_asha']:g} full trials against the finals' "
                   f"{e['final_full_trials']}, so it misses the aim of a selection no costlier "
                   "than the finals (docs/protocol.md §6.1); fewer parameter values or learning "
                   "rates per method, or fewer selection seeds, would bring it down.")
    if over:
        out.append("")
    return "\n".join(out)
