"""Training configuration: typed dataclasses are the schema; YAML and ``key=value`` override them.

The run is described by one :class:`TrainConfig` with seven sections (data, model, op, loss,
optim, scaling, run). Defaults follow the paper's RecFlow protocol (docs/protocol.md §4.4: embedding
dim 8, batch 1024 requests, Adam lr 1e-2 for the models and the loss weights, seed 42), so a YAML
file only states what differs.

Loading (raytopk.train.typed_config): dataclass defaults <- YAML file <- command-line
``key=value`` overrides with dotted keys (``op.name=lapsum op.params.alpha=5``), typed and checked
key by key, unknown keys rejected with the closest valid one. :func:`validate` checks the values
that need no data
(operator registered, scorer kinds, per-stage k, sizes); checks against the dataset itself (path,
days) happen in :mod:`raytopk.train.driver` before any training starts.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytopk.data import schema
from raytopk.train.typed_config import (
    ConfigError,
    apply_overrides,
    build,
    dump_yaml,
    load_schema,
    parse_overrides,
    to_dict,
    valid_keys,
)

__all__ = [
    "ConfigError",
    "check_days",
    "DataConfig",
    "SyntheticConfig",
    "ModelConfig",
    "OpConfig",
    "LossConfig",
    "OptimConfig",
    "ScalingConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "load_schema",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_overrides",
    "valid_keys",
    "validate",
    "expand_days",
    "dump_yaml",
]


@dataclass
class SyntheticConfig:
    """Generate a synthetic RecFlow-layout dataset into ``root`` when it is absent (idempotent)."""

    enabled: bool = False
    root: str = "data/synthetic"  # raw layout under root/raw, converted dataset under root/parquet
    days: int = 4  # consecutive days from schema.FIRST_DAY
    requests_per_day: int = 4000
    seed: int = 0


@dataclass
class DataConfig:
    # Converted parquet dataset (the directory holding meta.json). With synthetic.enabled it may
    # stay empty: it is set to what prepare_synthetic returns.
    path: str = ""
    # Training days in date order; an entry "A..B" is the inclusive range of days A to B.
    # Empty: every day of the dataset before test_day.
    train_days: list[str] = field(default_factory=list)
    test_day: str = ""  # empty: the last day of the dataset
    sample_num: int = 0  # in-batch negatives per request in training (docs/protocol.md §4.2)
    batch_size: int = 1024  # requests per step, per worker
    eval_batch_size: int = 256  # requests per evaluation batch (N = 200 candidates each)
    prefetch_batches: int = 2  # Ray Data batches prepared ahead of the training step
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    stages: list[str] = field(default_factory=lambda: ["dssm", "din"])  # cascade, first to last
    dim: int = 8  # embedding dimension (docs/protocol.md §4.6)
    # DIN's attention score: "auto" (the fused kernel on CPU, the plain path elsewhere), "fused"
    # (CPU only) or "reference" (the plain (B, N, L, H) path). raytopk/models/attention.py.
    attention: str = "auto"


@dataclass
class OpConfig:
    # A registered top-k operator (raytopk.ops.list_ops) or a baseline without one ("bce",
    # docs/protocol.md §3.4, no params): raytopk.losses.list_methods().
    name: str = "dftopk"
    # The operator's own parameter by its paper's name (tau, alpha, l, steepness) and, for the
    # LCRON loss, its label-side value. Missing: the registry's RecFlow-protocol default.
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class LossConfig:
    ks: list[int] = field(default_factory=list)  # k per stage (docs/protocol.md §3.2); []: k_truth
    k_truth: int = 10  # K, the ground-truth top set size
    # The form of the stage/joint terms (docs/protocol.md §3.5; raytopk.losses.forms): bce, bce_log
    # (lapsum), bce_logits (the authors' code), mse, lcron (permutation operators). "auto": the form
    # chosen for op.name by measurement; validate() writes the resolved form into the config.
    form: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-2  # Adam, for the scorers and the loss weights alike (docs/protocol.md §4.4)
    # Mixed precision of the training forward: the scorers run under bf16 autocast, the
    # operator and the loss in float32 (raytopk.train.model). "auto": bf16 on CUDA, off on CPU
    # (so CPU numerics stay exactly float32); true: bf16 on every device; false: off.
    amp: bool | str = "auto"


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool | str = "auto"  # "auto": GPUs when the cluster has them
    # "auto": leave >= 1 CPU (a quarter of the cluster) to Ray Data, split the rest (docs/ray.md
    # §5.1: Train workers holding every CPU starve Ray Data and the run hangs without an error).
    cpus_per_worker: float | str = "auto"


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""  # empty: runs/<name>
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
    epochs: int = 1  # passes over the training days (docs/protocol.md §4.4: one)
    checkpoint_every_steps: int = 0  # 0: checkpoint only at the end of every day
    keep_checkpoints: int = 2  # the most recent ones kept on disk
    report_every_steps: int = 20
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (-1: unlimited)
    seed: int = 42
    stream_eval: bool = False  # after training day d, evaluate on day d+1 (docs/protocol.md §4.4)
    corpus_ms: list[int] = field(default_factory=lambda: [100, 500])  # full-corpus Recall@10@M
    max_train_seconds: float = 0.0  # training-time budget per run; 0: none. Then evaluate.
    max_samples: int = 0  # training-sample budget (requests, all workers); 0: none
    eval_max_batches: int = 0  # cap on test batches per worker (quick checks); 0: whole day
    # torch/numba threads of the test-day evaluation after training, when the training data
    # pipeline's CPUs are idle (scoring is CPU-bound; the data take ~3% of it); 0: the training
    # threads. More threads may change the metrics' last digits (other reduction splits).
    eval_threads: int = 0
    # A held-out validation day (never trained on, never the test day); empty: none.
    valid_day: str = ""
    # Anytime curve: evaluate run.valid_day this many times, evenly over the budget
    # (max_train_seconds, else max_samples), the last at its end; evaluation time is not
    # training time. 0: none.
    eval_points: int = 0
    # Anytime points at these samples-seen counts instead of evenly over the budget (a sample
    # budget only; the study's step budgets); the end of training stays the last point.
    eval_at_samples: list[int] = field(default_factory=list)
    # Anytime points (samples seen: among eval_at_samples, or run.max_samples for the end) where
    # the test day is evaluated too: the study's equal-steps and equal-compute cut points.
    test_at_samples: list[int] = field(default_factory=list)
    # DFTopK diagnostics at every anytime point, on the last training batch: Σp/k per stage, the
    # score gradient's share on the two boundary slots, score std / τ (raytopk.train.diagnostics).
    diagnostics: bool = False
    test_eval: bool = True  # false: no test-day dataset and no test evaluation (selection)
    # "ray": Ray Train workers + Ray Data (DDP); "local": this process, no Ray (one device; a
    # debugger, a notebook, a lone GPU), the same loop, batches and outputs.
    backend: str = "ray"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    op: OpConfig = field(default_factory=OpConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def from_dict(data: dict[str, Any] | None, cls: type | None = None) -> Any:
    """A TrainConfig (or another schema dataclass ``cls``) from a nested mapping (YAML); unknown
    keys raise ConfigError naming the closest valid key."""
    return build(cls or TrainConfig, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file ``path`` <- ``key=value`` overrides; then :func:`validate`."""
    return validate(load_schema(TrainConfig, path, overrides))


# ---- validation -----------------------------------------------------------------------------


def expand_days(entries: list[str], key: str = "data.train_days") -> list[str]:
    """``["2024-01-13..2024-01-15", "2024-01-20"]`` -> the days listed, ranges expanded, ordered."""
    days: list[str] = []
    for entry in entries:
        start, sep, end = entry.partition("..")
        try:
            a = _dt.date.fromisoformat(start.strip())
            b = _dt.date.fromisoformat(end.strip()) if sep else a
        except ValueError as e:
            raise ConfigError(f"{key}: {entry!r} is not YYYY-MM-DD or A..B") from e
        if b < a:
            raise ConfigError(f"{key}: range {entry!r} ends before it starts")
        days += [(a + _dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]
    if len(set(days)) != len(days):
        raise ConfigError(f"{key} lists a day twice: {entries!r}")
    if days != sorted(days):
        raise ConfigError(f"{key} must be in date order (docs/protocol.md §4.4), got {entries!r}")
    return days


def _one_day(key: str, day: str, train_days: list[str]) -> None:
    """``key`` names one valid day YYYY-MM-DD that is not a training day (a test/validation day)."""
    if ".." in day:
        raise ConfigError(f"{key} must be one day YYYY-MM-DD, got {day!r}")
    expand_days([day], key)
    if day in train_days:
        raise ConfigError(f"{key} {day} is also a training day")


def check_days(cfg: TrainConfig) -> None:
    """The test and validation days are single days, neither a training day, and not the same
    day when the test day is evaluated. Run by ``validate`` on the days the config names, and by
    ``raytopk.train.prepare`` again once the defaults are resolved from the dataset."""
    d, r = cfg.data, cfg.run
    if d.test_day:
        _one_day("data.test_day", d.test_day, d.train_days)
    if r.valid_day:
        _one_day("run.valid_day", r.valid_day, d.train_days)
        if r.test_eval and r.valid_day == d.test_day:
            raise ConfigError(
                f"run.valid_day {r.valid_day} is the test day: validation must be another day"
            )


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value that needs no data; fill defaults (op param, ks, output_dir).

    Returns a new, resolved TrainConfig; raises ConfigError naming the key and value.
    """
    cfg = from_dict(to_dict(cfg))  # a copy
    # Deferred: importing the config (YAML, dataclasses) stays light; validation needs torch.
    from raytopk.losses.forms import is_operator, list_methods, resolve_form
    from raytopk.losses.joint import resolve_op_params
    from raytopk.models import SCORER_KINDS  # build_scorer kinds (docs/design.md, Contract: model)

    if cfg.op.name not in list_methods():
        raise ConfigError(f"op.name: unknown operator {cfg.op.name!r}; valid: {list_methods()}")
    if is_operator(cfg.op.name):
        try:  # the registry's default when absent; unknown names and bad values are errors
            cfg.op.params = resolve_op_params(cfg.op.name, cfg.op.params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"op.params of {cfg.op.name}: {e}") from e
    elif cfg.op.params:
        raise ConfigError(
            f"op.params: {cfg.op.name!r} is a baseline without an operator and takes no "
            f"parameters, got {dict(cfg.op.params)}"
        )
    try:
        cfg.loss.form = resolve_form(cfg.op.name, cfg.loss.form)
    except ValueError as e:
        raise ConfigError(f"loss.form: {e}") from e

    if not cfg.model.stages:
        raise ConfigError("model.stages must name at least one scorer, e.g. [dssm, din]")
    for i, kind in enumerate(cfg.model.stages):
        if kind not in SCORER_KINDS:
            raise ConfigError(f"model.stages[{i}]: unknown scorer {kind!r}; valid: {SCORER_KINDS}")
    _positive("model.dim", cfg.model.dim)
    from raytopk.models.attention import IMPLS

    if cfg.model.attention not in IMPLS:
        raise ConfigError(f"model.attention: {cfg.model.attention!r} is not one of {IMPLS}")
    if cfg.model.attention == "fused" and cfg.scaling.use_gpu is True:
        raise ConfigError("model.attention 'fused' is CPU-only; use 'auto' with scaling.use_gpu")
    _positive("loss.k_truth", cfg.loss.k_truth)
    if not cfg.loss.ks:
        cfg.loss.ks = [cfg.loss.k_truth] * len(cfg.model.stages)
    if len(cfg.loss.ks) != len(cfg.model.stages):
        raise ConfigError(
            f"loss.ks has {len(cfg.loss.ks)} entries {cfg.loss.ks} but model.stages has "
            f"{len(cfg.model.stages)} {cfg.model.stages}: give one k per stage"
        )
    for i, k in enumerate(cfg.loss.ks):
        _positive(f"loss.ks[{i}]", k)
    n_train = schema.N_OWN + cfg.data.sample_num
    for i, k in enumerate(cfg.loss.ks):
        if k >= n_train:
            raise ConfigError(
                f"loss.ks[{i}]={k}: stage {i} would keep all {n_train} candidates of a training "
                f"request (N = {schema.N_OWN} + data.sample_num {cfg.data.sample_num}), so its "
                "top-k selects nothing; give k < N"
            )
        if i and k > cfg.loss.ks[i - 1]:
            raise ConfigError(
                f"loss.ks={cfg.loss.ks}: stage {i} keeps {k} but stage {i - 1} hands it only "
                f"{cfg.loss.ks[i - 1]}; a cascade's k must not grow from stage to stage"
            )

    d = cfg.data
    if not d.path and not d.synthetic.enabled:
        raise ConfigError(
            "data.path is empty: give the converted dataset directory "
            "(or set data.synthetic.enabled=true)"
        )
    cfg.data.train_days = expand_days(d.train_days)
    check_days(cfg)
    _positive("data.sample_num", d.sample_num, allow_zero=True)
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.prefetch_batches", d.prefetch_batches, allow_zero=True)
    _positive("data.synthetic.days", d.synthetic.days)
    _positive("data.synthetic.requests_per_day", d.synthetic.requests_per_day)
    _positive("optim.lr", cfg.optim.lr)
    if isinstance(cfg.optim.amp, str) and cfg.optim.amp != "auto":
        raise ConfigError(f"optim.amp must be auto, true or false, got {cfg.optim.amp!r}")

    s = cfg.scaling
    _positive("scaling.num_workers", s.num_workers)
    if isinstance(s.use_gpu, str) and s.use_gpu != "auto":
        raise ConfigError(f"scaling.use_gpu must be auto, true or false, got {s.use_gpu!r}")
    if isinstance(s.cpus_per_worker, str):
        if s.cpus_per_worker != "auto":
            raise ConfigError(
                f"scaling.cpus_per_worker must be auto or a number, got {s.cpus_per_worker!r}"
            )
    else:
        _positive("scaling.cpus_per_worker", s.cpus_per_worker)

    r = cfg.run
    if not r.name or "/" in r.name:
        raise ConfigError(f"run.name must be a non-empty name without '/', got {r.name!r}")
    if not r.output_dir:
        r.output_dir = str(Path("runs") / r.name)
    _positive("run.epochs", r.epochs)
    _positive("run.report_every_steps", r.report_every_steps)
    _positive("run.checkpoint_every_steps", r.checkpoint_every_steps, allow_zero=True)
    _positive("run.keep_checkpoints", r.keep_checkpoints)
    if r.max_failures < -1:
        raise ConfigError(f"run.max_failures must be >= -1 (-1: unlimited), got {r.max_failures}")
    _positive("run.max_train_seconds", r.max_train_seconds, allow_zero=True)
    _positive("run.max_samples", r.max_samples, allow_zero=True)
    _positive("run.eval_max_batches", r.eval_max_batches, allow_zero=True)
    _positive("run.eval_threads", r.eval_threads, allow_zero=True)
    _positive("run.eval_points", r.eval_points, allow_zero=True)
    if r.eval_points and not r.valid_day:
        raise ConfigError(f"run.eval_points={r.eval_points} needs run.valid_day (a held-out day)")
    if r.eval_points and not (r.max_train_seconds > 0 or r.max_samples > 0):
        raise ConfigError(
            f"run.eval_points={r.eval_points} needs a budget to spread them over: "
            "run.max_train_seconds or run.max_samples"
        )
    _check_points(r)
    if r.backend not in ("ray", "local"):
        raise ConfigError(f"run.backend must be ray or local, got {r.backend!r}")
    for i, m in enumerate(r.corpus_ms):
        _positive(f"run.corpus_ms[{i}]", m)
    return cfg


def _check_points(r: RunConfig) -> None:
    """run.eval_at_samples / test_at_samples / diagnostics: explicit anytime points need a
    sample budget and a validation day, and each test point must be one of them (or the end)."""
    for key in ("eval_at_samples", "test_at_samples"):
        vals = getattr(r, key)
        for i, v in enumerate(vals):
            _positive(f"run.{key}[{i}]", v)
        if vals and not (r.max_samples > 0 and r.max_train_seconds == 0):
            raise ConfigError(
                f"run.{key} counts samples: it needs run.max_samples > 0 and no "
                f"run.max_train_seconds (got {r.max_samples} and {r.max_train_seconds})"
            )
        if any(v > r.max_samples for v in vals):
            raise ConfigError(
                f"run.{key} {vals}: every point should be <= run.max_samples {r.max_samples}"
            )
    if (r.eval_at_samples or r.diagnostics) and not r.valid_day:
        raise ConfigError("run.eval_at_samples and run.diagnostics need run.valid_day")
    if r.test_at_samples and not r.test_eval:
        raise ConfigError("run.test_at_samples needs run.test_eval (the test day's dataset)")
    points = set(r.eval_at_samples) | {r.max_samples}
    extra = sorted(set(r.test_at_samples) - points)
    if extra:
        raise ConfigError(
            f"run.test_at_samples {extra} are not anytime points: list them in "
            f"run.eval_at_samples (or use run.max_samples, the end)"
        )
