"""Each registered operator's declared memory estimate (OpSpec.step_bytes) against the measured
peak of one stage's training forward+backward on small CPU shapes.

Notation: B = rows, N = slots per row, itemsize = bytes per score.

Measured: the peak of the running sum of torch's CPU allocations and frees during the call,
from ``torch.profiler`` with ``profile_memory=True`` (one "[memory]" event per allocation or
free, in time order). Inputs exist before the call, so this is the extra memory the step holds.
Allocations outside torch's allocator (numpy arrays of the numba kernels) are not seen.

The step is the loss training uses for the operator: ``topk_stage_loss`` (BCE on the membership,
BCE-with-logits for DFTopK) for the O(N)/O(N log N) operators; for the permutation operators
the LCRON single-stage loss between the soft permutation and the label relaxation of a random
priority (built without gradient, as LCRONLoss does), then backward.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from raytopk.ops import get_spec, list_ops

# The estimate must lie within [LOW, HIGH] × the measured peak.
LOW, HIGH = 0.5, 3.0
SHAPES = [(32, 32), (8, 64), (8, 128)]
# DiffSort's O(N^3) network records thousands of allocations per call under the profiler: its
# largest shape is left out to keep the test short (its estimate's N^3 term is checked at 64).
SKIP = {("diffsort", 8, 128)}


def measured_peak_bytes(fn) -> int:
    """Peak of live torch CPU allocations during ``fn()``, relative to its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _stage_step(name: str, batch: int, n: int, dtype: torch.dtype):
    from raytopk.losses.joint import topk_stage_loss
    from raytopk.losses.lcron import label_param_of, lcron_single_stage_loss, soft_permutation_fn

    spec = get_spec(name)
    g = torch.Generator().manual_seed(batch * n)
    x = torch.randn(batch, n, generator=g, dtype=dtype).requires_grad_()
    priority = torch.rand(batch, n, generator=g, dtype=dtype)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, -n // 8 :] = False  # padded slots, as in training batches
    k = 10
    if spec.permutation:
        soft_perm = soft_permutation_fn(name)

        def step() -> None:
            with torch.no_grad():
                labels = soft_perm(priority.masked_fill(~mask, -1.0), label_param_of(name), mask)
            perm = soft_perm(x, spec.default, mask)
            lcron_single_stage_loss(perm, labels, k, mask).backward()
            x.grad = None

    else:
        top = priority.masked_fill(~mask, -1.0).topk(k, dim=-1).indices
        labels = torch.zeros_like(mask).scatter_(-1, top, True)

        def step() -> None:
            topk_stage_loss(name, x, labels, k, mask, **{spec.param: spec.default}).backward()
            x.grad = None

    return step


@pytest.mark.parametrize("name", list_ops())
def test_step_bytes_is_close_to_measured_peak(name: str) -> None:
    spec = get_spec(name)
    cases = [(b, n, torch.float32) for b, n in SHAPES if (name, b, n) not in SKIP]
    cases.append((8, 32, torch.float64))
    for batch, n, dtype in cases:
        step = _stage_step(name, batch, n, dtype)
        step()  # first call: lazy kernels and one-off caches out of the measurement
        measured = measured_peak_bytes(step)
        itemsize = torch.empty((), dtype=dtype).element_size()
        estimate = spec.step_bytes(batch, n, itemsize)
        assert isinstance(estimate, int)
        assert LOW * measured <= estimate <= HIGH * measured, (
            f"{name} B={batch} N={n} {dtype}: estimate {estimate} vs measured {measured} "
            f"({estimate / measured:.2f}×)"
        )


@pytest.mark.parametrize("name", list_ops())
def test_step_bytes_grows_with_the_declared_complexity(name: str) -> None:
    spec = get_spec(name)
    step = spec.step_bytes
    assert step(2, 100) == 2 * step(1, 100)  # linear in B
    growth = step(1, 2000) / step(1, 1000)
    expected = {"O(N)": 2.0, "O(N log N)": 2.0, "O(N^2)": 4.0, "O(N^3)": 8.0}[spec.complexity]
    assert expected * 0.95 <= growth <= expected * 1.05
