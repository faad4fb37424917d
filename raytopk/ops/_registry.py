"""Operator registry: one differentiable top-k operator per module, registered by name.

The file name, the registry key and the config value are the same string (STYLE.md, habit 1).
Every registered operator follows DESIGN.md, Contract 1::

    get_op(name)(scores, k, mask=None, **params) -> membership

scores (..., N) float; k an int or a LongTensor of shape scores.shape[:-1]; mask a bool tensor of
the shape of scores (True = valid) or None. The result is the soft top-k membership in [0, 1],
shaped like scores, exactly 0 at masked slots, which never influence any other slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["OpSpec", "register", "get_op", "get_spec", "list_ops"]


@dataclass(frozen=True)
class OpSpec:
    """What the framework, the tests and the benchmarks need to know about one operator.

    param: the operator's own parameter, named as in its paper (tau, alpha, l, steepness).
    default: its RecFlow-protocol value (SPEC.md).
    hard_limit: a value at which, for scores whose gaps are >= 1, the membership equals the
        hard top-k mask to within 1e-3 (used by the convergence test).
    sums_to_k: the paper guarantees sum(membership) == k over valid slots.
    permutation: the operator builds an (..., N, N) soft permutation (O(N^2) memory) and exposes
        soft_permutation(scores, <param>) in its module.
    complexity: time per row, for documentation and benchmarks.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    param: str
    default: float
    hard_limit: float
    sums_to_k: bool
    permutation: bool
    complexity: str


_REGISTRY: dict[str, OpSpec] = {}


def register(
    name: str,
    *,
    param: str,
    default: float,
    hard_limit: float,
    sums_to_k: bool,
    permutation: bool = False,
    complexity: str,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Class-less decorator registry (timm style): ``@register("dftopk", param="tau", ...)``."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"operator {name!r} is registered twice")
        _REGISTRY[name] = OpSpec(
            name=name,
            fn=fn,
            param=param,
            default=default,
            hard_limit=hard_limit,
            sums_to_k=sums_to_k,
            permutation=permutation,
            complexity=complexity,
        )
        return fn

    return deco


def get_spec(name: str) -> OpSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown operator {name!r}; registered operators: {list_ops()}")
    return _REGISTRY[name]


def get_op(name: str) -> Callable[..., torch.Tensor]:
    """The operator function registered under ``name`` (ValueError listing the valid names)."""
    return get_spec(name).fn


def list_ops() -> list[str]:
    """Every registered operator name, in registration order."""
    return list(_REGISTRY)
