"""Torch building blocks shared across layers of raytopk (pure torch, no raytopk imports).

It sits below both ``raytopk.ops`` (the operators must not import models) and
``raytopk.models`` (which should not reach into an operator's private helpers), so one function
serves both.

Notation: R = rows of a matrix of logits, N = its columns, ``...`` = leading batch dims.
"""

from __future__ import annotations

import torch

__all__ = ["masked_softmax"]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of ``logits`` (..., R, N) restricted to the valid columns
    ``mask`` (..., N) bool, shared by every row of the matrix (None = all columns valid).

    Masked columns get exactly 0, in value and gradient. A matrix without any valid column gets
    finite uniform weights 1/N with finite gradients (never NaN); the caller zeroes it where that
    matters (the permutation ops reset every rank r >= n = 0; DIN multiplies by the sequence mask
    so an empty history has interest 0).

    Callers: raytopk.ops.neuralsort / softsort (logits (..., N, N), mask = the items' validity)
    and raytopk.models.din (logits (B, n, L) of n candidates over L behaviours, mask (B, L)).
    """
    if mask is None:
        return torch.softmax(logits, dim=-1)
    # finfo.min instead of -inf: a row without a valid column then softmaxes to finite uniform
    # weights instead of exp(-inf - (-inf)) = NaN (in the forward and the backward). Where some
    # column is valid the masked ones still get exp(finfo.min - max) = 0 exactly, as with -inf.
    neg = torch.finfo(logits.dtype).min
    return torch.softmax(logits.masked_fill(~mask.unsqueeze(-2), neg), dim=-1)
