"""Differentiable top-k operators: pure torch (plus an optional numba CPU kernel), no Ray, no data.

``get_op(name)(scores, k, mask=None, **params) -> membership`` (docs/design.md, Contract: operator).
"""

from raytopk.ops._registry import OpSpec, get_op, get_spec, list_ops, register, unregister
from raytopk.ops._validate import check_param

# Importing a module registers its operator; the order here is the order of list_ops().
from raytopk.ops import dftopk  # noqa: E402,F401  isort: skip
from raytopk.ops import lapsum  # noqa: E402,F401  isort: skip
from raytopk.ops import sparse_topk  # noqa: E402,F401  isort: skip
from raytopk.ops import neuralsort  # noqa: E402,F401  isort: skip
from raytopk.ops import softsort  # noqa: E402,F401  isort: skip
from raytopk.ops import diffsort  # noqa: E402,F401  isort: skip

__all__ = [
    "OpSpec",
    "check_param",
    "get_op",
    "get_spec",
    "list_ops",
    "register",
    "unregister",
    "warmup",
]


def warmup(name: str, dtypes: tuple = ("float32",)) -> None:
    """Run ``name`` forward and backward once on small inputs so that lazily compiled kernels
    (numba, on CPU) are compiled before anything is timed: a training-time budget or a
    benchmark should not pay a compiler. Kernels with a parallel variant are compiled too."""
    import torch

    spec = get_spec(name)
    if spec.fn is dftopk.dftopk:
        dftopk.warmup()
    for dtype in dtypes:
        for rows, n in ((2, 16), (512, 64)):  # serial and parallel kernel variants
            x = torch.randn(rows, n, dtype=getattr(torch, dtype), requires_grad=True)
            mask = torch.ones(rows, n, dtype=torch.bool)
            spec.fn(x, 3, mask, **{spec.param: spec.default}).sum().backward()
