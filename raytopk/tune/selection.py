"""Parameter selection on the validation day (the study's first phase), with early stopping.

Notation: T = the base config's training days, v = T[-1] (the validation day, held out of
training in every trial of the study), P = study.eval_points, g = an operator's grid.

Each operator's own parameter (the registry's ``param``: dftopk tau, lapsum alpha, sparse_topk
l, neuralsort/softsort tau, diffsort steepness) is searched over a log-spaced grid around its
paper value (the registry default, always in the grid), per sample_num, on one seed: train on
T[:-1] under the study's budget, evaluate day v at P points. The chosen value maximises the
validation headline at the budget (ties: the one closest to the paper's value, in log scale).
Selection trials have ``run.test_eval=false`` and their ``data.test_day`` set to v, so the test
day is in none of their datasets. An operator without a parameter (a baseline such as ``bce``)
has no grid and is not searched.

A grid whose best value sits on its edge has not bracketed the optimum: ``edge_extensions``
proposes, per (op, N) whose chosen value is the smallest (largest) value tried, one value a
grid_factor further out; the study runs those (rounds up to ``study.grid_extend``) and chooses
again over everything tried. The same rule for every operator, so no operator is searched wider
than its own results ask for.

Hopeless settings stop early: :class:`GroupedASHA` runs one ``AsyncHyperBandScheduler`` per
(op, sample_num) group (settings compete only with settings of the same operator and N), on the
training clock (``train_seconds``, or ``samples_seen`` for a sample budget) at the anytime
points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from raytopk.metrics import headline_key
from raytopk.train.anytime import valid_metric
from raytopk.train.config import TrainConfig, from_dict, to_dict, validate

__all__ = [
    "GroupedASHA",
    "choose",
    "edge_extensions",
    "run_selection",
    "op_param",
    "param_grid",
    "selection_trials",
    "split_validation",
]


def op_param(op: str) -> tuple[str, float] | None:
    """(parameter name, paper value) of a registered operator; None for an operator name the
    registry does not hold (a baseline with no parameter, e.g. bce)."""
    from raytopk.ops import get_spec

    try:
        spec = get_spec(op)
    except ValueError:
        return None
    return spec.param, float(spec.default)


def param_grid(
    op: str, size: int, factor: float, override: list[float] | None = None
) -> list[float]:
    """``size`` values default * factor^j, j centred on 0 (the paper's value always in it), or
    ``override`` (the paper's value added when missing); [] for an op without a parameter."""
    p = op_param(op)
    if p is None or size < 1:
        return []
    default = p[1]
    if override:
        vals = {float(v) for v in override} | {default}
    else:
        lo = -((size - 1) // 2)
        vals = {default * factor**j for j in range(lo, lo + size)}
    return sorted(float(f"{v:.6g}") for v in vals)


def split_validation(cfg: TrainConfig) -> TrainConfig:
    """A resolved config (train_days filled by ``prepare``) with its last training day held out as
    ``run.valid_day``. ValueError with fewer than two training days."""
    days = list(cfg.data.train_days)
    if len(days) < 2:
        raise ValueError(
            f"data.train_days {days}: the study holds the last training day out for validation "
            "and needs at least two"
        )
    out = from_dict(to_dict(cfg))
    out.data.train_days, out.run.valid_day = days[:-1], days[-1]
    return out


def selection_trials(
    ops: list[str],
    sample_nums: list[int],
    seed: int,
    grid: dict[str, list[float]],
    base: TrainConfig,
    out_root: Path,
    loss_forms: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One Tune config per (op, sample_num, value) on ``seed``; ``base`` is a study trial config
    (budget, eval points, valid_day set); each op trains with its loss form (``loss_forms[op]``,
    default: the form chosen for it). The test day is not in them."""
    from raytopk.losses import resolve_form

    trials = []
    for op in ops:
        p = op_param(op)
        form = resolve_form(op, (loss_forms or {}).get(op, "auto"))
        for n in sample_nums:
            for value in grid.get(op, []):
                cfg = from_dict(to_dict(base))
                name = f"{op}-n{n}-{p[0]}{value:g}-s{seed}"
                cfg.op.name, cfg.op.params, cfg.loss.form = op, {p[0]: value}, form
                cfg.data.sample_num = n
                cfg.data.test_day = cfg.run.valid_day  # the real test day appears nowhere
                cfg.run.test_eval = False
                cfg.run.seed, cfg.run.name = seed, name
                cfg.run.output_dir = str(out_root / "trials" / "select" / name)
                trials.append({
                    "trial": name, "phase": "select", "group": f"{op}-n{n}", "op": op,
                    "loss_form": form,
                    "sample_num": n, "seed": seed, "param": p[0], "value": value,
                    "train": to_dict(cfg),
                })
    return trials


def choose(rows: list[dict[str, Any]], headline: str) -> dict[str, dict[int, float]]:
    """{op: {sample_num: chosen value}} from selection rows: the best validation headline at the
    budget among trials that reached it (status ok); ties -> closest to the paper's value."""
    key = valid_metric(headline)
    best: dict[tuple[str, int], tuple[float, float, float]] = {}
    for r in rows:
        if r.get("status") != "ok" or key not in r:
            continue
        op, n, v = str(r["op"]), int(r["sample_num"]), float(r["value"])
        p = op_param(op)
        dist = abs(math.log(v / p[1])) if p and v > 0 else 0.0
        cand = (float(r[key]), -dist, v)
        if (op, n) not in best or cand > best[(op, n)]:
            best[(op, n)] = cand
    out: dict[str, dict[int, float]] = {}
    for (op, n), (_, _, v) in sorted(best.items()):
        out.setdefault(op, {})[n] = v
    return out


def edge_extensions(
    rows: list[dict[str, Any]], chosen: dict[str, dict[int, float]], factor: float
) -> list[tuple[str, int, float]]:
    """(op, sample_num, value) to try next: for each (op, N) whose chosen value is the smallest
    (largest) value tried for it, the value ``factor`` further out, if not tried yet. A value
    counts as tried whatever its status (ASHA-stopped or not fitting too); a grid of one value
    extends both ways."""
    tried: dict[tuple[str, int], set[float]] = {}
    for r in rows:
        if r.get("value") not in (None, ""):
            tried.setdefault((str(r["op"]), int(r["sample_num"])), set()).add(float(r["value"]))
    out = []
    for op, by_n in sorted(chosen.items()):
        for n, v in sorted(by_n.items()):
            vals = tried.get((op, int(n)), {v})
            for edge, new in ((min(vals), v / factor), (max(vals), v * factor)):
                new = float(f"{new:.6g}")
                if math.isclose(v, edge) and not any(math.isclose(new, t) for t in vals):
                    out.append((op, int(n), new))
    return out


def run_selection(study: Any, budgeted: TrainConfig, ops: list[str], seed: int, out: Path,
                  trainable: Any, conc: int, stages: int, verbose: bool
                  ) -> dict[str, dict[int, float]]:
    """The study's phase 1 on the connected Ray cluster: the grids under ASHA per (op, N), then
    up to ``study.grid_extend`` rounds extending the grids whose best value is on their edge.
    ``budgeted``: the study's trial config (budget, eval points, valid_day). Writes
    selection.csv/json after each round (a re-run continues from it); returns
    {op: {sample_num: chosen value}}."""
    from raytopk.tune.experiments import run_experiment
    from raytopk.tune.reports import write_selection

    head = headline_key(stages)

    def prepared(trials: list[dict[str, Any]], rnd: int) -> list[dict[str, Any]]:
        for t in trials:
            validate(from_dict(t["train"]))
            t["mem_budget_gb"], t["round"] = study.mem_budget_gb, rnd
        return trials

    path = Path(out) / "selection.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        rows, grid = list(doc["trials"]), {op: list(v) for op, v in doc["grid"].items()}
    else:
        grid = {op: param_grid(op, study.grid_size, study.grid_factor, study.grids.get(op))
                for op in ops}
        sel = prepared(selection_trials(ops, study.sample_nums, seed, grid, budgeted, out,
                                        study.loss_forms), 0)
        rows = []
        if sel:
            by_seconds = study.budget_seconds > 0
            budget = study.budget_seconds if by_seconds else float(study.max_samples)
            sched = GroupedASHA(
                metric=valid_metric(head),
                time_attr="train_seconds" if by_seconds else "samples_seen",
                max_t=budget, grace_period=budget / study.eval_points,
                reduction_factor=study.asha_reduction,
            )
            if verbose:
                print(f"[raytopk] selection: {len(sel)} trial(s) on validation day "
                      f"{budgeted.run.valid_day}, seed {seed}", flush=True)
            rows = run_experiment(study, f"{study.name}_select", sel, trainable, conc, sched,
                                  stages, verbose)
        write_selection(rows, choose(rows, head), grid, out, head)
    chosen = choose(rows, head)
    done = max((int(r.get("round") or 0) for r in rows), default=0)
    for rnd in range(done + 1, study.grid_extend + 1):
        ext = edge_extensions(rows, chosen, study.grid_factor)
        if not ext:
            break
        sel = prepared([t for op, n, v in ext for t in selection_trials(
            [op], [n], seed, {op: [v]}, budgeted, out, study.loss_forms)], rnd)
        if verbose:
            print(f"[raytopk] selection round {rnd}: best value on its grid's edge, trying "
                  f"{ext}", flush=True)
        # No scheduler: one value per (op, N), nothing in this round to compare it with.
        new = run_experiment(study, f"{study.name}_select_ext{rnd}", sel, trainable, conc, None,
                             stages, verbose)
        for r in new:
            r["round"] = rnd
        rows += new
        for op, _, v in ext:
            grid[op] = sorted({*grid.get(op, []), v})
        chosen = choose(rows, head)
        write_selection(rows, chosen, grid, out, head)
    return chosen


def _scheduler_base() -> type:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class GroupedASHA(_scheduler_base()):  # type: ignore[misc]
    """ASHA per trial group (``config["trial"]["group"]``): settings only compete within their
    (op, sample_num). ``metric`` stays unset on this wrapper so that Tune does not require it in
    every result (the loop's step reports carry none; only the anytime points do)."""

    def __init__(self, metric: str, time_attr: str, max_t: float, grace_period: float,
                 reduction_factor: float = 3.0) -> None:
        super().__init__()
        self._args = dict(metric=metric, mode="max", time_attr=time_attr, max_t=max_t,
                          grace_period=grace_period, reduction_factor=reduction_factor,
                          stop_last_trials=False)
        self._groups: dict[str, Any] = {}
        self._of: dict[str, str] = {}
        self.stopped: list[str] = []

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric is fixed per group at construction

    def _asha(self, trial: Any) -> Any:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        group = str((trial.config.get("trial") or {}).get("group", ""))
        self._of[trial.trial_id] = group
        if group not in self._groups:
            self._groups[group] = AsyncHyperBandScheduler(**self._args)
        return self._groups[group]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self._groups[self._of[trial.trial_id]].on_trial_result(
            tune_controller, trial, result
        )
        if decision == "STOP":
            self.stopped.append(str((trial.config.get("trial") or {}).get("trial", "")))
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        asha = self._groups.get(self._of.get(trial.trial_id, ""))
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        asha = self._groups.get(self._of.get(trial.trial_id, ""))
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self._groups)} group(s), {len(self.stopped)} stopped early"
