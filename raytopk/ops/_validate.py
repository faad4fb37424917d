"""Argument checks shared by every operator's public function.

Errors name the argument and the value received (docs/design.md, Conventions). Inside the operators
everything stays device- and dtype-agnostic; these checks run once at the public boundary.
"""

from __future__ import annotations

import torch

__all__ = ["check_scores", "check_k", "check_mask", "check_finite", "check_param", "prepare"]


def check_scores(scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"'scores' should be a torch.Tensor but got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"'scores' should be a floating-point tensor but got dtype {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError("'scores' should have shape (..., N) but got a 0-d tensor")
    if scores.shape[-1] == 0:
        raise ValueError(
            f"'scores' should have N >= 1 candidates but got shape {tuple(scores.shape)}"
        )
    return scores


def check_k(k: object, scores: torch.Tensor) -> torch.Tensor:
    """k as a LongTensor of shape scores.shape[:-1] on scores' device (all entries >= 1)."""
    batch_shape = scores.shape[:-1]
    if isinstance(k, bool):
        raise TypeError(f"'k' should be an int or a LongTensor but got bool {k}")
    if isinstance(k, int):
        if k <= 0:
            raise ValueError(f"'k' should be >= 1 but got {k}")
        return torch.full(batch_shape, k, dtype=torch.long, device=scores.device)
    if isinstance(k, torch.Tensor):
        if k.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"'k' should be an integer tensor but got dtype {k.dtype}")
        if k.dim() == 0:
            return check_k(int(k.item()), scores)
        if tuple(k.shape) != tuple(batch_shape):
            raise ValueError(
                f"'k' should have shape scores.shape[:-1] = {tuple(batch_shape)} "
                f"but got {tuple(k.shape)}"
            )
        if bool((k <= 0).any()):
            bad = int(k.reshape(-1).le(0).nonzero()[0, 0])
            raise ValueError(
                f"'k' should be >= 1 in every row but got {int(k.reshape(-1)[bad])} in row {bad}"
            )
        return k.to(device=scores.device, dtype=torch.long)
    raise TypeError(f"'k' should be an int or a LongTensor but got {type(k).__name__}")


def check_mask(mask: object, scores: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"'mask' should be a bool torch.Tensor or None but got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"'mask' should be a bool tensor but got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(scores.shape):
        raise ValueError(
            f"'mask' should have the shape of scores {tuple(scores.shape)} "
            f"but got {tuple(mask.shape)}"
        )
    return mask.to(scores.device)


def check_finite(scores: torch.Tensor, mask: torch.Tensor | None) -> None:
    """NaN/inf at a valid slot is an error naming the (flattened) row; masked slots may hold
    anything (padding), since they never enter an operator's result."""
    with torch.no_grad():
        # One fused reduction on the common (all finite) path; locate the row only on failure.
        finite = torch.isfinite(scores)
        ok = finite.all() if mask is None else (finite | ~mask).all()
        if bool(ok):
            return
        bad = ~finite if mask is None else ~finite & mask
        rows = bad.reshape(-1, scores.shape[-1]).any(-1)
        row = int(rows.nonzero()[0, 0])
        vals = scores.detach().reshape(-1, scores.shape[-1])[row]
        kind = "nan" if bool(vals.isnan().any()) else "inf"
        raise ValueError(
            f"'scores' has a non-finite value ({kind}) in row {row} "
            f"(row index over the flattened batch dims of shape {tuple(scores.shape[:-1])})"
        )


def check_param(name: str, value: object, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"'{name}' should be a number but got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"'{name}' should be finite but got {value}")
    if positive and value <= 0:
        raise ValueError(f"'{name}' should be > 0 but got {value}")
    return value


def prepare(
    scores: object, k: object, mask: object, *, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate (scores, k, mask) for a public operator call; returns (scores, k_rows, mask)."""
    scores = check_scores(scores)
    k_rows = check_k(k, scores)
    mask_t = check_mask(mask, scores)
    if finite:
        check_finite(scores, mask_t)
    return scores, k_rows, mask_t
