"""Benchmarks of the top-k operators, one module per job:

- ``harness``: timing (``time_fn``, ``interleaved``) and peak memory of one call;
- ``reference``: the formulations DFTopK is measured against (the authors' two-kthvalue
  DFTopK, a full sort, the elementwise floor);
- ``cost``: the skip rules' cost model (complexity exponents, time extrapolation; memory comes
  from each operator's registry entry, ``get_spec(name).step_bytes``);
- ``sweeps``: operator-level sweeps and the interleaved headline comparison;
- ``step``: the DFTopK paper's step-level runtime protocol (docs/protocol.md §5.1);
- ``report``: markdown tables, targets and plots;
- ``machine``: the machine a benchmark ran on (``machine_info``, one set of keys);
- ``train``: the plain single-process training loop that jobs/bench_train.py compares Ray with;
- ``select``: DFTopK's selection primitives against each other, the authors' formulation and the
  floor, and the one to use on a device (``_AUTO_SELECT``);
- ``parity``: every operator on a device against the same operator on CPU;
- ``local_train``: the local backend's training loop measured on one device (throughput pass,
  synchronised step-time split).

Entry scripts: jobs/bench_ops.py, jobs/bench_train.py, jobs/gpu_check.py (select, parity,
local_train; imported on use, not here). Pure torch (+ matplotlib for plots):
nothing here imports Ray or faiss at import time, so the operator benchmark runs on a bare GPU
machine with only torch, numba and matplotlib installed.
"""

from raytopk.bench.harness import peak_memory, time_fn
from raytopk.bench.machine import machine_info
from raytopk.bench.op_sweeps import bench_operators
from raytopk.bench.reference import (
    authors_dftopk,
    authors_dftopk_logits,
    elementwise_floor_loss,
    full_sort_logits,
)
from raytopk.bench.step import ToyDSSM, bench_steps

__all__ = [
    "ToyDSSM",
    "authors_dftopk",
    "authors_dftopk_logits",
    "bench_operators",
    "bench_steps",
    "elementwise_floor_loss",
    "full_sort_logits",
    "machine_info",
    "peak_memory",
    "time_fn",
]
