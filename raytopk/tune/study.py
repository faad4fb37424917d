"""The sample-scaling study (docs/protocol.md §6; docs/design.md, Sample-scaling study): operators
compared at equal compute while the training samples grow (negatives per request, requests).

Notation: a trial = one training run (operator × sample_num × seed, or × parameter value in the
selection phase); N = 40 + sample_num candidates per request; the budget = training seconds per
worker (counted inside the training loop, after start-up, excluding evaluation) and/or a cap on
training requests; T = the training days, v = T[-1] the validation day (never trained on).

Two phases, each one Ray Tune experiment of function trainables (``_trial_fn``), each trial a
training run through ``raytopk.train.driver.run``: a TorchTrainer (``study.trial_backend: ray``,
the Train V2 pattern of docs/ray.md §6, reports forwarded by ``TuneReportCallback``) or the same
loop inside the trial's own process (``local``: no TorchTrainer start-up, ~25 s per trial on a
2-core machine; reports forwarded with ``ray.tune.report``).

1. Selection (``study.select``; raytopk.tune.selection): every operator's parameter over a
   log-spaced grid around its paper value, per sample_num, on one seed, evaluated on day v only
   (the test day is in none of these trials' datasets), with ASHA per (op, N) stopping hopeless
   settings at the anytime points, then up to ``study.grid_extend`` rounds that extend a grid
   whose best value is on its edge by one value a grid_factor further out. Chosen: the best
   validation headline at the budget over everything tried.
2. Final trials: every (op, sample_num, seed) with the chosen value, the same seeds for every
   operator (paired: same data order, negatives, initial weights), ``study.eval_points``
   validation evaluations over the budget (anytime curves), then the test day.

A trial that cannot run is recorded with its reason and number, not dropped: a training step
needing more than ``study.mem_budget_gb`` (the registry's step_bytes), a single step longer
than the budget, a failure; a selection trial stopped early is recorded as such.

Outputs in ``study.results_dir`` (else ``study.output_dir``; raytopk.tune.results): results.csv,
results.md, anytime.csv, anytime.png, sample_scaling.png, selection.csv and selection.json, and
the row log trials.jsonl. Re-running the same command continues the study: a selection or final
trial that the row log holds with the same training config
(raytopk.tune.experiments.config_digest) is not run again, so the choice and any pending
extension rounds come out of the logged rows as before. A run for other ``study.sample_nums`` on
the same row log reports every N the log holds (``earlier_ns``, ``logged_finals``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from raytopk import ray_env
from raytopk.data import schema
from raytopk.losses.forms import step_bytes, step_fits
from raytopk.metrics import metric_keys
from raytopk.train.config import ConfigError, TrainConfig, from_dict, load_schema, to_dict, validate
from raytopk.train.resources import plan_resources
from raytopk.tune.compute import check_streaming, compute_planner
from raytopk.tune.experiments import (
    config_digest,
    logged_rows,
    results_path,
    row_log,
    run_experiment,
)
from raytopk.tune.results import RESULT_COLUMNS, result_columns, write_reports
from raytopk.tune.selection import (
    chosen_lrs,
    chosen_values,
    op_param,
    run_selection,
    split_validation,
)

__all__ = [
    "StudyConfig",
    "load_study",
    "study_ops",
    "resolve_base",
    "trial_configs",
    "logged_finals",
    "earlier_ns",
    "check_earlier",
    "step_bytes",
    "results_path",
    "run_study",
    "write_reports",
    "result_columns",
    "RESULT_COLUMNS",
]

@dataclass
class StudyConfig:
    """The ``study:`` section of a study YAML; the ``train:`` section is a TrainConfig."""

    # Empty: every registered operator and the bce baseline (raytopk.losses.list_methods()).
    ops: list[str] = field(default_factory=list)
    sample_nums: list[int] = field(default_factory=lambda: [0, 40, 160, 640])
    seeds: list[int] = field(default_factory=lambda: [42])
    # Fixed operator parameters per op ({op: {param: value}}), used when select is false (or for
    # an op with no grid); missing: the registry's RecFlow default.
    op_params: dict[str, dict[str, float]] = field(default_factory=dict)
    # Loss form per op ({op: form}, raytopk.losses.forms); missing: the form chosen for the op.
    loss_forms: dict[str, str] = field(default_factory=dict)
    select: bool = True  # tune each op's parameter on the validation day first
    grid_size: int = 5  # values per op: paper value * grid_factor^j, j centred on 0
    grid_factor: float = 3.0
    grids: dict[str, list[float]] = field(default_factory=dict)  # explicit grids per op
    # Rounds of edge extension: an (op, N) whose best value is the smallest/largest tried gets
    # one value a grid_factor further out per round (selection.edge_extensions); 0: none.
    grid_extend: int = 2
    select_seed: int = -1  # the seed selection trials use; -1: the first of seeds
    asha_reduction: float = 3.0  # ASHA's reduction factor (keeps the top 1/r at each rung)
    eval_points: int = 6  # validation evaluations per trial over its budget (anytime curves)
    budget_seconds: float = 60.0  # training seconds per worker per trial (equal compute)
    max_samples: int = 0  # optional cap on training requests per trial (0: none)
    trial_backend: str = "ray"  # ray: a TorchTrainer per trial; local: the loop in the trial
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.0  # 0: derived from the cluster (Ray Data keeps >= 1 CPU)
    max_concurrent: int = 0  # 0: derived from the cluster's CPUs (GPUs when trials use them)
    # Extra custom resources per trial function, e.g. {"study_slot": 1} with one slot per node
    # to run one trial per node.
    trial_resources: dict[str, float] = field(default_factory=dict)
    mem_budget_gb: float = 8.0  # trials needing more for one step (estimate) are recorded
    reference_op: str = "dftopk"  # paired differences are taken to this operator
    # Compute matched from measured step times (raytopk.tune.compute): a step_times.json of
    # jobs/bench_step.py. Set: no time budget; method m trains steps(m, N) = T_N / t(m, N)
    # steps, T_N = slowest_steps[N] x the slowest method's t; test day at the cut points.
    step_table: str = ""
    slowest_steps: dict[int, int] = field(default_factory=dict)  # per sample_num: S_N
    compute_cuts: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    lrs: list[float] = field(default_factory=list)  # selection: lrs tried with every value
    lr_factor: float = 3.0  # the lr grid's edge extension steps by this factor
    select_seeds: list[int] = field(default_factory=list)  # empty: [select_seed]
    diagnostics: bool = True  # DFTopK diagnostics in its trials' anytime rows
    # Where trials.jsonl (the row log a re-run resumes from) and the reports go; empty:
    # output_dir. Trial directories (checkpoints) and Tune's storage stay in output_dir.
    results_dir: str = ""
    output_dir: str = "runs/sample_scaling"
    storage_path: str = ""  # Tune's storage (shared storage on a cluster); empty: output_dir/tune
    name: str = "sample_scaling"

    @property
    def selection_seeds(self) -> list[int]:
        """The seeds selection trials run on: select_seeds, else [select_seed], else the first
        of seeds."""
        return list(self.select_seeds) or [
            self.select_seed if self.select_seed >= 0 else self.seeds[0]
        ]


@dataclass
class StudyFile:
    """A study YAML: ``study:`` (StudyConfig) and ``train:`` (the base TrainConfig of every
    trial), loaded by the training config's typed loader (raytopk.train.config.load_schema)."""

    study: StudyConfig = field(default_factory=StudyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_study(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[StudyConfig, TrainConfig]:
    """(study, base training config) from a study YAML with ``study:`` and ``train:`` sections,
    then ``study.<key>=value`` / ``train.<key>=value`` overrides. Unknown keys raise ConfigError
    naming the closest valid one; values are typed as the schema says."""
    f = load_schema(StudyFile, path, overrides)
    _check_study(f.study, f.train)
    return f.study, f.train


def study_ops(study: StudyConfig, base: TrainConfig | None = None) -> list[str]:
    """The study's operators: study.ops, or every registered one and the bce baseline."""
    from raytopk.losses import list_methods

    return list(study.ops) if study.ops else list_methods()


def _check_study(s: StudyConfig, base: TrainConfig) -> None:
    from raytopk.losses import list_methods, resolve_form

    for key, ops in (("ops", s.ops), ("op_params", s.op_params), ("loss_forms", s.loss_forms),
                     ("grids", s.grids)):
        for op in (op for op in ops if op not in list_methods()):
            raise ConfigError(f"study.{key}: unknown operator {op!r}; valid: {list_methods()}")
    for op, form in s.loss_forms.items():
        try:
            resolve_form(op, form)
        except ValueError as e:
            raise ConfigError(f"study.loss_forms.{op}: {e}") from e
    if not s.sample_nums or any(not isinstance(n, int) or n < 0 for n in s.sample_nums):
        raise ConfigError(f"study.sample_nums should be ints >= 0 but got {s.sample_nums}")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"study.seeds should list distinct seeds but got {s.seeds}")
    if not (s.budget_seconds > 0 or s.max_samples > 0 or s.step_table):
        raise ConfigError(
            f"study.budget_seconds={s.budget_seconds} and study.max_samples={s.max_samples}: "
            "set at least one budget (equal compute needs one)"
        )
    if s.workers_per_trial < 1:
        raise ConfigError(f"study.workers_per_trial should be >= 1 but got {s.workers_per_trial}")
    if s.trial_backend not in ("ray", "local"):
        raise ConfigError(f"study.trial_backend must be ray or local, got {s.trial_backend!r}")
    if s.trial_backend == "local" and s.workers_per_trial != 1:
        raise ConfigError("study.trial_backend=local runs one worker: study.workers_per_trial=1")
    if s.eval_points < 0 or (s.select and s.eval_points < 1):
        raise ConfigError(f"study.eval_points should be >= 1 with selection, got {s.eval_points}")
    if s.grid_extend < 0:
        raise ConfigError(f"study.grid_extend should be >= 0 but got {s.grid_extend}")
    try:
        s.slowest_steps = {int(k): int(v) for k, v in s.slowest_steps.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"study.slowest_steps should map sample_num to steps, e.g. {{0: 300}}, got "
            f"{s.slowest_steps!r}"
        ) from e
    if s.step_table:
        if s.budget_seconds > 0 or s.max_samples > 0:
            raise ConfigError(
                "study.step_table sets every trial's steps: set study.budget_seconds=0 and "
                f"study.max_samples=0 (got {s.budget_seconds} and {s.max_samples})"
            )
        missing = [n for n in s.sample_nums if int(s.slowest_steps.get(n, 0)) < 1]
        if missing:
            raise ConfigError(
                f"study.slowest_steps: no steps (>= 1) for sample_num {missing}; give one per "
                f"study.sample_nums entry, e.g. {{{missing[0]}: 300}}"
            )
        if not s.compute_cuts or any(not 0 < f <= 1 for f in s.compute_cuts):
            raise ConfigError(f"study.compute_cuts should be in (0, 1], got {s.compute_cuts}")
        if s.eval_points < 1:
            raise ConfigError(f"study.eval_points should be >= 1, got {s.eval_points}")
    if any(not lr > 0 for lr in s.lrs) or s.lr_factor <= 1:
        raise ConfigError(f"study.lrs should be > 0 ({s.lrs}) and study.lr_factor > 1 "
                          f"({s.lr_factor})")
    if s.grid_size < 1 or s.grid_factor <= 1 or s.asha_reduction <= 1:
        raise ConfigError(
            f"study.grid_size={s.grid_size} (>= 1), study.grid_factor={s.grid_factor} (> 1), "
            f"study.asha_reduction={s.asha_reduction} (> 1)"
        )


_TRIAL_CPU = 0.1  # the CPU of a trial's own function (Tune rejects 0), beside its workers


def trial_name(op: str, sample_num: int, seed: int, param: str = "", value: float = 0.0) -> str:
    """``op-nN[-paramV]-sS``: the parameter value is part of a final trial's name (and so of
    its output directory), so a trial whose chosen value changed never resumes the old one."""
    return f"{op}-n{sample_num}{f'-{param}{value:g}' if param else ''}-s{seed}"


def _budgeted(study: StudyConfig, base: TrainConfig) -> TrainConfig:
    """``base`` with the study's budget, anytime points and trial backend."""
    cfg = from_dict(to_dict(base))
    cfg.run.resume = True
    cfg.run.max_train_seconds = float(study.budget_seconds)
    cfg.run.max_samples = int(study.max_samples)
    cfg.run.epochs = max(cfg.run.epochs, 1000)  # the budget, not the data, ends training
    cfg.run.backend = study.trial_backend
    cfg.scaling.num_workers = study.workers_per_trial
    if cfg.run.valid_day:  # resolved bases only (resolve_base): anytime curves on day v
        cfg.run.eval_points = study.eval_points
    return cfg


def trial_configs(
    study: StudyConfig,
    base: TrainConfig,
    chosen: dict[str, dict[int, float]] | None = None,
    chosen_lr: dict[str, dict[int, float]] | None = None,
    plan: Callable[[TrainConfig, str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One Tune config per (op, sample_num, seed) of the final phase: the complete TrainConfig
    dict with the chosen parameter value (``chosen[op][sample_num]``), else study.op_params,
    and the chosen learning rate (``chosen_lr[op][sample_num]``), else the base lr. ``plan``:
    :func:`compute_planner`'s budget setter."""
    from raytopk.losses import resolve_form

    out_root = Path(study.output_dir).resolve()
    budgeted = _budgeted(study, base)
    trials = []
    for op in study_ops(study, base):
        p = op_param(op)
        for n in study.sample_nums:
            for seed in study.seeds:
                cfg = from_dict(to_dict(budgeted))
                cfg.op.name = op
                cfg.op.params = dict(study.op_params.get(op, {}))
                cfg.loss.form = resolve_form(op, study.loss_forms.get(op, "auto"))
                if chosen and p is not None and n in chosen.get(op, {}):
                    cfg.op.params[p[0]] = chosen[op][n]
                lr = (chosen_lr or {}).get(op, {}).get(n)
                if lr is not None:
                    cfg.optim.lr = float(lr)
                value = (p[0], cfg.op.params.get(p[0], p[1])) if p else ()
                name = trial_name(op, n, seed, *value)
                if lr is not None:  # the lr in the name too: a new lr, a new trial directory
                    name = name.rsplit("-s", 1)[0] + f"-lr{lr:g}-s{seed}"
                cfg.data.sample_num = n
                cfg.run.seed, cfg.run.name = seed, name
                cfg.run.output_dir = str(out_root / "trials" / name)
                if plan is not None:
                    plan(cfg, op, n)
                trials.append({"trial": name, "phase": "final", "op": op,
                               "loss_form": cfg.loss.form, "sample_num": n, "seed": seed,
                               "lr": cfg.optim.lr, "train": to_dict(cfg)})
    return trials


def earlier_ns(study: StudyConfig) -> list[int]:
    """The sample_nums the study's row log holds trials of, other than study.sample_nums."""
    logged = {int(r["sample_num"]) for ph in ("select", "final")
              for r in logged_rows(study, ph).values()}
    return sorted(logged - set(study.sample_nums))


def check_earlier(study: StudyConfig, base: TrainConfig, earlier: list[int],
                  plan: Callable[[TrainConfig, str, int], None] | None) -> None:
    """Before anything runs: the budgets of the ``earlier`` N's trials, which the reports
    rebuild to find them in the row log, can be rebuilt (study.slowest_steps has them, the step
    table has every method there); ConfigError naming the key otherwise."""
    if not earlier or plan is None:
        return
    missing = [n for n in earlier if n not in study.slowest_steps]
    if missing:
        raise ConfigError(
            f"study.slowest_steps has no entry for sample_num {missing}, which "
            f"{row_log(study)} holds trials of: give the steps those trials ran with "
            f"(e.g. study.slowest_steps={{{missing[0]}: 300, ...}}) or another results_dir")
    trial_configs(replace(study, sample_nums=earlier), base, None, None, plan)


def logged_finals(
    study: StudyConfig,
    base: TrainConfig,
    sample_nums: list[int],
    chosen: dict[str, dict[int, float]] | None = None,
    chosen_lr: dict[str, dict[int, float]] | None = None,
    plan: Callable[[TrainConfig, str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """The row log's final trials at ``sample_nums`` that this study, with these chosen values,
    would run (matched by configuration digest): an earlier N's results, without a trial
    whose setting the selection has since moved away from or that another config trained.
    Warns (stderr) about an N whose logged final trials all fail to match."""
    if not sample_nums:
        return []
    done = logged_rows(study, "final")
    want = trial_configs(replace(study, sample_nums=list(sample_nums)), base, chosen, chosen_lr,
                         plan)
    found = [done[d] for d in (config_digest(t["train"]) for t in want) if d in done]
    left = sorted({int(r["sample_num"]) for r in done.values()} & set(sample_nums)
                  - {int(r["sample_num"]) for r in found})
    if left:
        print(f"[raytopk] warning: {row_log(study)} holds final trials at sample_num {left}, "
              "but none with the configuration this study gives them (another step table, "
              "seeds, budget or choice?): the reports leave those N out", file=sys.stderr,
              flush=True)
    return found


def _trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one training run under the study's budget."""
    import ray.tune

    from raytopk.train.driver import run

    t0 = time.perf_counter()
    config = config["trial"]  # the grid_search value: one trial config
    cfg = from_dict(config["train"])
    base = {k: config[k] for k in ("trial", "phase", "op", "sample_num", "seed", "round",
                                   "completes")
            if k in config}  # fmt: skip
    base["loss_form"] = config.get("loss_form", cfg.loss.form)
    base.update({k: config[k] for k in ("param", "value") if k in config})
    base["lr"] = cfg.optim.lr
    base["max_samples"] = cfg.run.max_samples  # the compute-matched steps x batch, if set
    base["num_candidates"] = schema.N_OWN + config["sample_num"]
    base["budget_seconds"] = cfg.run.max_train_seconds
    base["op_params"] = json.dumps(cfg.op.params, sort_keys=True)
    base["node"] = ray_env.node_id()
    stages = len(cfg.model.stages)
    n, budget = base["num_candidates"], config["mem_budget_gb"]
    if not step_fits(cfg.op.name, cfg.data.batch_size, n, stages, budget):
        need = step_bytes(cfg.op.name, cfg.data.batch_size, n, stages)
        ray.tune.report({
            **base,
            "status": f"does not fit: a training step needs ~{need / 1024**3:.1f} GiB for "
            f"{cfg.op.name} > study.mem_budget_gb={config['mem_budget_gb']:g}",
            "step_gib": round(need / 1024**3, 2),
            "wall_seconds": round(time.perf_counter() - t0, 3),
        })
        return

    def forward(report: Any) -> None:  # local backend: the loop's reports to Tune
        m = report.metrics()
        ray.tune.report({k: v for k, v in m.items() if isinstance(v, int | float | str)})

    try:
        if cfg.run.backend == "local":
            final = run(cfg, verbose=False, on_report=forward)
        else:
            final = run(cfg, callbacks=[ray_env.tune_report_callback()], verbose=False)
        status = "ok"
    except Exception as e:  # recorded per trial: the study goes on
        final, status = {}, f"failed: {type(e).__name__}: {str(e)[:300]}"
    seen, secs = final.get("samples_seen", 0), final.get("train_seconds", 0.0)
    step = float(final.get("max_step_seconds", 0.0))
    if status == "ok" and cfg.run.max_train_seconds > 0 and step > cfg.run.max_train_seconds:
        status = (f"does not fit: one training step took {step:.1f} s > the budget "
                  f"{cfg.run.max_train_seconds:g} s")
    wall = time.perf_counter() - t0
    evals = float(final.get("valid_eval_seconds", 0.0)) + float(final.get("eval_seconds", 0.0))
    row = {
        **base,
        "status": status,
        "samples_seen": seen,
        "train_seconds": secs,
        "samples_per_second": round(seen / secs, 2) if secs else 0.0,
        "steady_samples_per_s": final.get("steady_samples_per_s", 0.0),
        "max_step_seconds": step,
        "eval_seconds": round(evals, 3),
        # Everything but training and evaluation: the trial's start-up (a TorchTrainer's start
        # with the Ray backend), data warm-up, day boundaries, checkpoints.
        "overhead_seconds": round(max(0.0, wall - secs - evals), 3),
        "wall_seconds": round(wall, 3),
        "anytime_curve": final.get("anytime_curve", []),
        "init_param_digest": final.get("init_param_digest", ""),
    }
    for key, value in final.items():
        if key in metric_keys(stages) or key.startswith(("corpus_recall@", "valid_joint")):
            row[key] = value
    ray.tune.report(row)


def resolve_base(study: StudyConfig, base: TrainConfig, out: Path) -> TrainConfig:
    """The base config every trial starts from: data resolved once (synthetic data generated
    now, not by every trial), the last training day held out as run.valid_day. No Ray."""
    from raytopk.train.driver import prepare

    probe = from_dict(to_dict(base))
    probe.run.output_dir = str(out / "_base")  # never trained: only validated
    prep = prepare(probe)
    base = from_dict(to_dict(base))
    base.data.path = prep.cfg.data.path
    base.data.synthetic.enabled = False
    base.data.train_days = prep.cfg.data.train_days
    base.data.test_day = prep.cfg.data.test_day
    return split_validation(base)


def run_study(study: StudyConfig, base: TrainConfig, *, verbose: bool = True) -> list[dict]:
    """Run (or continue) the study on the connected Ray cluster: selection on the validation
    day, then the final trials; returns the final rows and writes the reports. Each run's
    wall-clock window (start, end, how it ended, trials it logged) is appended to the run log
    (experiments.RUN_LOG beside the row log), so the study's total wall time is on record."""
    import datetime
    import socket

    from raytopk.tune.experiments import RUN_LOG, StudyInterrupted, log_run, read_log, row_log

    def now() -> str:
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    started = now()
    try:
        before = len(read_log(row_log(study)))
    except ValueError:
        before = 0  # a corrupt row log: _run_study names it
    status = "failed"
    try:
        rows = _run_study(study, base, verbose=verbose)
        status = "finished"
        return rows
    except StudyInterrupted:
        status = "interrupted"
        raise
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e!r}"[:300]
        raise
    finally:
        try:  # never in place of the run's own outcome (an interruption, an error)
            log_run(study, {"started": started, "ended": now(), "status": status,
                            "sample_nums": list(study.sample_nums),
                            "host": socket.gethostname(),
                            "rows_logged": len(read_log(row_log(study))) - before})
        except Exception as e:  # noqa: BLE001
            print(f"[raytopk] warning: could not log this run's window in "
                  f"{row_log(study).with_name(RUN_LOG)}: {e!r}", file=sys.stderr)


def _run_study(study: StudyConfig, base: TrainConfig, *, verbose: bool = True) -> list[dict]:
    import ray
    import ray.tune

    out = Path(study.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = results_path(study)
    results.mkdir(parents=True, exist_ok=True)
    base = resolve_base(study, base, out)
    stages = len(base.model.stages)
    cluster = ray.cluster_resources()
    use_gpu = base.scaling.use_gpu is True or (
        base.scaling.use_gpu == "auto" and cluster.get("GPU", 0) > 0
    )
    local = study.trial_backend == "local"
    plan = plan_resources(
        cluster,
        num_workers=study.workers_per_trial,
        cpus_per_worker=study.cpus_per_worker if study.cpus_per_worker > 0 else "auto",
        use_gpu=use_gpu,
        trial_cpu=0.0 if local else _TRIAL_CPU,
        concurrent=study.max_concurrent,
        max_cpus_per_worker=1.0,
        ray_data=not local,  # local trials read their days themselves, without Ray Data
    )
    per, conc = plan.cpus_per_worker, plan.concurrent
    base.scaling.cpus_per_worker = per
    # Local trials train in the trial's own process: it holds the worker's resources.
    own = {"cpu": per, **({"gpu": 1} if use_gpu else {})} if local else {"cpu": _TRIAL_CPU}
    trainable = ray.tune.with_resources(_trial_fn, {**own, **study.trial_resources})
    # N that an earlier run of this study logged (other study.sample_nums, same row log): the
    # reports cover them too, so a run per N leaves one set of files for the whole study.
    earlier = earlier_ns(study)
    covered = {**asdict(study), "sample_nums": sorted({*study.sample_nums, *earlier})}
    (results / "study.yaml").write_text(
        yaml.safe_dump({"study": covered, "train": to_dict(base)}, sort_keys=False)
    )
    ops = study_ops(study, base)
    if verbose:
        print(
            f"[raytopk] study {study.name}: ops {ops}, N offsets {study.sample_nums}, seeds "
            f"{study.seeds}, budget "
            + (f"{study.budget_seconds:g} s/worker" if not study.step_table else
               f"steps from {study.step_table} (slowest {study.slowest_steps})")
            + f", {conc} concurrent, "
            f"{study.trial_backend} trials of {study.workers_per_trial} worker(s) x {per:g} CPU"
            f"{' + GPU' if use_gpu else ''}; train {base.data.train_days[0]}.."
            f"{base.data.train_days[-1]}, validation {base.run.valid_day}, test "
            f"{base.data.test_day}; output {out}",
            flush=True,
        )

    planner = compute_planner(study, base)
    plan, max_t = planner if planner is not None else (None, None)
    check_earlier(study, base, earlier, plan)
    clock = "samples_seen" if plan is not None else None
    chosen: dict[str, dict[int, float]] = {}
    chosen_lr: dict[str, dict[int, float]] = {}
    if study.select:
        seeds = study.selection_seeds
        def fits(op: str, sample_num: int) -> bool:
            n = schema.N_OWN + sample_num
            return step_fits(op, base.data.batch_size, n, stages, study.mem_budget_gb)

        joint = run_selection(study, _budgeted(study, base), ops, seeds, out, trainable,
                              conc, stages, verbose, plan, max_t, fits, results)
        chosen = chosen_values(joint)
        chosen_lr = chosen_lrs(joint) if study.lrs else {}

    trials = trial_configs(study, base, chosen, chosen_lr, plan)
    for t in trials:  # every trial config must be valid before anything runs
        validate(from_dict(t["train"]))
        t["mem_budget_gb"] = study.mem_budget_gb
    if plan is not None:
        check_streaming(trials, base)
    if verbose:
        print(f"[raytopk] final: {len(trials)} trial(s); chosen {chosen}"
              + (f", lr {chosen_lr}" if chosen_lr else ""), flush=True)
    # A trial the study's row log holds with the same training config is not run again.
    rows = run_experiment(study, f"{study.name}_final", trials, trainable, conc, None, stages,
                          verbose, clock)
    rows += logged_finals(study, base, earlier, chosen, chosen_lr, plan)
    write_reports(rows, results, stages, reference=study.reference_op)
    if plan is not None:
        from raytopk.tune.compute_results import write_compute_reports

        write_compute_reports(rows, results, study, base)
    return rows
