"""Ray in one place: every Ray-version-specific fact raytopk relies on (docs/ray.md, Ray 2.60).

Upgrading Ray should mean editing this file. It holds:

- ``init_ray``: join the cluster of a submitted job, or start an embedded local one;
- ``configure_data_context``: the Ray Data flags the pipeline needs (the V1 parquet reader, the
  task-based sort, order preservation);
- ``RayTrainSession``: what the training loop asks of Ray Train (place, device, DDP, the
  dataset shard, reports); ``report``/``restored_checkpoint``: a Train worker's report with an
  optional checkpoint, and the checkpoint Ray hands back after a restart;
- ``checkpoint_record``: Ray Train V2's on-disk record of the latest reported checkpoint;
- ``progress_callback``: a controller-side ``UserCallback`` around a plain function;
- ``quiet_train_logs``, ``tune_report_callback``, ``node_id``.

Security (docs/ray.md §2): Ray 2.60's GCS and raylet listen on every interface whatever the node IP,
the dashboard agent on 0.0.0.0. Token authentication is the protection, so nothing here ever
turns it off: a local ``ray.init()`` enables it by default (token in ``~/.ray/auth_token``, or
the file named by ``RAY_AUTH_TOKEN_PATH``); a process joining a cluster needs
``RAY_AUTH_MODE=token`` and the same token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "RayTrainSession",
    "SNAPSHOT",
    "configure_data_context",
    "init_ray",
    "checkpoint_record",
    "node_id",
    "progress_callback",
    "quiet_loggers",
    "quiet_train_logs",
    "quiet_workers",
    "report_metrics",
    "restored_checkpoint",
    "tune_report_callback",
]

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints


def init_ray(**local: Any) -> Any:
    """Join the cluster named by RAY_ADDRESS (a submitted job), else start a local one.

    The local one advertises 127.0.0.1 and runs no dashboard; its servers still listen on every
    interface (Ray 2.60), protected by token authentication, which stays on. ``local``: extra
    ``ray.init`` arguments for a local start only (tests and benchmarks size it: num_cpus,
    object_store_memory, address="local" to never join a running cluster). Returns the context
    of a new start, None when Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("RAY_ADDRESS") and local.get("address") != "local":
        ctx = ray.init()  # never num_cpus here: the cluster's resources are what they are
        quiet_loggers()
        return ctx
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise RuntimeError(
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: raytopk keeps Ray's token "
            "authentication on (Ray 2.60 listens on every interface); unset it or set it to token"
        )
    # Every worker process of the job (Train's controller and its helper actors, Ray Data's
    # coordinators) quiets the log lines that only repeat themselves (quiet_workers).
    env = {"worker_process_setup_hook": "raytopk.ray_env.quiet_workers"}
    ctx = ray.init(**{"_node_ip_address": "127.0.0.1", "include_dashboard": False,
                      "runtime_env": env, **local})  # fmt: skip
    quiet_loggers()  # the driver's own Ray Data lines
    return ctx


# Loggers of Ray's own processes that only repeat themselves on a run's console, and the level
# they are kept at (warnings and errors of everything else still reach the console):
# - Train's PlacementGroupCleaner asks the State API, which needs the dashboard a local run does
#   not start, every few seconds whether the controller lives, and warns each time it cannot
#   (~66 lines a quickstart); the cleanup it exists for runs when a controller dies uncleanly;
# - Ray Data's progress module says once per process that progress bars are off, and its
#   streaming executor logs "execution finished" per dataset at INFO (raytopk prints its own
#   progress lines; the executor's warnings still pass);
# - Ray Data's parquet reader logs two estimates per dataset at INFO, in the driver (~14 lines
#   a quickstart);
# - Train's autoscaling-coordinator client warns, with a traceback, when its resource request
#   times out on a busy machine, "safe to ignore" if transient; a local run has no autoscaler;
# - faiss's loader logs, at INFO, each CPU-specific library it tries (11 lines per worker).
# Workers get these levels from the setup hook (quiet_workers); the driver from init_ray.
QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
    "ray.data._internal.datasource.parquet_datasource": logging.WARNING,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "faiss.loader": logging.WARNING,
}


def quiet_loggers() -> None:
    """The levels of :data:`QUIET_LOGGERS` in this process, and no RayDeprecationWarning about
    a Ray Data option Ray itself sets (``ExecutionOptions.exclude_resources``, from Ray Train's
    dataset manager: nothing a raytopk user can change)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")


def quiet_workers() -> None:
    """Ray worker setup hook (``runtime_env["worker_process_setup_hook"]``): the levels of
    :data:`QUIET_LOGGERS` in this process; and ``RAY_ADDRESS`` set to this worker's own cluster
    when it is unset, so that a State API call without an address (Train's placement-group
    cleaner makes one) finds this cluster instead of failing with "Found multiple active Ray
    instances" (and a traceback) on a machine running another Ray."""
    quiet_loggers()
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        with contextlib.suppress(Exception):  # a worker not (yet) connected: leave it unset
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def configure_data_context(ctx: Any = None) -> Any:
    """Set the Ray Data flags raytopk needs on ``ctx`` (default: the current context).

    - the V1 parquet reader: 2.60's V2 reader starts footer-reader actors on every execution
      (11-14 s per day here); V1 is ~4x faster on the same job;
    - the task-based pull sort: 2.60's default SHUFFLE_V2 costs ~6 s of fixed overhead per
      execution here; the pull sort does a day's sort in well under a second on small days;
    - preserve_order: block order = file order = date order, the sampling groups do not depend
      on task completion order, and a re-run sees the same batches (exact resume).
    """
    import ray.data

    ctx = ctx if ctx is not None else ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.execution_options.preserve_order = True
    # No "Starting execution" / "Execution plan of Dataset" block and no progress bars or
    # "execution finished" line per dataset on the console (raytopk prints its own progress).
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    return ctx


def quiet_train_logs() -> None:
    """Ray Train V2 logs every report (with its whole metrics dict) and every checkpoint at INFO
    from each worker; our controller-side progress line already says it once, readably."""
    try:
        from ray.train.v2._internal.execution import context as _ctx
        from ray.train.v2._internal.execution import storage as _storage
    except ImportError:  # a Ray without these modules: keep its logging as it is
        return
    logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)  # its logger is named by path
    logging.getLogger(_storage.__name__).setLevel(logging.WARNING)


def report_metrics(
    metrics: dict[str, Any],
    write_checkpoint: Callable[[str], None] | None = None,
    name: str | None = None,
) -> None:
    """``ray.train.report`` from a worker; every rank must call it the same number of times.

    ``write_checkpoint(dir)`` (rank 0 only) writes the checkpoint's files into a temporary
    directory that Ray copies into the run's storage as ``name``."""
    import ray.train

    if write_checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raytopk-ckpt-") as tmp:
        write_checkpoint(tmp)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )


class RayTrainSession:
    """The five steps of ``raytopk.train.loop.train_loop`` that Ray Train does, in a Train worker
    (``raytopk.train.local_session.LocalSession`` does the same without Ray)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        quiet_train_logs()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restored(self, load: Callable[[str], Any]) -> Any | None:
        return restored_checkpoint(load)

    def prepare_model(self, module: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # to the device; DDP when world > 1

    def dataset(self, key: str, batch_size: int, prefetch: int) -> Any:
        """This worker's share of dataset ``key`` (a ``DataIterator``; Ray Data samples the
        negatives), for ``raytopk.data.loader.CascadeBatches``."""
        import ray.train

        return ray.train.get_dataset_shard(key)

    def report(
        self,
        report: Any,
        write_checkpoint: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        """``report`` (a raytopk.train.events.Report) as Ray Train's flat metrics dict."""
        report_metrics(report.metrics(), write_checkpoint, name)


def restored_checkpoint(load: Callable[[str], Any]) -> Any | None:
    """``load(dir)`` of the checkpoint Ray restores this worker from (after a worker failure, or
    on a re-run of the same storage path), or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return load(ckpt_dir)


def checkpoint_record(experiment_dir: str | Path) -> Path | None:
    """The checkpoint Ray Train restores from ``experiment_dir`` (its ``storage_path/name``),
    read from Train V2's snapshot file; None when nothing was checkpointed.

    Raises ValueError naming the file when the snapshot is unreadable."""
    exp = Path(experiment_dir)
    snap = exp / SNAPSHOT
    if not snap.is_file():
        return None
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint record {str(snap)!r} is corrupt: {e}") from e
    if not latest:
        return None
    return exp / latest["checkpoint_dir_name"]


def progress_callback(on_report: Callable[[list[dict[str, Any]], str | None], None]) -> Any:
    """A Ray Train ``UserCallback`` (runs in the controller) calling ``on_report(metrics of every
    worker, checkpoint directory name or None)`` after each report."""
    from ray.train import UserCallback

    class _Progress(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if metrics:
                name = os.path.basename(str(checkpoint.path)) if checkpoint is not None else None
                on_report(metrics, name)

    return _Progress()


def tune_report_callback() -> Any:
    """The Train callback that forwards a Train run's reports to the enclosing Tune trial
    (docs/ray.md §6: Tune over Train runs)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
