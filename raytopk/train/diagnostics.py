"""What DFTopK's training signal looks like at a point of a run (the study's anytime rows).

Notation: S stages, stage s keeps k_s; x (B, N) = stage s's scores on a training batch, valid
slots only; θ = DFTopK's threshold (midpoint of x_[k] and x_[k+1]); p = σ((x − θ)/τ) the soft
membership; g = ∂loss/∂x the joint loss's gradient on the scores (the models not in it); π(k),
π(k+1) = the two boundary slots, through which all of θ's gradient flows.

Per stage s, averaged over the batch's rows (rows whose k_s is at least their valid count have no
boundary and are left out):
- ``diag_psum_over_k{s}``: Σ_j p_j / k_s. 1 when the soft membership keeps k items; far above 1
  when the sigmoids are unsaturated (scores spread little relative to τ).
- ``diag_boundary_grad_share{s}``: Σ g² on π(k), π(k+1) / Σ g² over the row's valid slots,
  summed over rows: the share of the score gradient's squared norm on the two boundary slots.
- ``diag_score_std_over_tau{s}``: the row's standard deviation of valid scores / τ.

Methods other than DFTopK return {} (nothing of theirs is measured here).
"""

from __future__ import annotations

import torch

from raytopk.data.batch import CascadeBatch

__all__ = ["diagnostics"]


def diagnostics(cascade: torch.nn.Module, batch: CascadeBatch) -> dict[str, float]:
    """The DFTopK diagnostics of ``cascade`` (a CascadeModel) on ``batch`` (module docstring)."""
    from raytopk.ops.dftopk import _threshold, dftopk

    loss = cascade.loss
    if getattr(loss, "op", None) != "dftopk":
        return {}
    tau = float(loss.params["tau"])
    was_training = cascade.training
    cascade.eval()
    try:
        with torch.no_grad():
            scores = [x.detach().float() for x in cascade.scores(batch)]
        leaves = [x.clone().requires_grad_() for x in scores]
        with torch.enable_grad():
            total, _ = loss(leaves, batch)
            grads = torch.autograd.grad(total, leaves)
    finally:
        cascade.train(was_training)
    mask = batch.cand_mask
    n_valid = mask.sum(-1)
    out: dict[str, float] = {}
    for s, (x, g, k) in enumerate(zip(scores, grads, loss.ks)):
        rows = n_valid > k  # rows with a boundary
        if not bool(rows.any()):
            continue
        xr, gr, mr = x[rows], g[rows].masked_fill(~mask[rows], 0.0), mask[rows]
        p = dftopk(xr, int(k), mr, tau=tau)
        kk = torch.full((xr.shape[0],), int(k), dtype=torch.long)
        _, idx = _threshold(xr.cpu(), kk, mr.cpu(), "auto")
        idx = idx.to(xr.device).clamp_min(0)
        g2 = gr.pow(2)
        on_boundary = g2.gather(-1, idx).sum()
        xm = xr.masked_fill(~mr, 0.0)
        cnt = mr.sum(-1).clamp_min(1)
        mean = xm.sum(-1) / cnt
        var = ((xr - mean.unsqueeze(-1)).pow(2) * mr).sum(-1) / cnt
        out[f"diag_psum_over_k{s}"] = round(float((p.sum(-1) / k).mean()), 4)
        share = on_boundary / g2.sum().clamp_min(1e-30)
        out[f"diag_boundary_grad_share{s}"] = round(float(share), 4)
        out[f"diag_score_std_over_tau{s}"] = round(float((var.sqrt() / tau).mean()), 4)
    return out
