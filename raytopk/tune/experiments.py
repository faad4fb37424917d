"""The study's Ray Tune experiments: run or continue one, and find the trials an earlier one ran.

A study (raytopk.tune.study) is a few Tune experiments in ``storage_dir(study)``: the selection
grid, its edge-extension rounds and the final trials, each named with a hash of the trials it
runs. A trial is identified by what it trains, ``config_digest`` of its TrainConfig dict (name
and output directory left out). Every trial's row is appended to the study's row log
(``trials.jsonl`` in study.results_dir) the moment the trial ends; a trial whose digest the log
holds is never run again. The log is the study's state: committed with the results, it lets a
re-run on a fresh clone (no Tune directories) continue where the study stopped, and a selection
round that changes some operators' values re-runs only their trials.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from raytopk.metrics import headline_key
from raytopk.progress import Progress
from raytopk.train.anytime import valid_metric

__all__ = [
    "ROW_LOG",
    "RUN_LOG",
    "RowLogger",
    "StudyInterrupted",
    "config_digest",
    "final_tag",
    "log_run",
    "logged_rows",
    "ran_to_result",
    "read_log",
    "results_path",
    "row_log",
    "split_logged",
    "run_experiment",
    "storage_dir",
]


# Config keys added after studies logged results, with the default that reproduces the earlier
# behaviour: left out of the digest at that default, so a new key does not orphan every row
# logged before it existed (a trial setting another value gets another digest).
ADDED_KEYS: dict[tuple[str, str], Any] = {("run", "eval_threads"): 0}


def config_digest(train: dict[str, Any]) -> str:
    """What a trial trains, as a short hash of its TrainConfig dict without where things are on
    this machine (run name, output directory, the dataset's path and the synthetic data's root:
    synthetic data is identified by its generator settings, which stay in) and without the keys
    of ``ADDED_KEYS`` at their defaults: two trials with one digest are the same training run,
    on this machine or a fresh clone elsewhere."""
    d = json.loads(json.dumps(train, sort_keys=True, default=str))
    d.get("run", {}).pop("name", None)
    d.get("run", {}).pop("output_dir", None)
    d.get("data", {}).pop("path", None)
    d.get("data", {}).get("synthetic", {}).pop("root", None)
    for (section, key), default in ADDED_KEYS.items():
        if d.get(section, {}).get(key, default) == default:
            d.get(section, {}).pop(key, None)
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


ROW_LOG = "trials.jsonl"  # one finished trial per line, in the study's results directory


def results_path(study: Any) -> Path:
    """Where the study's reports and logs go: study.results_dir, else study.output_dir."""
    return Path(study.results_dir or study.output_dir).resolve()


def row_log(study: Any) -> Path:
    """Where the study's finished trials are logged (:func:`results_path`)."""
    return results_path(study) / ROW_LOG


RUN_LOG = "runs.jsonl"  # one line per run of the study command: its wall-clock window


def log_run(study: Any, row: dict[str, Any]) -> None:
    """Append one run's row (started, ended, status, ...) to the study's run log, beside the
    row log: the study's wall time is the sum of its runs' windows."""
    _append_row(row_log(study).with_name(RUN_LOG), row)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every row of the row log at ``path`` ([] when there is none); a last row cut short by a
    killed process is skipped (that trial runs again), a corrupt earlier row is an error."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                continue
            raise ValueError(f"{path}: line {i} is not JSON ({e}); fix or delete it") from e
    return rows


def ran_to_result(row: dict[str, Any]) -> bool:
    """A logged trial that ran to a result: ok, stopped early by ASHA, or recorded as not
    fitting (a failed one is run again)."""
    return str(row.get("status", "")).startswith(("ok", "does not fit", "stopped early"))


def logged_rows(study: Any, phase: str) -> dict[str, dict[str, Any]]:
    """{config digest: row} of the trials of ``phase`` ("select" or "final") in the study's row
    log that ran to a result (ok, stopped early by ASHA, or not fitting); failed trials are run
    again. This file, committed with the results, is what a re-run on a fresh clone resumes
    from: Tune's own directories are not needed. A later line wins."""
    out = {}
    for row in read_log(row_log(study)):
        if row.get("phase") == phase and ran_to_result(row) and row.get("config_digest"):
            out[row["config_digest"]] = row
    return out


def split_logged(trials: list[dict[str, Any]], done: dict[str, dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of the ``trials`` already logged in ``done``, the trials still to run). A trial
    marked ``completes`` (a selection seed ASHA stopped, to be run to the end) is still to run
    while its logged row is not ok."""
    rows, todo = [], []
    for t in trials:
        r = done.get(config_digest(t["train"]))
        if r is None or ("completes" in t and r.get("status") != "ok"):
            todo.append(t)
        else:
            rows.append(r)
    return rows, todo


def _append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():  # a last row cut short by a killed process is dropped, not extended
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as fh:  # one write of one line: a reader never sees half a row
        fh.write(json.dumps(row, default=str, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _row(m: dict[str, Any], t: dict[str, Any], error: Any, stages: int, clock: str,
         points: list[list[float]] | None = None) -> dict[str, Any]:
    """A trial's row: its final report, or why it has none (stopped early by ASHA, or died).
    ``points``: its validation points as [clock, value] pairs (``asha_points``: what ASHA saw,
    so that a resumed study's ASHA judges the trials left against them)."""
    if "status" not in m:
        head = valid_metric(headline_key(stages))
        if error is None and head in m:
            why = (f"stopped early (ASHA) at {clock}={float(m.get(clock, 0)):g} with "
                   f"{head}={float(m[head]):.4f}")
        else:
            why = "failed: " + (str(error)[:300] if error else "no final report")
        last = {k: m[k] for k in (clock, head) if k in m and error is None}
        ident = ("trial", "phase", "op", "loss_form", "sample_num", "seed", "param", "value",
                 "lr")
        m = {**{k: t.get(k, "") for k in ident}, **last, "status": why}
    if "train" in t:
        m["config_digest"] = config_digest(t["train"])
    if points:
        m["asha_points"] = points
    return m


class StudyInterrupted(RuntimeError):
    """A Tune experiment of the study returned with trials unfinished (it was interrupted)."""


def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class RowLogger(_callback_base()):  # type: ignore[misc]
    """Appends each trial's row to the study's row log as soon as the trial ends (its final
    report, or its end without one: ASHA, failure), so an interrupted study loses only the
    trials that were running."""

    def __init__(self, path: Path, stages: int, clock: str, progress: Progress | None = None
                 ) -> None:  # fmt: skip
        self.path, self.stages, self.clock = path, stages, clock
        self.progress = progress  # one line per finished trial, with the experiment's ETA
        self.head = valid_metric(headline_key(stages))
        self.done: set[str] = set()
        self.points: dict[str, list[list[float]]] = {}  # trial_id -> [clock, head] pairs

    def _log(self, trial: Any, m: dict[str, Any], error: Any = None) -> None:
        if trial.trial_id in self.done:
            return
        self.done.add(trial.trial_id)
        t = (trial.config or {}).get("trial") or {}
        points = self.points.pop(trial.trial_id, None)
        _append_row(self.path, _row(dict(m or {}), t, error, self.stages, self.clock, points))
        if self.progress is not None:
            self.progress.advance()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if self.clock in result and self.head in result and "status" not in result:
            pair = [float(result[self.clock]), float(result[self.head])]
            self.points.setdefault(trial.trial_id, []).append(pair)
        if "status" in result:
            self._log(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, {}, error=getattr(trial, "error_msg", None) or "trial error")


def run_experiment(study: Any, name: str, trials: list[dict[str, Any]], trainable: Any,
                   conc: int, scheduler: Any, stages: int, verbose: bool,
                   clock: str | None = None) -> list[dict[str, Any]]:
    """Run ``trials`` as one Tune experiment (``name`` + a hash of the trials, so a re-run with
    other trials left is a new experiment), skipping every trial the row log already holds with
    the same config digest (:func:`split_logged`); one row per trial (logged ones included), a
    trial without a final report recorded with why. ``clock``: the budget's clock (default by
    study.budget_seconds)."""
    import ray.tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    clock = clock or ("samples_seen" if study.budget_seconds <= 0 else "train_seconds")
    phase = str(trials[0].get("phase", "final")) if trials else "final"
    rows, todo = split_logged(trials, logged_rows(study, phase))
    if verbose and rows:
        print(f"[raytopk] {name}: {len(rows)} of {len(trials)} trial(s) already in "
              f"{row_log(study)}; running {len(todo)}", flush=True)
    if todo:
        exp = f"{name}_{final_tag(todo)}"
        progress = Progress(name, len(todo), "trials", every=0.0, enabled=verbose)
        tuner = Tuner(
            trainable,
            param_space={"trial": ray.tune.grid_search(todo)},
            tune_config=TuneConfig(max_concurrent_trials=conc, scheduler=scheduler),
            run_config=RunConfig(name=exp, storage_path=str(storage_dir(study)), verbose=0,
                                 callbacks=[RowLogger(row_log(study), stages, clock, progress)]),
        )
        if hasattr(scheduler, "replay"):  # ASHA's rungs as the logged trials left them
            scheduler.replay(rows, clock)
        logged_now, lines_before = len(rows), len(read_log(row_log(study)))
        results = list(tuner.fit())
        # The callback logged every trial that ended (finished, stopped by ASHA, failed). Tune
        # also returns from fit() when interrupted (Ctrl-C, SIGINT): a trial it did not log in
        # this experiment, with neither a final report nor an error, was still running and must
        # not be logged as ended, nor the study go on with a partial selection.
        seen = {r.get("config_digest") for r in read_log(row_log(study))[lines_before:]}
        unfinished = []
        for result in results:
            t = (result.config or {}).get("trial") or {}
            m = dict(result.metrics or {})
            logged = config_digest(t["train"]) in seen if "train" in t else False
            if not logged and "status" not in m and result.error is None:
                # A trial Tune had not started yet carries no config: name it by its directory.
                unfinished.append(str(t.get("trial") or Path(str(result.path or "?")).name))
                continue
            rows.append(_row(m, t, result.error, stages, clock))
        if unfinished:
            raise StudyInterrupted(
                f"{exp}: {len(unfinished)} trial(s) did not finish ({', '.join(unfinished[:5])}"
                f"{', ...' if len(unfinished) > 5 else ''}): the experiment was interrupted. "
                f"The finished ones are in {row_log(study)}; re-run the same command to continue."
            )
        # A trial whose end the callback did not see (none should be) is logged now.
        for r in rows[logged_now:]:
            if r.get("config_digest") not in seen:
                _append_row(row_log(study), r)
    rows.sort(key=lambda r: (str(r.get("op")), int(r.get("sample_num") or 0),
                             float(r.get("value") or 0), float(r.get("lr") or 0),
                             int(r.get("seed") or 0)))
    return rows
