"""Operator registry: one differentiable top-k operator per module, registered by name.

The file name, the registry key and the config value are the same string (docs/design.md,
Conventions). Every registered operator follows docs/design.md, Contract: operator::

    get_op(name)(scores, k, mask=None, **params) -> membership

scores (..., N) float; k an int or a LongTensor of shape scores.shape[:-1]; mask a bool tensor of
the shape of scores (True = valid) or None. The result is the soft top-k membership in [0, 1],
shaped like scores, exactly 0 at masked slots, which never influence any other slot.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "OpSpec",
    "register",
    "unregister",
    "get_op",
    "get_spec",
    "list_ops",
    "signature_default",
]


@dataclass(frozen=True)
class OpSpec:
    """What the framework, the tests and the benchmarks need to know about one operator.

    param: the operator's own parameter, named as in its paper (tau, alpha, l, steepness).
    default: its RecFlow-protocol value (docs/protocol.md §2.5), read from the default of
        ``param`` in the function's signature: one literal per parameter, so
        ``get_op(name)(x, k)`` is the operator training uses.
    hard_limit: a value at which, for scores whose gaps are >= 1, the membership equals the
        hard top-k mask to within 1e-3 (used by the convergence test).
    sums_to_k: the paper guarantees sum(membership) == k over valid slots.
    permutation: the operator builds an (..., N, N) soft permutation (O(N^2) memory) and exposes
        soft_permutation(scores, <param>) in its module.
    complexity: time per row, for documentation and benchmarks.
    step_bytes: ``step_bytes(batch, n, itemsize=4) -> int``, the peak bytes one stage's
        training forward+backward through this operator holds for (batch, n) scores of
        ``itemsize`` bytes (for a permutation op including the LCRON loss's label relaxation
        matrix). Declared next to the operator; tests/unit/test_ops_memory.py checks it against
        the peak of torch's CPU allocations. Used to skip benchmark and study points that would
        not fit in memory.
    bf16: the operator is correct on bfloat16 scores: the contract holds within bf16's output
        rounding, forward and backward (tests/unit/test_ops_bf16.py runs the contract in bf16
        for every operator that declares it). ``bf16_reason`` says why, or why not.

    What the losses need (raytopk.losses never branches on an operator's name):
    logits: ``logits(scores, k, mask, **params) -> z`` when the membership is σ(z): the BCE
        forms then take log σ(±z) (never saturated) instead of logs of a rounded p.
    log_membership: ``log_membership(scores, k, mask, keep, **params) -> (log p, log(1 − p))``
        exact in log space, for the loss form ``bce_log`` (0 outside ``keep``).
    unclipped: ``unclipped(scores, p, keep, **params) -> u``, the membership before its clip to
        [0, 1], for the loss form ``hinge`` (0 outside ``keep``).
    default_form: the loss form training uses by default (docs/protocol.md §3.5); empty:
        ``lcron`` for a permutation operator, else ``bce``.
    label_param: a permutation operator's parameter for the LCRON loss's label relaxation.
    selects: the method selects k of N (False only for a baseline that scores without a
        top-k, such as ``bce``: no row is ever decided by k >= #valid).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    param: str
    default: float
    hard_limit: float
    sums_to_k: bool
    permutation: bool
    complexity: str
    step_bytes: Callable[..., int]
    bf16: bool
    bf16_reason: str
    logits: Callable[..., torch.Tensor] | None = None
    log_membership: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    unclipped: Callable[..., torch.Tensor] | None = None
    default_form: str = ""
    label_param: float | None = None
    selects: bool = True


_REGISTRY: dict[str, OpSpec] = {}


def register(
    name: str,
    *,
    param: str,
    hard_limit: float,
    sums_to_k: bool,
    permutation: bool = False,
    complexity: str,
    step_bytes: Callable[..., int],
    bf16: bool,
    bf16_reason: str,
    logits: Callable[..., torch.Tensor] | None = None,
    log_membership: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    unclipped: Callable[..., torch.Tensor] | None = None,
    default_form: str = "",
    label_param: float | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Class-less decorator registry (timm style): ``@register("dftopk", param="tau", ...)``.

    The parameter's default value is not an argument here: it is the default of ``param`` in
    the decorated function's signature (ValueError if it has none).
    """

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"operator {name!r} is registered twice")
        _REGISTRY[name] = OpSpec(
            name=name,
            fn=fn,
            param=param,
            default=signature_default(fn, param),
            hard_limit=hard_limit,
            sums_to_k=sums_to_k,
            permutation=permutation,
            complexity=complexity,
            step_bytes=step_bytes,
            bf16=bf16,
            bf16_reason=bf16_reason,
            logits=logits,
            log_membership=log_membership,
            unclipped=unclipped,
            default_form=default_form,
            label_param=label_param,
        )
        return fn

    return deco


def signature_default(fn: Callable[..., object], param: str) -> float:
    """The default value of ``param`` in ``fn``'s signature (ValueError naming both if none)."""
    p = inspect.signature(fn).parameters.get(param)
    if p is None or p.default is inspect.Parameter.empty:
        raise ValueError(f"{fn.__qualname__} should take {param!r} with a default value")
    return float(p.default)


def get_spec(name: str) -> OpSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown operator {name!r}; registered operators: {list_ops()}")
    return _REGISTRY[name]


def get_op(name: str) -> Callable[..., torch.Tensor]:
    """The operator function registered under ``name`` (ValueError listing the valid names)."""
    return get_spec(name).fn


def unregister(name: str) -> None:
    """Remove ``name`` (a test's own operator, registered for that test alone)."""
    _REGISTRY.pop(name, None)


def list_ops() -> list[str]:
    """Every registered operator name, in registration order."""
    return list(_REGISTRY)
