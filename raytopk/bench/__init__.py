"""Benchmarks of the top-k operators: operator-level sweeps (``raytopk.bench.ops``) and the
paper's step-level runtime protocol (``raytopk.bench.step``). Entry script: jobs/bench_ops.py.

Pure torch (+ matplotlib for plots): nothing here imports Ray or faiss, so the benchmark runs on
a bare GPU machine with only torch, numba and matplotlib installed.
"""

from raytopk.bench.ops import (
    authors_dftopk_logits,
    bench_operators,
    elementwise_floor_loss,
    estimate_bytes,
    machine_info,
    peak_memory,
    time_fn,
)
from raytopk.bench.step import ToyDSSM, bench_steps

__all__ = [
    "ToyDSSM",
    "authors_dftopk_logits",
    "bench_operators",
    "bench_steps",
    "elementwise_floor_loss",
    "estimate_bytes",
    "machine_info",
    "peak_memory",
    "time_fn",
]
