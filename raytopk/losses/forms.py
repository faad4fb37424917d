"""Loss forms and the names a run may train with (docs/protocol.md §3.4, §3.5).

Notation: p ∈ [0,1]^N a stage's membership, y ∈ [0,1]^N the label mass (data.labels), q = Π_s p^s
the joint membership, V the valid slots; every term is a mean over V.

Names. ``list_methods()`` = every registered top-k operator (raytopk.ops.list_ops) plus the
baselines that use no operator (``BASELINES``: ``bce``, docs/protocol.md §3.4, p = σ(x)). The config
(op.name) and the study (study.ops) consult this list; the operator registry does not hold the
baselines, so the operator contract tests never apply to them.

Forms (``loss.form``; ``auto`` = ``default_form(method)``):

- ``bce``: L_s = BCE(p, y), L_J = BCE(q, y) in log space (losses.joint). DFTopK, the bce
  baseline: log p = logσ(z) exactly (z the logits), never saturates. LapSum, sparse top-k:
  logs of p clamped at the dtype's tiny (torch's BCE clamp): a positive at p = 0 costs
  −log(tiny) ≈ 87 with zero gradient (docs/protocol.md §3.5).
- ``bce_log`` (LapSum): the same BCE on LapSum's same membership, computed in log space from its
  threshold b (t = x/α − b; log F(t) = t − log 2 for t ≤ 0, log(1 − ½e^{−t}) above; the gradient
  of b is LapSum's implicit one, ∂b/∂x = f/(αΣf)). Equal to ``bce`` wherever p is representable,
  but no clamp: the loss is the true −log p (linear in t where p underflows, at large scores),
  and its gradient, ∂(−log p)/∂t → −1, never underflows to 0.
- ``bce_logits``: the authors' reference code: BCE-with-logits with the membership as the logit,
  L_s = softplus(p) − y·p, L_J = softplus(q) − y·q. Bounded (≤ log(1 + e)), gradient σ(p) − y
  never 0, but it cannot make p reach 0 or 1 (its optimum is p → ±∞).
- ``mse``: L_s = (p − y)², L_J = (q − y)². Bounded by 1, zero only at the label.
- ``hinge`` (sparse top-k): the permutahedron of (1_k, 0_{N−k}) is the capped simplex, so
  m = clip(u, 0, 1) with u = x/l − τ (τ: the projection's threshold, read off the operator's own
  m at its free slots, with their gradient). L_s = y·(1 − u)_+ + (1 − y)·u_+ (= |m − y| for
  0/1 labels inside [0, 1]); it keeps a gradient of 1/l at a slot saturated on the WRONG side
  (a positive at m = 0, a negative at m = 1), none at one saturated on the right side. L_J as mse.
- ``lcron``: the LCRON loss (docs/protocol.md §3.3), the only form of the permutation operators.

bce, bce_logits and mse only change what is applied to the operator's output m: where m's own
Jacobian is 0 (sparse top-k at exactly 0 or 1: a singleton isotonic block; LapSum where f
underflows) none of them gives a gradient; what a bounded form removes is the clamped constant
(−log(tiny) per saturated positive) that the uncertainty weights absorb, w² ≈ L_s, shrinking
every useful stage gradient (docs/protocol.md §3.5). bce_log (LapSum) and hinge (sparse top-k) reach
behind the saturation, through the operator's own threshold.

Choice (jobs/bench_losses.py, seeds 42 and 43; one pass over 2024-01-13..14, 12,000 requests,
validation on 2024-01-15, the quickstart's last training day): the highest mean validation joint
Recall@10@20; within 0.005 of it, the form with the fewest "stuck" slots (zero gradient on the
wrong side, |m − y| ≥ 0.5) at scores × 100. Means of the two seeds; L_0, w_0, "stuck" of
the retrieval stage on 8 validation batches (pre-rank alike):

    op           form        val R@10@20 (s42/s43)  L_0    w_0   stuck  L_0 ×100  stuck ×100
    dftopk       bce         .474/.456 (.4650)      0.43   0.66  0      16.7      0
    dftopk       mse         .465/.463 (.4641)      0.12   0.43  0      0.18      0.13
    dftopk       bce_logits  .195/.170 (.1825)      0.76   0.88  0.37   0.76      0.38
    lapsum       bce         .470/.467 (.4685)      0.41   0.65  0      11.5      0.04
    lapsum       bce_log     .471/.461 (.4659)      0.41   0.65  0      12.3      0
    lapsum       mse         .469/.462 (.4654)      0.12   0.43  0      0.18      0.05
    lapsum       bce_logits  .360/.377 (.3685)      0.70   0.84  0      0.70      0.21
    sparse_topk  mse         .475/.462 (.4684)      0.12   0.43  0.02   0.18      0.19
    sparse_topk  hinge       .465/.465 (.4650)      0.23   0.50  0      6.92      0
    sparse_topk  bce_logits  .382/.355 (.3685)      0.71   0.85  0.27   0.71      0.28
    sparse_topk  bce         .349/.293 (.3211)      0.81   0.82  0      22.7      0.25
    bce          bce         .429/.401 (.4152)      0.50   0.71  0      17.4      0

- dftopk: ``bce`` (the logits form: never saturated; mse ties it, bce_logits collapses).
- lapsum: ``bce_log`` (ties bce; at scores × 100 no stuck slot, bce 4%).
- sparse_topk: ``hinge`` (ties mse; no stuck slot, mse 19% at × 100; bce and the reference
  code's bce_logits lose 0.10–0.15).
- bce baseline: ``bce``.  neuralsort, softsort, diffsort: ``lcron``.
"""

from __future__ import annotations

from raytopk.ops._registry import OpSpec

__all__ = [
    "BASELINES",
    "FORMS",
    "list_methods",
    "check_method",
    "is_operator",
    "forms_for",
    "default_form",
    "resolve_form",
    "method_spec",
    "step_bytes",
]

FORMS: tuple[str, ...] = ("bce", "bce_log", "bce_logits", "mse", "hinge", "lcron")


def _bce_baseline_spec() -> OpSpec:
    """The ``bce`` baseline as a method entry: membership σ(x), no top-k (docs/protocol.md
    §3.4), so no row is ever decided by k and the stage k is unused."""
    import torch

    def membership(scores, k, mask=None):  # noqa: ANN001, ANN202 - the operator contract
        p = torch.sigmoid(scores)
        return p if mask is None else p.masked_fill(~mask, 0.0)

    return OpSpec(
        name="bce", fn=membership, param="", default=0.0, hard_limit=0.0, sums_to_k=False,
        permutation=False, complexity="O(N)", step_bytes=lambda b, n, itemsize=4: 6 * b * n * 4,
        bf16=True, bf16_reason="σ in float32", logits=lambda scores, k, mask=None: scores,
        default_form="bce", selects=False,
    )  # fmt: skip


_BASELINE_SPECS = {"bce": _bce_baseline_spec}  # baselines: methods without an operator
BASELINES: tuple[str, ...] = tuple(_BASELINE_SPECS)


def method_spec(method: str) -> OpSpec:
    """Everything the losses need of ``method``: its registry entry, or the baseline's."""
    from raytopk.ops import get_spec

    check_method(method)
    baseline = _BASELINE_SPECS.get(method)
    return baseline() if baseline is not None else get_spec(method)


def list_methods() -> list[str]:
    """Every name op.name / study.ops accept: the registered operators, then the baselines."""
    from raytopk.ops import list_ops

    return [*list_ops(), *BASELINES]


def is_operator(method: str) -> bool:
    return method not in BASELINES


def check_method(method: object) -> str:
    if not isinstance(method, str) or method not in list_methods():
        raise ValueError(f"unknown operator {method!r}; valid: {list_methods()}")
    return method


def step_bytes(method: str, batch_size: int, num_candidates: int, num_stages: int = 2) -> int:
    """Peak bytes of one training step's operator and loss work: every stage runs the method on
    (batch_size, num_candidates) scores (the estimate declared with its entry; the bce
    baseline's: σ(x), its logs and their gradients). Evaluation never builds soft
    permutations, so it needs no such estimate. The one memory rule of the benchmarks and the
    study: a point whose estimate exceeds their budget is recorded, not run."""
    return num_stages * method_spec(method).step_bytes(batch_size, num_candidates)


def step_fits(method: str, batch_size: int, num_candidates: int, num_stages: int,
              budget_gb: float) -> bool:  # fmt: skip
    """Whether a training step of ``method`` fits ``budget_gb`` GiB by :func:`step_bytes` (the
    study's rule for which methods run, set budgets, and are recorded as not fitting)."""
    return step_bytes(method, batch_size, num_candidates, num_stages) <= budget_gb * 1024**3


def forms_for(method: str) -> tuple[str, ...]:
    """The loss forms ``method`` can be trained with (its default first), from what its entry
    provides: a membership (bce, bce_logits, mse), exact logs (bce_log), an unclipped
    membership (hinge), a soft permutation (lcron only)."""
    spec = method_spec(method)
    if not spec.selects:
        return ("bce",)
    if spec.permutation:
        return ("lcron",)
    forms = ["bce", "bce_logits", "mse"]
    forms += ["bce_log"] if spec.log_membership is not None else []
    forms += ["hinge"] if spec.unclipped is not None else []
    first = default_form(method)
    return (first, *[f for f in forms if f != first])


def default_form(method: str) -> str:
    """The form ``method`` trains with by default: its entry's default_form, else lcron for a
    permutation operator and bce otherwise."""
    spec = method_spec(method)
    if spec.default_form:
        return spec.default_form
    return "lcron" if spec.permutation else "bce"


def resolve_form(method: str, form: str) -> str:
    """``form`` checked against ``method`` (``auto``: its default); ValueError naming both."""
    if form == "auto":
        return default_form(method)
    if form not in forms_for(method):
        raise ValueError(
            f"loss form {form!r} is not available for {method!r}; valid: "
            f"{['auto', *forms_for(method)]}"
        )
    return form
