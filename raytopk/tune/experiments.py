"""The study's Ray Tune experiments: run or continue one, and find the trials an earlier one ran.

A study (raytopk.tune.study) is a few Tune experiments in ``storage_dir(study)``: the selection
grid (``{name}_select``), its edge-extension rounds (``{name}_select_ext{r}``) and the final
trials (``{name}_final_{tag}``, tag = a hash of the trials it runs). A trial is identified by
what it trains, ``config_digest`` of its TrainConfig dict (name and output directory left out):
a final trial whose digest an earlier experiment already ran to a result is not run again, so
a selection round that changes some operators' values re-runs only their trials, and an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raytopk.metrics import headline_key
from raytopk.train.anytime import valid_metric

__all__ = ["config_digest", "storage_dir", "run_experiment", "earlier_final_rows", "final_tag"]


def config_digest(train: dict[str, Any]) -> str:
    """What a trial trains, as a short hash of its TrainConfig dict without its run name and
    output directory: two trials with one digest are the same training run."""
    d = json.loads(json.dumps(train, sort_keys=True, default=str))
    d.get("run", {}).pop("name", None)
    d.get("run", {}).pop("output_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def final_tag(trials: list[dict[str, Any]]) -> str:
    """The final experiment's tag: a hash of the digests of the trials it runs."""
    digests = " ".join(sorted(config_digest(t["train"]) for t in trials))
    return hashlib.sha256(digests.encode()).hexdigest()[:8]


def storage_dir(study: Any) -> Path:
    """Tune's storage: study.storage_path (shared storage on a cluster), else output_dir/tune."""
    if study.storage_path:
        return Path(study.storage_path).resolve()
    return Path(study.output_dir).resolve() / "tune"


def earlier_final_rows(study: Any, trainable: Any) -> dict[str, dict[str, Any]]:
    """{config digest: final row} of every final trial that ran to a result (ok, or recorded as
    not fitting) in this study's earlier final experiments: ``{name}_final_*``, and ``{name}``
    (the final experiment's name before it was tagged)."""
    from ray.tune import Tuner

    storage, out = storage_dir(study), {}
    if not storage.is_dir():
        return out
    for exp in sorted(storage.iterdir()):
        if exp.name != study.name and not exp.name.startswith(f"{study.name}_final_"):
            continue
        if not Tuner.can_restore(str(exp)):
            continue
        for result in Tuner.restore(str(exp), trainable=trainable).get_results():
            m, t = dict(result.metrics or {}), (result.config or {}).get("trial") or {}
            if "train" in t and str(m.get("status", "")).startswith(("ok", "does not fit")):
                out[config_digest(t["train"])] = m
    return out


def run_experiment(study: Any, name: str, trials: list[dict[str, Any]], trainable: Any,
                   conc: int, scheduler: Any, stages: int, verbose: bool) -> list[dict[str, Any]]:
    """Run (or continue: Tune restore of the experiment ``name``) one Tune experiment over
    ``trials``; one row per trial, a trial without a final report recorded with why."""
    import ray.tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    exp_dir = storage_dir(study) / name
    if Tuner.can_restore(str(exp_dir)):
        if verbose:
            print(f"[raytopk] continuing the study in {exp_dir}", flush=True)
        tuner = Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = Tuner(
            trainable,
            param_space={"trial": ray.tune.grid_search(trials)},
            tune_config=TuneConfig(max_concurrent_trials=conc, scheduler=scheduler),
            run_config=RunConfig(name=name, storage_path=str(exp_dir.parent), verbose=0),
        )
    rows = []
    clock = "samples_seen" if study.budget_seconds <= 0 else "train_seconds"
    for result in tuner.fit():
        m = dict(result.metrics or {})
        t = (result.config or {}).get("trial") or {}
        if "status" not in m:  # no final report: stopped early by ASHA, or died
            head = valid_metric(headline_key(stages))
            if result.error is None and head in m:
                why = (f"stopped early (ASHA) at {clock}={float(m.get(clock, 0)):g} with "
                       f"{head}={float(m[head]):.4f}")
            else:
                why = "failed: " + (str(result.error)[:300] if result.error else "no final report")
            last = {k: m[k] for k in (clock, head) if k in m and result.error is None}
            ident = ("trial", "phase", "op", "loss_form", "sample_num", "seed", "param",
                     "value")
            m = {**{k: t.get(k, "") for k in ident}, **last, "status": why}
        rows.append(m)
    rows.sort(key=lambda r: (str(r.get("op")), int(r.get("sample_num") or 0),
                             float(r.get("value") or 0), int(r.get("seed") or 0)))
    return rows
