"""Training configuration: typed dataclasses are the schema; YAML and ``key=value`` override them.

The run is described by one :class:`TrainConfig` with seven sections (data, model, op, loss,
optim, scaling, run). Defaults follow the paper's RecFlow protocol (SPEC.md §4.4: embedding dim 8,
batch 1024 requests, Adam lr 1e-2 for the models and the loss weights, seed 42), so a YAML file
only states what differs.

Loading order: dataclass defaults <- YAML file <- command-line ``key=value`` overrides with dotted
keys (``op.name=lapsum op.params.alpha=5 run.output_dir=/tmp/x``). Unknown keys are rejected with
the list of valid ones; values are converted to the field's type (``"1e-2"`` -> 0.01,
``"[1,2]"`` -> [1, 2], ``"true"`` -> True). :func:`validate` checks the values that need no data
(operator registered, scorer kinds, per-stage k, sizes); checks against the dataset itself (path,
days) happen in :mod:`raytopk.train.driver` before any training starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "SyntheticConfig",
    "ModelConfig",
    "OpConfig",
    "LossConfig",
    "OptimConfig",
    "ScalingConfig",
    "RunConfig",
    "TrainConfig",
    "SCORER_KINDS",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_overrides",
    "valid_keys",
    "validate",
    "expand_days",
    "dump_yaml",
]

from raytopk.models import SCORER_KINDS  # build_scorer kinds (DESIGN.md, Contract 3)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the value."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps dates as text: ``2024-13-01`` must reach the day check as a string
    (PyYAML's timestamp resolver would raise a bare ValueError), and days are strings anyway."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


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
    sample_num: int = 0  # in-batch sampled negatives per request at training time (SPEC §4.2)
    batch_size: int = 1024  # requests per step, per worker
    eval_batch_size: int = 256  # requests per evaluation batch (N = 200 candidates each)
    prefetch_batches: int = 2  # Ray Data batches prepared ahead of the training step
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    stages: list[str] = field(default_factory=lambda: ["dssm", "din"])  # cascade, first to last
    dim: int = 8  # embedding dimension (SPEC §4.6)


@dataclass
class OpConfig:
    name: str = "dftopk"
    # The operator's own parameter by its paper's name (tau, alpha, l, steepness) and, for the
    # LCRON loss, its label-side value. Missing: the registry's RecFlow-protocol default.
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class LossConfig:
    ks: list[int] = field(default_factory=list)  # k per stage (SPEC §3.2); empty: k_truth each
    k_truth: int = 10  # K, the ground-truth top set size


@dataclass
class OptimConfig:
    lr: float = 1e-2  # Adam, for the scorers and the loss weights alike (SPEC §4.4)


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool | str = "auto"  # "auto": GPUs when the cluster has them
    # "auto": leave >= 1 CPU (a quarter of the cluster) to Ray Data, split the rest (RAY_NOTES.md:
    # Train workers holding every CPU starve Ray Data and the run hangs without an error).
    cpus_per_worker: float | str = "auto"


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""  # empty: runs/<name>
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
    epochs: int = 1  # passes over the training days (SPEC §4.4: one)
    checkpoint_every_steps: int = 0  # 0: checkpoint only at the end of every day
    keep_checkpoints: int = 2  # the most recent ones kept on disk
    report_every_steps: int = 20
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (-1: unlimited)
    seed: int = 42
    stream_eval: bool = False  # after training day d, evaluate on day d+1 (SPEC §4.4)
    corpus_ms: list[int] = field(default_factory=lambda: [100, 500])  # full-corpus Recall@10@M
    max_train_seconds: float = 0.0  # training-time budget per run; 0: none. Then evaluate.
    max_samples: int = 0  # training-sample budget (requests, all workers); 0: none
    eval_max_batches: int = 0  # cap on test batches per worker (quick checks); 0: whole day


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    op: OpConfig = field(default_factory=OpConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---- (de)serialisation ----------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``run.seed``; dict fields end in ``.<name>``."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, key + ".")
        elif typing.get_origin(tp) is dict:
            keys.append(key + ".<name>")
        else:
            keys.append(key)
    return keys


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    names = list(_hints(cls))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid_keys(cls, prefix))}"
    )


def _convert(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML or a command line) as type ``tp``; ConfigError naming key and value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        # str last: "0.5" must become a float before it could stay a string.
        for arm in sorted(typing.get_args(tp), key=lambda a: a is str):
            try:
                return _convert(key, value, arm)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r} ({' / '.join(errors)})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = _yaml_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{key}: {value!r} is not a YAML list: {e}") from e
            else:
                value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-2" as a string: accept it as a number here
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, _dt.date):  # YAML turns 2024-01-13 into a date
            return value.isoformat()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown(key, cls, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _convert(key, value, tp)
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> TrainConfig:
    """A TrainConfig from a nested mapping (YAML); unknown keys raise ConfigError."""
    return _build(TrainConfig, data, "")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a config."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]``; a malformed item raises ConfigError."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. run.seed=1)")
        out.append((key.strip(), value))
    return out


def _parse_value(text: str) -> Any:
    """Command-line value -> Python via YAML (so lists/bools/numbers work); raw text on failure."""
    try:
        return _yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[tuple[str, str]]) -> TrainConfig:
    """Set dotted keys on a copy of ``cfg``; unknown keys raise ConfigError with the valid ones."""
    data = to_dict(cfg)
    for key, text in overrides:
        parts = key.split(".")
        cls: type = TrainConfig
        node = data
        prefix = ""
        for i, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                raise _unknown(prefix + part, cls, prefix)
            tp = hints[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(
                        f"{key!r} is a section; set one of its keys: "
                        f"{', '.join(valid_keys(tp, key + '.'))}"
                    )
                node, cls, prefix = node[part], tp, prefix + part + "."
                continue
            if typing.get_origin(tp) is dict and not last:
                if i != len(parts) - 2:
                    raise ConfigError(f"{key!r}: {prefix + part} holds one level of names")
                node[part] = dict(node[part] or {})
                node[part][parts[-1]] = _parse_value(text)
                break
            if not last:
                raise ConfigError(f"{key!r}: {prefix + part} is a value, not a section")
            node[part] = _parse_value(text)
    return from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file ``path`` <- ``key=value`` overrides; then :func:`validate`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    cfg = apply_overrides(cfg, parse_overrides(overrides or []))
    return validate(cfg)


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
        raise ConfigError(f"{key} must be in date order (SPEC §4.4), got {entries!r}")
    return days


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value that needs no data; fill defaults (op param, ks, output_dir).

    Returns a new, resolved TrainConfig; raises ConfigError naming the key and value.
    """
    cfg = from_dict(to_dict(cfg))  # a copy
    from raytopk.ops import get_spec, list_ops  # registry import deferred: config stays light

    if cfg.op.name not in list_ops():
        raise ConfigError(f"op.name: unknown operator {cfg.op.name!r}; registered: {list_ops()}")
    spec = get_spec(cfg.op.name)
    params = dict(cfg.op.params)
    params.setdefault(spec.param, float(spec.default))
    cfg.op.params = params

    if not cfg.model.stages:
        raise ConfigError("model.stages must name at least one scorer, e.g. [dssm, din]")
    for i, kind in enumerate(cfg.model.stages):
        if kind not in SCORER_KINDS:
            raise ConfigError(f"model.stages[{i}]: unknown scorer {kind!r}; valid: {SCORER_KINDS}")
    _positive("model.dim", cfg.model.dim)
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

    d = cfg.data
    if not d.path and not d.synthetic.enabled:
        raise ConfigError(
            "data.path is empty: give the converted dataset directory "
            "(or set data.synthetic.enabled=true)"
        )
    cfg.data.train_days = expand_days(d.train_days)
    if d.test_day:
        if ".." in d.test_day:
            raise ConfigError(f"data.test_day must be one day YYYY-MM-DD, got {d.test_day!r}")
        expand_days([d.test_day], "data.test_day")
        if d.test_day in cfg.data.train_days:
            raise ConfigError(f"data.test_day {d.test_day} is also a training day")
    _positive("data.sample_num", d.sample_num, allow_zero=True)
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.prefetch_batches", d.prefetch_batches, allow_zero=True)
    _positive("data.synthetic.days", d.synthetic.days)
    _positive("data.synthetic.requests_per_day", d.synthetic.requests_per_day)
    _positive("optim.lr", cfg.optim.lr)

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
    for i, m in enumerate(r.corpus_ms):
        _positive(f"run.corpus_ms[{i}]", m)
    return cfg
