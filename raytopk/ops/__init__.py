"""Differentiable top-k operators: pure torch (plus an optional numba CPU kernel), no Ray, no data.

``get_op(name)(scores, k, mask=None, **params) -> membership`` (DESIGN.md, Contract 1).
"""

from raytopk.ops._registry import OpSpec, get_op, get_spec, list_ops, register

# Importing a module registers its operator; the order here is the order of list_ops().
from raytopk.ops import dftopk  # noqa: E402,F401  isort: skip
from raytopk.ops import lapsum  # noqa: E402,F401  isort: skip
from raytopk.ops import sparse_topk  # noqa: E402,F401  isort: skip
from raytopk.ops import neuralsort  # noqa: E402,F401  isort: skip
from raytopk.ops import softsort  # noqa: E402,F401  isort: skip
from raytopk.ops import diffsort  # noqa: E402,F401  isort: skip

__all__ = ["OpSpec", "get_op", "get_spec", "list_ops", "register"]
