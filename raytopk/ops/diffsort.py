"""Differentiable sorting network (Petersen, Borgelt, Kuehne, Deussen, "Differentiable Sorting
Networks for Scalable Sorting and Ranking Supervision", ICML 2021, arXiv 2105.04019), odd-even
transposition network with the Cauchy relaxation, as a soft top-k membership.

Notation: x ∈ R^N one row's scores, V its valid slots, n = |V|, β > 0 the steepness. The n valid
scores are placed on wires 0..n−1 (slot order); v ∈ R^n are the wire values (v = x at the start)
and P ∈ R^{n×n} (wires × items, P = I at the start) tracks which items each wire holds.
Layer ℓ = 0..n−1 compares the wire pairs (a, b) = (i, i+1), i ≡ ℓ (mod 2), a above b:

    α_ab = ½ + arctan(β·(v_b − v_a)) / π            (probability that the pair swaps)
    v_a ← (1 − α)·v_a + α·v_b,   v_b ← α·v_a + (1 − α)·v_b
    P_a ← (1 − α)·P_a + α·P_b,   P_b ← α·P_a + (1 − α)·P_b        (rows a, b of P)

α → 1 when v_b > v_a, so larger values move to the upper wires: after n layers wire r holds
the (soft) r-th largest, and P̂ = P is ranks (descending) × items. Every comparator is a doubly
stochastic 2×2 mix, so P̂ is doubly stochastic (rows and columns sum to 1). Then
u_j = Σ_{r<k} P̂[r, j] / Σ_r P̂[r, j]. As β → ∞ with distinct scores, P̂ tends to the sorting
permutation and u to the hard top-k mask.

Cost: n layers of ⌊n/2⌋ comparators, each updating two rows of P with O(n) elementwise work, so
O(n³) time per row like the network itself (the paired rows of a layer are updated together as
(…, n/2, n) slices, never by dense n×n matrix products), O(n²) forward memory; autograd keeps
one (…, n/2, n) difference per layer for the backward, O(n³) in all.

Masks: the valid slots are compacted to the front of each row (stable), a row's comparators are
frozen (α = 0) past its own n layers and on wires >= n, so every row runs exactly the n-wire
network of its valid scores; the columns are then put back in slot order. Masked columns and
ranks r >= n are exactly 0.

Deviations from the port in the DFTopK/LCRON code (read, not copied):
- the wire values v are updated at every layer along with P (the port computes every layer's α
  from the unsorted input, which is not a sorting network);
- per-layer work is elementwise on the paired rows instead of four dense n×n matrix products
  (O(n³) instead of O(n⁴) per row);
- the output is ranks × items directly (the port returns items × wires and sorts −x ascending);
- masks (padded slots absent, per-row network size n) and float64 support; 16-bit inputs are
  computed in float32; only the Cauchy relaxation is offered (the one the protocol uses).
"""

from __future__ import annotations

import math

import torch

from raytopk.ops._permutation import (
    compact_valid,
    compute_dtype,
    prepare_permutation,
    rank_mask,
    run_permutation_op,
    valid_counts,
)
from raytopk.ops._registry import register

__all__ = ["DEFAULT_STEEPNESS", "soft_permutation", "diffsort", "step_bytes"]

# β of the RecFlow protocol (docs/protocol.md §2.4): the one default of every public
# function taking β.
DEFAULT_STEEPNESS = 10.0


def _interleave(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """[a_0, b_0, a_1, b_1, …] along ``dim`` (a negative dim)."""
    out = torch.stack((a, b), dim=dim)  # (..., m, 2, ...) at dim
    shape = list(a.shape)
    shape[dim] = 2 * a.shape[dim]
    return out.reshape(shape)


def _network(x: torch.Tensor, steepness: float, n: torch.Tensor | None) -> torch.Tensor:
    """Odd-even transposition network on the wires of x (..., N) -> P̂ (..., N, N).

    n: per-row network size (..., ) or None (= N everywhere). Wires >= n and layers >= n of a
    row are frozen, so those rows run the n-wire network.
    """
    size = x.shape[-1]
    layers = size if n is None else (int(n.max()) if n.numel() else 0)
    wire = torch.arange(size, device=x.device)
    v = x  # (..., N) wire values
    # The identity is only read (sliced) by the first layer, so an expanded view suffices.
    perm = torch.eye(size, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], size, size)
    mixed = False
    for layer in range(layers):
        p = layer % 2
        m = (size - p) // 2  # comparators (p, p+1), (p+2, p+3), ...
        if m == 0:
            continue
        end = p + 2 * m
        va, vb = v[..., p:end:2], v[..., p + 1 : end : 2]  # (..., m)
        alpha = 0.5 + torch.atan(steepness * (vb - va)) / math.pi  # (..., m) swap probability
        if n is not None:
            # Freeze comparators outside the row's own n-wire network (a lower wire b >= n, or
            # the row's n layers are done); where() also stops their gradient.
            active = (wire[p + 1 : end : 2] < n.unsqueeze(-1)) & (layer < n).unsqueeze(-1)
            alpha = torch.where(active, alpha, torch.zeros_like(alpha))
        dv = alpha * (vb - va)
        v = torch.cat((v[..., :p], _interleave(va + dv, vb - dv, -1), v[..., end:]), dim=-1)
        pa, pb = perm[..., p:end:2, :], perm[..., p + 1 : end : 2, :]  # (..., m, N)
        dp = alpha.unsqueeze(-1) * (pb - pa)  # (..., m, N) the comparator's mix, elementwise
        perm = torch.cat(
            (perm[..., :p, :], _interleave(pa + dp, pb - dp, -2), perm[..., end:, :]), dim=-2
        )
        mixed = True
    # Never hand out the expanded identity view (N = 1, or no layers): callers may write to it.
    return perm if mixed else perm.clone()


def _soft_permutation(x: torch.Tensor, steepness: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Unchecked kernel on a float32/float64 tensor (..., N) -> (..., N, N)."""
    if mask is None:
        return _network(x, steepness, None)
    size = x.shape[-1]
    n = valid_counts(mask, x)
    # Padding may hold inf/NaN: fill it before any arithmetic (frozen comparators still compute
    # their α, and inf − inf would poison the backward).
    x = x.masked_fill(~mask, 0.0)
    order, inverse = compact_valid(mask)  # valid slots first, stable
    perm = _network(x.gather(-1, order), steepness, n)  # (..., N ranks, N compacted items)
    # Columns back to slot order: compacted column c is slot order[c].
    perm = perm.gather(-1, inverse.unsqueeze(-2).expand(*inverse.shape[:-1], size, size))
    # Ranks r >= n still hold identity rows of the (masked) trailing wires.
    return perm.masked_fill(~rank_mask(n, size).unsqueeze(-1), 0.0)


def soft_permutation(
    scores: torch.Tensor, steepness: float = DEFAULT_STEEPNESS, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DiffSort P̂ of shape (..., N, N): rows = ranks (descending), columns = items.

    Args:
        scores: (..., N) float scores.
        steepness: β > 0 of the Cauchy relaxation.
        mask: (..., N) bool, True = valid, or None. Masked columns and ranks r >= n are 0.
    Returns the relaxation in the dtype of scores (computed in float32 for 16-bit inputs).
    """
    x, beta, mask_t = prepare_permutation(scores, "steepness", steepness, mask)
    return _soft_permutation(x.to(compute_dtype(x.dtype)), beta, mask_t).to(x.dtype)


def step_bytes(batch: int, n: int, itemsize: int = 4) -> int:
    """Peak bytes of one stage's training forward+backward through the LCRON loss: autograd
    keeps one (B, N/2, N) difference per layer for the backward, N layers (B·N³/2 in all),
    plus about six (B, N, N) tensors (P̂, the LCRON label relaxation Ŷ, their gradients)."""
    return int(batch * n * n * itemsize * (n / 2 + 6))


@register(
    "diffsort",
    param="steepness",
    hard_limit=1e5,
    sums_to_k=False,
    permutation=True,
    complexity="O(N^3)",  # n layers × n/2 comparators × O(n) row mix
    step_bytes=step_bytes,
    bf16=True,
    bf16_reason="the sorting network runs in float32 (_permutation.compute_dtype)",
    label_param=1000.0,  # the LCRON loss's label relaxation (raytopk.losses.lcron)
)
def diffsort(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    steepness: float = DEFAULT_STEEPNESS,
) -> torch.Tensor:
    """Soft top-k membership u_j = Σ_{r<k} P̂[r,j] / Σ_r P̂[r,j] from the sorting network's P̂.

    scores (..., N); k an int or a LongTensor of shape scores.shape[:-1]; mask (..., N) bool or
    None. Returns (..., N) in [0, 1], 0 at masked slots, 1 at valid slots of rows with k >= n.
    """
    return run_permutation_op(_soft_permutation, scores, k, mask, "steepness", steepness)
