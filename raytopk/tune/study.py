"""The sample-scaling study (SPEC.md §6, DESIGN.md "Sample-scaling study"): operators compared at
equal compute while the training samples grow (negatives per request, requests).

Notation: a trial = one training run (operator × sample_num × seed); N = 40 + sample_num
candidates per request; the budget = training wall-clock seconds per worker (counted inside the
training loop, after start-up, excluding evaluation) and/or a cap on training requests.

Each trial is a Ray Tune function trainable that builds and fits a TorchTrainer through
``raytopk.train.driver.run`` (the Train V2 pattern of RAY_NOTES.md), with Train's reports
forwarded to Tune by ``TuneReportCallback`` and the final test-day metrics reported by the trial
function itself. A trial that cannot run (an O(N²) operator whose soft permutation matrices would
not fit the memory budget, or any error) is recorded with its reason, not dropped.

Outputs in ``study.output_dir``: ``results.csv`` (one row per trial), ``results.md`` (per
sample_num, operators ranked by joint recall, mean ± std over seeds), and plots. Re-running the
same command continues the study (Tune restore): finished trials are not redone, an interrupted
trial resumes from its own last checkpoint (its run.output_dir is fixed by op/sample_num/seed).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytopk import ray_env
from raytopk.data import schema
from raytopk.metrics import headline_key, metric_keys
from raytopk.train.config import ConfigError, TrainConfig, from_dict, load_schema, to_dict, validate
from raytopk.train.resources import plan_resources

__all__ = [
    "StudyConfig",
    "load_study",
    "trial_configs",
    "step_bytes",
    "run_study",
    "write_reports",
    "RESULT_COLUMNS",
]

_TRIAL_COLUMNS = (
    "trial",
    "op",
    "loss_form",
    "sample_num",
    "num_candidates",
    "seed",
    "status",
    "samples_seen",
    "train_seconds",
    "samples_per_second",
    "budget_seconds",
)
_TAIL_COLUMNS = ("node", "wall_seconds")


def result_columns(num_stages: int = 2) -> tuple[str, ...]:
    """results.csv's columns before the corpus_recall@10@<M> ones: the trial's identity and
    budget, then the test-day metrics of a ``num_stages`` cascade (raytopk.metrics)."""
    return (*_TRIAL_COLUMNS, *metric_keys(num_stages))


RESULT_COLUMNS = result_columns(2)


@dataclass
class StudyConfig:
    """The ``study:`` section of a study YAML; the ``train:`` section is a TrainConfig."""

    # Empty: every registered operator and the bce baseline (raytopk.losses.list_methods()).
    ops: list[str] = field(default_factory=list)
    sample_nums: list[int] = field(default_factory=lambda: [0, 40, 160, 640])
    seeds: list[int] = field(default_factory=lambda: [42])
    # Operator parameters per op ({op: {param: value}}); missing: the registry's RecFlow default.
    op_params: dict[str, dict[str, float]] = field(default_factory=dict)
    # Loss form per op ({op: form}, raytopk.losses.forms); missing: the form chosen for the op.
    loss_forms: dict[str, str] = field(default_factory=dict)
    budget_seconds: float = 60.0  # training seconds per worker per trial (equal compute)
    max_samples: int = 0  # optional cap on training requests per trial (0: none)
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.0  # 0: derived from the cluster (Ray Data keeps >= 1 CPU)
    max_concurrent: int = 0  # 0: derived from the cluster's CPUs (GPUs when trials use them)
    # Extra custom resources per trial function, e.g. {"study_slot": 1} with one slot per node
    # to run one trial per node.
    trial_resources: dict[str, float] = field(default_factory=dict)
    mem_budget_gb: float = 8.0  # O(N²) trials needing more (estimate) are recorded as skipped
    output_dir: str = "runs/sample_scaling"
    storage_path: str = ""  # Tune's storage (shared storage on a cluster); empty: output_dir/tune
    name: str = "sample_scaling"


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
    _check_study(f.study)
    return f.study, f.train


def _check_study(s: StudyConfig) -> None:
    from raytopk.losses import list_methods, resolve_form

    for key, ops in (("ops", s.ops), ("op_params", s.op_params), ("loss_forms", s.loss_forms)):
        for op in (op for op in ops if op not in list_methods()):
            raise ConfigError(f"study.{key}: unknown operator {op!r}; valid: {list_methods()}")
    for op, form in s.loss_forms.items():
        try:
            resolve_form(op, form)
        except ValueError as e:
            raise ConfigError(f"study.loss_forms.{op}: {e}") from e
    if not s.sample_nums or any(not isinstance(n, int) or n < 0 for n in s.sample_nums):
        raise ConfigError(f"study.sample_nums should be ints >= 0 but got {s.sample_nums}")
    if not s.seeds:
        raise ConfigError("study.seeds should list at least one seed")
    if not (s.budget_seconds > 0 or s.max_samples > 0):
        raise ConfigError(
            f"study.budget_seconds={s.budget_seconds} and study.max_samples={s.max_samples}: "
            "set at least one budget (equal compute needs one)"
        )
    if s.workers_per_trial < 1:
        raise ConfigError(f"study.workers_per_trial should be >= 1 but got {s.workers_per_trial}")


_TRIAL_CPU = 0.1  # the CPU of a trial's own function (Tune rejects 0), beside its workers


def trial_name(op: str, sample_num: int, seed: int) -> str:
    return f"{op}-n{sample_num}-s{seed}"


def step_bytes(op: str, batch_size: int, num_candidates: int, num_stages: int = 2) -> int:
    """Peak bytes of one training step's operator work: every stage runs the operator and its
    loss on (batch_size, num_candidates) scores (the operator's own estimate, declared with it in
    the registry). Evaluation never builds soft permutations, so it needs no such estimate."""
    from raytopk.losses import is_operator
    from raytopk.ops import get_spec

    if not is_operator(op):  # the bce baseline: σ(x), its logs and their gradients
        return num_stages * 6 * batch_size * num_candidates * 4
    return num_stages * get_spec(op).step_bytes(batch_size, num_candidates)


def trial_configs(study: StudyConfig, base: TrainConfig) -> list[dict[str, Any]]:
    """One Tune config per (op, sample_num, seed): the complete, validated TrainConfig dict."""
    from raytopk.losses import list_methods, resolve_form

    out_root = Path(study.output_dir).resolve()
    trials = []
    for op in study.ops or list_methods():
        for n in study.sample_nums:
            for seed in study.seeds:
                cfg = from_dict(to_dict(base))
                name = trial_name(op, n, seed)
                cfg.op.name = op
                cfg.op.params = dict(study.op_params.get(op, {}))
                cfg.loss.form = resolve_form(op, study.loss_forms.get(op, "auto"))
                cfg.data.sample_num = n
                cfg.run.seed = seed
                cfg.run.name = name
                cfg.run.output_dir = str(out_root / "trials" / name)
                cfg.run.resume = True
                cfg.run.max_train_seconds = float(study.budget_seconds)
                cfg.run.max_samples = int(study.max_samples)
                # The budget, not the data, ends training: enough passes to spend it.
                cfg.run.epochs = max(cfg.run.epochs, 1000)
                cfg.scaling.num_workers = study.workers_per_trial
                trials.append(
                    {"trial": name, "op": op, "loss_form": cfg.loss.form, "sample_num": n,
                     "seed": seed, "train": to_dict(cfg)}
                )
    return trials


def _trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one training run under the study's budget."""
    import ray.tune

    from raytopk.train.driver import run

    t0 = time.perf_counter()
    config = config["trial"]  # the grid_search value: one entry of trial_configs()
    cfg = from_dict(config["train"])
    base = {
        "trial": config["trial"],
        "op": config["op"],
        "loss_form": config.get("loss_form", cfg.loss.form),
        "sample_num": config["sample_num"],
        "num_candidates": schema.N_OWN + config["sample_num"],
        "seed": config["seed"],
        "budget_seconds": cfg.run.max_train_seconds,
        "node": ray_env.node_id(),
    }
    stages = len(cfg.model.stages)
    need = step_bytes(cfg.op.name, cfg.data.batch_size, base["num_candidates"], stages)
    if need > config["mem_budget_gb"] * 1024**3:
        ray.tune.report(
            {
                **base,
                "status": f"skipped: a training step needs ~{need / 1024**3:.1f} GiB for "
                f"{cfg.op.name} > study.mem_budget_gb={config['mem_budget_gb']:g}",
                "wall_seconds": round(time.perf_counter() - t0, 3),
            }
        )
        return
    try:
        final = run(cfg, callbacks=[ray_env.tune_report_callback()], verbose=False)
        status = "ok"
    except Exception as e:  # recorded per trial: the study goes on
        final, status = {}, f"failed: {type(e).__name__}: {str(e)[:300]}"
    seen = final.get("samples_seen", 0)
    secs = final.get("train_seconds", 0.0)
    row = {
        **base,
        "status": status,
        "samples_seen": seen,
        "train_seconds": secs,
        "samples_per_second": round(seen / secs, 2) if secs else 0.0,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    for key, value in final.items():
        if key in metric_keys(stages) or key.startswith("corpus_recall@"):
            row[key] = value
    ray.tune.report(row)


def run_study(study: StudyConfig, base: TrainConfig, *, verbose: bool = True) -> list[dict]:
    """Run (or continue) the study on the connected Ray cluster; returns the result rows and
    writes results.csv, results.md and the plots into study.output_dir."""
    import ray
    import ray.tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from raytopk.train.driver import prepare

    out = Path(study.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Resolve the dataset once here (synthetic data is generated now, not by every trial) and
    # validate the base config before any trial starts.
    probe = from_dict(to_dict(base))
    probe.run.output_dir = str(out / "_base")  # never trained: only validated
    prep = prepare(probe)
    base = from_dict(to_dict(base))
    base.data.path = prep.cfg.data.path
    base.data.synthetic.enabled = False
    base.data.train_days = prep.cfg.data.train_days
    base.data.test_day = prep.cfg.data.test_day

    stages = len(base.model.stages)
    cluster = ray.cluster_resources()
    use_gpu = base.scaling.use_gpu is True or (
        base.scaling.use_gpu == "auto" and cluster.get("GPU", 0) > 0
    )
    plan = plan_resources(
        cluster,
        num_workers=study.workers_per_trial,
        cpus_per_worker=study.cpus_per_worker if study.cpus_per_worker > 0 else "auto",
        use_gpu=use_gpu,
        trial_cpu=_TRIAL_CPU,
        concurrent=study.max_concurrent,
        max_cpus_per_worker=1.0,
    )
    per, conc = plan.cpus_per_worker, plan.concurrent
    base.scaling.cpus_per_worker = per
    trials = trial_configs(study, base)
    for t in trials:  # every trial config must be valid before anything runs
        validate(from_dict(t["train"]))
        t["mem_budget_gb"] = study.mem_budget_gb
    (out / "study.yaml").write_text(
        yaml.safe_dump({"study": asdict(study), "train": to_dict(base)}, sort_keys=False)
    )
    if verbose:
        print(
            f"[raytopk] study {study.name}: {len(trials)} trial(s), budget "
            f"{study.budget_seconds:g} s/worker, {conc} concurrent, {study.workers_per_trial} "
            f"worker(s) x {per:g} CPU each{' + GPU' if use_gpu else ''}, output {out}",
            flush=True,
        )

    storage = Path(study.storage_path).resolve() if study.storage_path else out / "tune"
    exp_dir = storage / study.name
    trainable = ray.tune.with_resources(
        _trial_fn, {"cpu": _TRIAL_CPU, **study.trial_resources}
    )
    if Tuner.can_restore(str(exp_dir)):
        if verbose:
            print(f"[raytopk] continuing the study in {exp_dir}", flush=True)
        tuner = Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = Tuner(
            trainable,
            param_space={"trial": ray.tune.grid_search(trials)},
            tune_config=TuneConfig(max_concurrent_trials=conc),
            run_config=RunConfig(name=study.name, storage_path=str(storage), verbose=0),
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        t = (result.config or {}).get("trial") or {}
        if "status" not in m:  # the trial died before its final report
            err = str(result.error)[:300] if result.error else "no final report"
            m = {
                "trial": t.get("trial", ""),
                "op": t.get("op", ""),
                "loss_form": t.get("loss_form", ""),
                "sample_num": t.get("sample_num", ""),
                "seed": t.get("seed", ""),
                "status": f"failed: {err}",
            }
        keep = set(_columns([m], stages))
        rows.append({k: v for k, v in m.items() if k in keep})
    rows.sort(
        key=lambda r: (str(r.get("op")), int(r.get("sample_num") or 0), int(r.get("seed") or 0))
    )
    write_reports(rows, out, stages)
    return rows


def _columns(rows: list[dict[str, Any]], num_stages: int = 2) -> list[str]:
    corpus = sorted(
        {k for r in rows for k in r if k.startswith("corpus_recall@")},
        key=lambda k: int(k.rsplit("@", 1)[-1]),
    )
    return [*result_columns(num_stages), *corpus, *_TAIL_COLUMNS]


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def write_reports(
    rows: list[dict[str, Any]], out: str | Path, num_stages: int = 2
) -> dict[str, Path]:
    """results.csv, results.md and the plots from the trial rows; written atomically. The
    headline is the joint recall of a ``num_stages`` cascade (raytopk.metrics.headline_key)."""
    out = Path(out)
    cols = _columns(rows, num_stages)
    head = headline_key(num_stages)
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    os.replace(tmp, out / "results.csv")

    md = ["# Sample scaling at equal compute", ""]
    ok = [r for r in rows if r.get("status") == "ok"]
    for n in sorted({int(r["sample_num"]) for r in rows if r.get("sample_num") != ""}):
        md += [
            f"## sample_num = {n} (N = {schema.N_OWN + n} candidates per request)",
            "",
            f"| rank | op | {head} | samples seen | samples/s | seeds |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        by_op: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            if int(r["sample_num"]) == n:
                form = f" ({r['loss_form']})" if r.get("loss_form") else ""
                by_op.setdefault(f"{r['op']}{form}", []).append(r)  # the loss form beside it
        stats = []
        for op, rs in by_op.items():
            jm, js = _mean_std([float(r[head]) for r in rs])
            sm, ss = _mean_std([float(r["samples_seen"]) for r in rs])
            tp, _ = _mean_std([float(r["samples_per_second"]) for r in rs])
            stats.append((jm, js, sm, ss, tp, op, len(rs)))
        stats.sort(key=lambda s: -s[0])
        for i, (jm, js, sm, ss, tp, op, cnt) in enumerate(stats, 1):
            md.append(
                f"| {i} | {op} | {jm:.4f} ± {js:.4f} | {sm:,.0f} ± {ss:,.0f} | {tp:,.1f} | {cnt} |"
            )
        for r in rows:
            if int(r.get("sample_num") or -1) == n and r.get("status") != "ok":
                md.append(f"| - | {r.get('op')} | {r.get('status')} | | | |")
        md.append("")
    (out / "results.md").write_text("\n".join(md))
    paths = {"csv": out / "results.csv", "md": out / "results.md"}
    paths.update(_plots(ok, out, head))
    return paths


def _plots(rows: list[dict[str, Any]], out: Path, head: str) -> dict[str, Path]:
    if not rows:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({str(r["op"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for op in ops:
        rs = sorted((r for r in rows if r["op"] == op), key=lambda r: int(r["sample_num"]))
        ns = sorted({int(r["sample_num"]) for r in rs})

        def avg(key: str, n: int, rs: list[dict[str, Any]] = rs) -> float:
            return _mean_std([float(r[key]) for r in rs if int(r["sample_num"]) == n])[0]

        axes[0].plot(
            [float(r["samples_seen"]) for r in rs],
            [float(r[head]) for r in rs],
            "o",
            label=op,
        )
        axes[1].plot(
            [schema.N_OWN + n for n in ns],
            [avg("samples_per_second", n) for n in ns],
            "o-",
            label=op,
        )
        axes[2].plot(ns, [avg(head, n) for n in ns], "o-", label=op)
    axes[0].set(
        xlabel="training requests seen",
        ylabel=head,
        title="joint recall vs samples seen",
    )
    axes[1].set(
        xlabel="candidates per request N",
        ylabel="training requests / s",
        title="throughput per operator",
        yscale="log",
    )
    axes[2].set(
        xlabel="sampled negatives per request",
        ylabel=head,
        title="joint recall at equal budget",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    png = out / "sample_scaling.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"png": png}
