"""One resource planner for a training run and for the study's concurrent trials.

Notation: T = the cluster's CPUs, R = the CPUs kept for Ray Data, n = Train workers per run,
c = CPUs per worker, t = CPUs of a Tune trial's own function (0 for a plain run), m = runs at once.

docs/ray.md §5.1: Ray Data gets only the CPUs that Train workers did not reserve; Train workers
holding every CPU starve it, and the run hangs forever without an error. So R = max(1, T / 4) stays
free for reading and negative sampling, and every plan satisfies m * (n * c + t) <= T - 1. Runs
that read without Ray Data (the study's local trials) keep nothing back: m * n * c <= T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Plan", "data_reserve", "plan_resources"]


@dataclass(frozen=True)
class Plan:
    use_gpu: bool
    cpus_per_worker: float  # c
    threads: int  # torch threads per worker: whole CPUs of c, at least 1
    concurrent: int  # m: runs (trials) at once


def data_reserve(total_cpu: float) -> float:
    """R: CPUs left to Ray Data, a quarter of the cluster and at least one."""
    return max(1.0, 0.25 * total_cpu)


def plan_resources(
    cluster: dict[str, float],
    *,
    num_workers: int,
    cpus_per_worker: float | str = "auto",
    use_gpu: bool | str = "auto",
    trial_cpu: float = 0.0,
    concurrent: int = 0,
    max_cpus_per_worker: float = math.inf,
    ray_data: bool = True,
) -> Plan:
    """The plan for runs of ``num_workers`` workers on ``cluster`` (``ray.cluster_resources()``).

    ``cpus_per_worker="auto"``: the CPUs left after R and one trial function, split equally over
    the workers (to 1/100), at most ``max_cpus_per_worker`` (the study caps it at 1 so that trials
    run side by side on large clusters). ``concurrent=0``: as many runs as fit (one per
    ``num_workers`` GPUs with GPUs). ``ray_data=False``: the runs read their data without Ray
    Data (the study's local trials), so no CPU is kept for it and they may fill the cluster.
    ValueError naming the setting when the plan cannot fit.
    """
    total = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    n = num_workers
    gpu = gpus > 0 if use_gpu == "auto" else bool(use_gpu)
    if gpu and gpus < n:
        raise ValueError(
            f"scaling.use_gpu={use_gpu} with scaling.num_workers={n} needs {n} GPU(s); "
            f"the cluster has {gpus:g}"
        )
    reserve = data_reserve(total) if ray_data else 0.0
    if cpus_per_worker == "auto":
        per = min(max_cpus_per_worker, math.floor((total - reserve - trial_cpu) / n * 100) / 100)
        if per < 0.05:
            raise ValueError(
                f"the cluster has {total:g} CPU(s): too few for {n} worker(s) plus >= 1 CPU "
                "for Ray Data; lower scaling.num_workers"
            )
    else:
        per = float(cpus_per_worker)
    one = n * per + trial_cpu  # CPUs one run holds
    if concurrent > 0:
        conc = concurrent
    elif gpu:
        conc = max(1, int(gpus // n))
    else:
        conc = max(1, int((total - reserve) // one))
    if not ray_data and conc * one > total + 1e-9:
        raise ValueError(
            f"{conc} run(s) x ({n} worker(s) x cpus_per_worker={per:g}) need more than the "
            f"cluster's {total:g} CPUs; lower it"
        )
    if ray_data and conc * one > total - 1.0 + 1e-9:
        raise ValueError(
            f"{conc} run(s) x ({n} worker(s) x cpus_per_worker={per:g}"
            + (f" + {trial_cpu:g} for the trial" if trial_cpu else "")
            + f") leave less than one of the cluster's {total:g} CPUs to Ray Data, and the run "
            "would hang (docs/ray.md §5.1); lower it or use cpus_per_worker=auto"
        )
    return Plan(use_gpu=gpu, cpus_per_worker=per, threads=max(1, int(per)), concurrent=conc)
