"""Parameter selection on the validation day (the study's first phase), with early stopping.

Notation: T = the base config's training days, v = T[-1] (the validation day, held out of
training in every trial of the study), P = study.eval_points, g = an operator's grid.

Each operator's own parameter (the registry's ``param``: dftopk tau, lapsum alpha, sparse_topk
l, neuralsort/softsort tau, diffsort steepness) is searched over a log-spaced grid around its
paper value (the registry default, always in the grid), per sample_num, jointly with the
learning rate when ``study.lrs`` is given, on each selection seed: train on T[:-1] under the
study's budget, evaluate day v at P points. The chosen setting maximises the validation headline
at the budget, averaged over the seeds (ties: the one closest to the paper's value, in log
scale); a setting every seed completed is preferred, and one ASHA stopped on some seed but best
on the others is first completed (:func:`completions`).
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

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from raytopk.metrics import headline_key
from raytopk.train.anytime import valid_metric
from raytopk.train.config import TrainConfig, from_dict, to_dict, validate

__all__ = [
    "GroupedASHA",
    "choose",
    "choose_joint",
    "chosen_lrs",
    "chosen_values",
    "completions",
    "latest_rows",
    "logged_rounds",
    "edge_extensions",
    "lr_extensions",
    "run_selection",
    "op_param",
    "param_grid",
    "selection_trials",
    "split_validation",
    "logged_selection",
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
    seed: int | list[int],
    grid: dict[str, list[float]],
    base: TrainConfig,
    out_root: Path,
    loss_forms: dict[str, str] | None = None,
    lrs: list[float] | None = None,
    plan: Callable[[TrainConfig, str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One Tune config per (op, sample_num, value, lr, seed); ``base`` is a study trial config
    (budget, eval points, valid_day set); each op trains with its loss form (``loss_forms[op]``,
    default: the form chosen for it). The test day is not in them.

    ``lrs``: learning rates tried with every value (empty/None: the base lr only, and a method
    without a parameter is then not searched at all). ``plan(cfg, op, n)``, when given, sets a
    trial's budget in place (the study's compute-matched steps)."""
    from raytopk.losses import resolve_form

    seeds = [seed] if isinstance(seed, int) else list(seed)
    trials = []
    for op in ops:
        p = op_param(op)
        form = resolve_form(op, (loss_forms or {}).get(op, "auto"))
        values: list[float | None] = list(grid.get(op, []))
        if not values and lrs:
            values = [None]  # no parameter: the learning rate alone is searched
        for n in sample_nums:
            for value in values:
                for lr in lrs or [None]:
                    for sd in seeds:
                        cfg = from_dict(to_dict(base))
                        name = f"{op}-n{n}" + (f"-{p[0]}{value:g}" if value is not None else "")
                        name += (f"-lr{lr:g}" if lr is not None else "") + f"-s{sd}"
                        cfg.op.name, cfg.loss.form = op, form
                        cfg.op.params = {p[0]: value} if value is not None else {}
                        if lr is not None:
                            cfg.optim.lr = float(lr)
                        cfg.data.sample_num = n
                        cfg.data.test_day = cfg.run.valid_day  # the real test day: nowhere
                        cfg.run.test_eval = False
                        cfg.run.seed, cfg.run.name = sd, name
                        cfg.run.output_dir = str(out_root / "trials" / "select" / name)
                        if plan is not None:
                            plan(cfg, op, n)
                        trials.append({
                            "trial": name, "phase": "select", "group": f"{op}-n{n}", "op": op,
                            "loss_form": form, "sample_num": n, "seed": sd,
                            "param": p[0] if value is not None else "",
                            "value": value if value is not None else "",
                            "lr": cfg.optim.lr, "train": to_dict(cfg),
                        })
    return trials


def _log_dist(v: float | None, ref: float | None) -> float:
    if v is None or ref is None or v <= 0 or ref <= 0:
        return 0.0
    return abs(math.log(v / ref))


def _num(r: dict[str, Any], field: str) -> float | None:
    """A row's ``value`` or ``lr`` as a float, None where it has none (``bce`` has no value)."""
    return None if r.get(field) in (None, "") else float(r[field])


def _tried(rows: list[dict[str, Any]], field: str, op: str | None = None) -> set[float]:
    """The ``value``s or ``lr``s the rows (of ``op``, default every op) have, whatever their
    status."""
    return {x for r in rows if op is None or r["op"] == op
            for x in [_num(r, field)] if x is not None}


def _settings(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, int], tuple[set, dict[tuple[Any, Any], dict[Any, dict[str, Any]]]]]:
    """{(op, N): (the seeds that have a row, {(value, lr): {seed: row}})}: the selection rows of
    each setting, one per seed; of two rows for a seed an ok row wins, else the later one (a
    completion's row over ASHA's stop, whatever order the rows come in)."""
    out: dict[tuple[str, int], tuple[set, dict]] = {}
    for r in rows:
        seeds, by = out.setdefault((str(r["op"]), int(r["sample_num"])), (set(), {}))
        seeds.add(r.get("seed"))
        runs = by.setdefault((_num(r, "value"), _num(r, "lr")), {})
        if runs.get(r.get("seed"), {}).get("status") != "ok":
            runs[r.get("seed")] = r
    return out


def _scores(runs: dict[Any, dict[str, Any]], key: str) -> list[float]:
    """The validation headline of a setting's seeds that ran to the end (status ok)."""
    return [float(r[key]) for r in runs.values() if r.get("status") == "ok" and key in r]


def choose_joint(
    rows: list[dict[str, Any]], headline: str, base_lr: float | None = None
) -> dict[tuple[str, int], dict[str, Any]]:
    """{(op, sample_num): {"value", "lr", "score", "seeds"}}: the (value, lr) setting with the
    best validation headline at the budget, averaged over the seeds that reached it (status
    ok). A setting every selection seed completed beats one that some seed did not (ASHA
    stopped it); ties -> closest to the paper's value, then to ``base_lr`` (log scale)."""
    key = valid_metric(headline)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for (op, n), (seeds, by) in sorted(_settings(rows).items()):
        p = op_param(op)
        best = None
        for (v, lr), runs in by.items():
            scores = _scores(runs, key)
            if not scores:
                continue
            mean = sum(scores) / len(scores)
            cand = (len(scores) >= len(seeds), mean, -_log_dist(v, p[1] if p else None),
                    -_log_dist(lr, base_lr))
            if best is None or cand > best[0]:
                best = (cand, {"value": v, "lr": lr, "score": round(mean, 6),
                               "seeds": len(scores)})
        if best is not None:
            out[(op, n)] = best[1]
    return out


def choose(rows: list[dict[str, Any]], headline: str) -> dict[str, dict[int, float]]:
    """{op: {sample_num: chosen parameter value}} of :func:`choose_joint` (ops with a parameter
    only): the best validation headline at the budget among trials that reached it (status ok);
    ties -> closest to the paper's value."""
    return chosen_values(choose_joint(rows, headline))


def _chosen(
    joint: dict[tuple[str, int], dict[str, Any]], field: str
) -> dict[str, dict[int, float]]:
    """{op: {sample_num: the choice's ``value`` or ``lr``}} of :func:`choose_joint`, for the
    settings that have one."""
    out: dict[str, dict[int, float]] = {}
    for (op, n), c in joint.items():
        if c[field] is not None:
            out.setdefault(op, {})[n] = c[field]
    return out


def chosen_values(joint: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{op: {sample_num: chosen parameter value}} of :func:`choose_joint` (settings that had
    one)."""
    return _chosen(joint, "value")


def chosen_lrs(joint: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{op: {sample_num: chosen lr}} of :func:`choose_joint` (settings that had an lr)."""
    return _chosen(joint, "lr")


def lr_extensions(
    rows: list[dict[str, Any]], joint: dict[tuple[str, int], dict[str, Any]], factor: float
) -> list[tuple[str, int, float | None, float]]:
    """(op, sample_num, value, lr) to try next: where the chosen lr is the smallest (largest) lr
    tried with the chosen value, the lr ``factor`` further out (the edge rule of
    :func:`edge_extensions`, on the learning-rate axis)."""
    tried: dict[tuple[str, int, Any], set[float]] = {}
    for r in rows:
        lr = _num(r, "lr")
        if lr is not None:
            tried.setdefault((str(r["op"]), int(r["sample_num"]), _num(r, "value")),
                             set()).add(lr)
    out = []
    for (op, n), c in joint.items():
        if c["lr"] is None:
            continue
        lrs = tried.get((op, n, c["value"]), {c["lr"]})
        for edge, new in ((min(lrs), c["lr"] / factor), (max(lrs), c["lr"] * factor)):
            new = float(f"{new:.6g}")
            if math.isclose(c["lr"], edge) and not any(math.isclose(new, t) for t in lrs):
                out.append((op, n, c["value"], new))
    return out


def edge_extensions(
    rows: list[dict[str, Any]], chosen: dict[str, dict[int, float]], factor: float
) -> list[tuple[str, int, float]]:
    """(op, sample_num, value) to try next: for each (op, N) whose chosen value is on an edge of
    the values tried for it, the value ``factor`` further out on that side, if not tried yet. On
    an edge: no value tried on that side within ``factor``² — the smallest (largest) value, or
    one whose neighbour is a far-off value such as the paper's τ = 500 beside a grid ending at 5.
    A value counts as tried whatever its status (ASHA-stopped or not fitting too); a grid of one
    value extends both ways."""
    tried: dict[tuple[str, int], set[float]] = {}
    for r in rows:
        v = _num(r, "value")
        if v is not None:
            tried.setdefault((str(r["op"]), int(r["sample_num"])), set()).add(v)
    out = []
    gap = factor * factor * (1 + 1e-9)
    for op, by_n in sorted(chosen.items()):
        for n, v in sorted(by_n.items()):
            vals = tried.get((op, int(n)), {v})
            below = [t for t in vals if t < v and not math.isclose(t, v)]
            above = [t for t in vals if t > v and not math.isclose(t, v)]
            for near, new in ((max(below, default=0.0), v / factor),
                              (min(above, default=math.inf), v * factor)):
                new = float(f"{new:.6g}")
                open_side = near == 0.0 or near == math.inf or max(near / v, v / near) > gap
                if open_side and not any(math.isclose(new, t) for t in vals):
                    out.append((op, int(n), new))
    return out


def completions(
    rows: list[dict[str, Any]], headline: str, clock: str
) -> list[tuple[str, int, float | None, float | None, Any, float]]:
    """(op, sample_num, value, lr, seed, stopped_at) to run to the end: the selection seeds
    ASHA stopped of a setting whose seeds that ran to the end score better (mean validation
    headline) than every setting all seeds completed; with no such setting, of the best
    setting, if ASHA stopped some of its seeds. ASHA judges each seed's settings apart, so it
    can stop a setting on one seed that another seed takes to the best score of all;
    :func:`choose_joint` prefers a setting every seed completed, and would otherwise pass it
    over on the strength of one early judgement. ``stopped_at``: the ``clock`` value ASHA
    stopped that seed at. Only ASHA's stops are completed (not a step over the memory budget,
    not a failed trial: the study runs a failed trial again when it is re-run)."""
    key = valid_metric(headline)
    out = []
    for (op, n), (seeds, by) in sorted(_settings(rows).items()):
        full, scored = [], []
        for (v, lr), runs in by.items():
            ok = _scores(runs, key)
            stopped = [r for r in runs.values()
                       if str(r.get("status", "")).startswith("stopped early")]
            if ok and len(ok) >= len(seeds):
                full.append(sum(ok) / len(ok))
            elif ok:
                scored.append((sum(ok) / len(ok), v, lr, stopped))
        if full:
            picked = [p for p in scored if p[0] > max(full)]
        else:
            picked = [max(scored, key=lambda p: p[0])] if scored else []
        for _, v, lr, stopped in sorted(picked, key=lambda p: -p[0]):
            for r in sorted(stopped, key=lambda r: str(r.get("seed"))):
                out.append((op, n, v, lr, r.get("seed"), float(r.get(clock) or 0.0)))
    return out


def logged_rounds(rows: list[dict[str, Any]], ns: set[int]) -> tuple[int, dict[int, int]]:
    """(the last round number in ``rows``, {N: extension rounds N had}) for the N of ``ns``:
    a restarted selection numbers its rounds after those logged, and each N's extension rounds
    (rounds >= 1 other than completions) count against study.grid_extend across runs."""
    later = [r for r in rows if r.get("round") not in (None, "") and int(r["round"]) >= 1]
    extended = {n: len({int(r["round"]) for r in later if int(r["sample_num"]) == n
                        and r.get("completes") in (None, "")}) for n in ns}
    return max((int(r["round"]) for r in later), default=0), extended


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with one row per configuration digest, the later one (a completed trial's row
    replaces the row of ASHA's stop); rows without a digest are kept."""
    last = {r["config_digest"]: i for i, r in enumerate(rows) if r.get("config_digest")}
    return [r for i, r in enumerate(rows)
            if not r.get("config_digest") or last[r["config_digest"]] == i]


def run_selection(study: Any, budgeted: TrainConfig, ops: list[str], seeds: list[int],
                  out: Path, trainable: Any, conc: int, stages: int, verbose: bool,
                  plan: Callable[[TrainConfig, str, int], None] | None = None,
                  max_t: dict[str, float] | None = None,
                  fits: Callable[[str, int], bool] | None = None,
                  results: Path | None = None,
                  ) -> dict[tuple[str, int], dict[str, Any]]:
    """The study's phase 1 on the connected Ray cluster: every (parameter value, lr) of each
    (op, N) on ``seeds`` under ASHA per (op, N), then up to ``study.grid_extend`` rounds
    extending, at the chosen setting, a parameter grid or lr grid whose best value is on its
    edge. Before each extension round (rounds of their own, not counted in grid_extend),
    settings ASHA stopped on some seed but best on the seeds
    that completed them are completed (:func:`completions`; their trials run again to the end,
    in their own directories); the choice is made again before any grid is extended.
    ``budgeted``: the study's trial config (budget, eval points, valid_day); ``plan``
    sets a trial's compute-matched budget, ``max_t`` its ASHA clock's end per group ("op-nN").
    Trials already in the study's row log are not run again; an (op, N) for which ``fits``
    says no (a step over the memory budget) is not searched (its final trials record why).
    Trial directories go under ``out``; selection.csv/json (written after each round) into
    ``results`` (default ``out``), with the selection trials the row log holds for the
    study's other N (:func:`logged_selection`). Every choice and every round's proposals are
    made from all the selection trials of the N the row log holds for this config, those of
    an interrupted run's later rounds included, so a restarted run decides as the first one
    would have with what it knows. Returns :func:`choose_joint`'s choice per
    (op, N), those N included."""
    from raytopk.tune.experiments import run_experiment
    from raytopk.tune.results import write_selection

    head = headline_key(stages)
    lrs = list(getattr(study, "lrs", []) or [])
    clock = "samples_seen" if plan is not None or study.budget_seconds <= 0 else "train_seconds"
    base_lr = budgeted.optim.lr

    def prepared(trials: list[dict[str, Any]], rnd: int) -> list[dict[str, Any]]:
        if fits is not None:
            trials = [t for t in trials if fits(t["op"], int(t["sample_num"]))]
        for t in trials:
            validate(from_dict(t["train"]))
            t["mem_budget_gb"], t["round"] = study.mem_budget_gb, rnd
        return trials

    def trials_of(op: str, n: int, values: list[float], lr_list: list[float] | None,
                  rnd: int) -> list[dict[str, Any]]:
        return prepared(selection_trials([op], [n], seeds, {op: values}, budgeted, out,
                                         study.loss_forms, lr_list, plan), rnd)

    grid = {op: param_grid(op, study.grid_size, study.grid_factor, study.grids.get(op))
            for op in ops}
    sel = prepared(selection_trials(ops, study.sample_nums, seeds, grid, budgeted, out,
                                    study.loss_forms, lrs, plan), 0)
    rows: list[dict[str, Any]] = []
    if sel:
        if max_t is None:
            budget = study.budget_seconds if clock == "train_seconds" else float(study.max_samples)
            max_t = {t["group"]: budget for t in sel}
        sched = GroupedASHA(metric=valid_metric(head), time_attr=clock, max_t=max_t,
                            grace_period={g: v / study.eval_points for g, v in max_t.items()},
                            reduction_factor=study.asha_reduction)
        if verbose:
            print(f"[raytopk] selection: {len(sel)} trial(s) on validation day "
                  f"{budgeted.run.valid_day}, seeds {seeds}, lrs {lrs or [base_lr]}", flush=True)
        rows = run_experiment(study, f"{study.name}_select", sel, trainable, conc, sched,
                              stages, verbose, clock)
    # The study's other N (an earlier run with other study.sample_nums, logged in the same
    # row log) stay in selection.csv/json and in the choice returned: the files describe the
    # whole study, whichever N this run covers.
    now = set(study.sample_nums)
    earlier = logged_selection(study, budgeted, ops, seeds, out, plan)
    results = results or out

    def report() -> tuple[dict[tuple[str, int], dict[str, Any]], list[dict[str, Any]]]:
        """The choice over every N, written to selection.csv/json, and the rows of this run's N
        it was made from: logged (earlier runs' too) and run now."""
        mine = latest_rows(logged_selection(study, budgeted, ops, seeds, out, plan, now) + rows)
        every = latest_rows(mine + earlier)
        joint = choose_joint(every, head, base_lr)
        values = {op: sorted({*vals, *_tried(every, "value", op)}) for op, vals in grid.items()}
        write_selection(every, joint, values, results, head)
        return joint, mine

    joint, mine = report()
    rnd, extended = logged_rounds(mine, now)
    while True:
        rnd += 1
        ext: list[dict[str, Any]] = []
        # Completion rounds first, whatever grid_extend: the choice settles before a grid moves.
        for op, n, v, lr, seed, at in completions(mine, head, clock):
            for t in trials_of(op, n, [v] if v is not None else [], [lr] if lrs else None, rnd):
                if t["seed"] == seed:
                    t["completes"] = at  # where ASHA stopped it (GroupedASHA.replay)
                    t["train"]["run"]["output_dir"] += "-complete"  # not the stopped one's
                    ext.append(t)
        if ext:
            if verbose:
                print(f"[raytopk] selection round {rnd}: completing settings ASHA stopped on "
                      f"some seed but best on the others: {sorted(t['trial'] for t in ext)}",
                      flush=True)
            rows += run_experiment(study, f"{study.name}_select_complete{rnd}", ext,
                                   trainable, conc, None, stages, verbose, clock)
            joint, mine = report()
            continue
        joint_now = {k: c for k, c in joint.items()
                     if k[1] in now and extended[k[1]] < study.grid_extend}
        for op, n, v in edge_extensions(mine, chosen_values(joint_now), study.grid_factor):
            lr = joint_now[(op, n)]["lr"] if lrs else None  # no lr search: the base lr
            ext += trials_of(op, n, [v], [lr] if lr is not None else None, rnd)
        for op, n, v, lr in (lr_extensions(mine, joint_now, study.lr_factor) if lrs else []):
            ext += trials_of(op, n, [v] if v is not None else [], [lr], rnd)
        if not ext:
            break
        for n in {int(t["sample_num"]) for t in ext}:
            extended[n] += 1
        if verbose:
            print(f"[raytopk] selection round {rnd}: best setting on its grid's edge, trying "
                  f"{sorted({t['trial'].rsplit('-s', 1)[0] for t in ext})}", flush=True)
        # No scheduler: few settings per (op, N), nothing in this round to compare them with.
        rows += run_experiment(study, f"{study.name}_select_ext{rnd}", ext, trainable, conc,
                               None, stages, verbose, clock)
        joint, mine = report()
    return joint


def logged_selection(study: Any, budgeted: TrainConfig, ops: list[str], seeds: list[int],
                     out: Path,
                     plan: Callable[[TrainConfig, str, int], None] | None = None,
                     at: set[int] | None = None,
                     ) -> list[dict[str, Any]]:
    """The row log's selection trials at the N of ``at`` (default: those other than
    study.sample_nums) that this study's config would have run: the trials of every (value,
    lr) the log tried there, on ``seeds``, regenerated from ``budgeted`` and matched by
    configuration digest, so a row from another config (budget, data, model, grid of another
    study) is not chosen from. A later row of a digest wins (a completion over ASHA's stop)."""
    from raytopk.tune.experiments import config_digest, logged_rows

    def wanted(n: int) -> bool:
        return n in at if at is not None else n not in set(study.sample_nums)

    logged = [r for r in logged_rows(study, "select").values() if wanted(int(r["sample_num"]))]
    if not logged:
        return []
    ns = sorted({int(r["sample_num"]) for r in logged})
    values = {op: sorted(_tried(logged, "value", op)) for op in ops}
    lrs = sorted(_tried(logged, "lr"))
    want = {config_digest(t["train"]) for t in selection_trials(
        ops, ns, seeds, values, budgeted, out, study.loss_forms, lrs or None, plan)}
    return [r for r in logged if r.get("config_digest") in want]


def _scheduler_base() -> type:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class GroupedASHA(_scheduler_base()):  # type: ignore[misc]
    """ASHA per trial group (``config["trial"]["group"]``): settings only compete within their
    (op, sample_num), and, when the trial names its ``seed``, within the runs of that seed (a
    setting is judged against the others on the same data order and initial weights, not
    against another seed's luck). ``max_t`` / ``grace_period``: one value, or one per group.
    ``metric`` stays unset on this wrapper so that Tune does not require it in every result
    (the loop's step reports carry none; only the anytime points do)."""

    def __init__(self, metric: str, time_attr: str, max_t: float | dict[str, float],
                 grace_period: float | dict[str, float], reduction_factor: float = 3.0) -> None:
        super().__init__()
        self._args = dict(metric=metric, mode="max", time_attr=time_attr,
                          reduction_factor=reduction_factor, stop_last_trials=False)
        self._max_t, self._grace = max_t, grace_period  # one value, or one per group
        self._groups: dict[str, Any] = {}
        self._of: dict[str, str] = {}
        self.stopped: list[str] = []

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric is fixed per group at construction

    def _bracket(self, group: str, seed: Any) -> tuple[str, Any]:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        bracket = f"{group}/s{seed}" if seed is not None else group
        if bracket not in self._groups:
            per = {k: (v[group] if isinstance(v, dict) else v)
                   for k, v in (("max_t", self._max_t), ("grace_period", self._grace))}
            self._groups[bracket] = AsyncHyperBandScheduler(**self._args, **per)
        return bracket, self._groups[bracket]

    def _asha(self, trial: Any) -> Any:
        t = trial.config.get("trial") or {}
        bracket, asha = self._bracket(str(t.get("group", "")), t.get("seed"))
        self._of[trial.trial_id] = bracket
        return asha

    def replay(self, rows: list[dict[str, Any]], clock: str) -> int:
        """Put the validation points of trials that already ran (rows of the study's log, e.g.
        before an interruption) into their group's rungs, so the trials still to run are judged
        against them as in an uninterrupted run. A row's points: its anytime curve (a finished
        trial's, whole even across a restart), else ``asha_points`` (what the experiment that
        stopped it saw), else the one point it was stopped at (the rungs it passed before are
        then unknown and left out). Returns the number of points replayed."""
        metric = self._args["metric"]
        n = 0
        for i, r in enumerate(rows):
            if r.get("phase") != "select" or not r.get("op"):
                continue
            group = f"{r['op']}-n{int(r.get('sample_num') or 0)}"
            if isinstance(self._max_t, dict) and group not in self._max_t:
                continue
            _, asha = self._bracket(group, r.get("seed"))
            points = [
                [p.get(clock), p.get(metric)] for p in r.get("anytime_curve") or []
            ] or r.get("asha_points") or [[r.get(clock), r.get(metric)]]
            if r.get("completes") not in (None, ""):  # ASHA saw it up to where it stopped it
                # (exact on a samples clock, as compute-matched studies use; on the training-
                # seconds clock a rerun's times differ a little from the stopped run's)
                points = [p for p in points if p[0] is not None
                          and float(p[0]) <= float(r["completes"]) * (1 + 1e-9)]
            # Ray 2.60's AsyncHyperBandScheduler keeps its rungs in one _Bracket; its on_result
            # records a value at the highest milestone the clock has reached (tests/unit/
            # test_study_compute.py checks the replay decides as an uninterrupted run does).
            logged = SimpleNamespace(trial_id=f"logged-{i}")
            for x, v in points:
                if x is not None and v is not None:
                    asha._brackets[0].on_result(logged, float(x), float(v))
                    n += 1
        return n

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
