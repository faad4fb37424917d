"""Loss forms and the names a run may train with (SPEC.md §3.4, §3.5).

Notation: p ∈ [0,1]^N a stage's membership, y ∈ [0,1]^N the label mass (data.labels), q = Π_s p^s
the joint membership, V the valid slots; every term is a mean over V.

Names. ``list_methods()`` = every registered top-k operator (raytopk.ops.list_ops) plus the
baselines that use no operator (``BASELINES``: ``bce``, SPEC §3.4, p = σ(x)). The config
(op.name) and the study (study.ops) consult this list; the operator registry does not hold the
baselines, so the operator contract tests never apply to them.

Forms (``loss.form``; ``auto`` = ``default_form(method)``):

- ``bce``: L_s = BCE(p, y), L_J = BCE(q, y) in log space (losses.cascade). DFTopK, the bce
  baseline: log p = logσ(z) exactly (z the logits), never saturates. LapSum, sparse top-k:
  logs of p clamped at the dtype's tiny (torch's BCE clamp): a positive at p = 0 costs
  −log(tiny) ≈ 87 with zero gradient (SPEC §3.5).
- ``bce_log`` (LapSum): the same BCE on LapSum's same membership, computed in log space from its
  threshold b (t = x/α − b; log F(t) = t − log 2 for t ≤ 0, log(1 − ½e^{−t}) above; the gradient
  of b is LapSum's implicit one, ∂b/∂x = f/(αΣf)). Equal to ``bce`` wherever p is representable,
  but ∂(−log p)/∂t → −1 instead of 0 where p underflows (large scores): no clamped constant.
- ``bce_logits``: the authors' reference code: BCE-with-logits with the membership as the logit,
  L_s = softplus(p) − y·p, L_J = softplus(q) − y·q. Bounded (≤ log(1 + e)), gradient σ(p) − y
  never 0, but it cannot make p reach 0 or 1 (its optimum is p → ±∞).
- ``mse``: L_s = (p − y)², L_J = (q − y)². Bounded by 1, zero only at the label.
- ``hinge`` (sparse top-k): the permutahedron of (1_k, 0_{N−k}) is the capped simplex, so
  m = clip(u, 0, 1) with u = x/l − τ (τ: the projection's threshold, read off the operator's own
  m at its free slots, with their gradient). L_s = y·(1 − u)_+ + (1 − y)·u_+ (= |m − y| for
  0/1 labels inside [0, 1]); it keeps a gradient of 1/l at a slot saturated on the WRONG side
  (a positive at m = 0, a negative at m = 1), none at one saturated on the right side. L_J as mse.
- ``lcron``: the LCRON loss (SPEC §3.3), the only form of the permutation operators.

A form only changes what is applied to the operator's output: where the operator's own Jacobian
is 0 (sparse top-k at exactly 0 or 1: a singleton isotonic block) no form gives a gradient; what
a bounded form removes is the clamped constant (10–20 per stage loss) that the uncertainty
weights absorb, w² ≈ L_s, shrinking every useful stage gradient (SPEC §3.5).

Default form per method, chosen by measurement (jobs/bench_losses.py: short local-backend runs
on the quickstart data, validation = the last training day; the figures are in the docstring of
jobs/bench_losses.py and in the branch's report):

- dftopk: ``bce`` (logits form; already unsaturated).
- lapsum: ``bce_log`` (same loss value, no clamped constant, no gradient underflow).
- sparse_topk: ``mse`` (bounded, keeps w near 1; bce_logits is kept as the reference option).
- bce baseline: ``bce``.  neuralsort, softsort, diffsort: ``lcron``.
"""

from __future__ import annotations

__all__ = [
    "BASELINES",
    "FORMS",
    "list_methods",
    "check_method",
    "is_operator",
    "forms_for",
    "default_form",
    "resolve_form",
]

BASELINES: tuple[str, ...] = ("bce",)
FORMS: tuple[str, ...] = ("bce", "bce_log", "bce_logits", "mse", "hinge", "lcron")
_CHOSEN = {"dftopk": "bce", "lapsum": "bce_log", "sparse_topk": "mse", "bce": "bce"}


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


def forms_for(method: str) -> tuple[str, ...]:
    """The loss forms ``method`` can be trained with (its default first)."""
    from raytopk.ops import get_spec

    check_method(method)
    if method in BASELINES:
        return ("bce",)
    if get_spec(method).permutation:
        return ("lcron",)
    forms = ["bce", "bce_logits", "mse"]
    forms += {"lapsum": ["bce_log"], "sparse_topk": ["hinge"]}.get(method, [])
    first = default_form(method)
    return (first, *[f for f in forms if f != first])


def default_form(method: str) -> str:
    from raytopk.ops import get_spec

    check_method(method)
    if method in _CHOSEN:
        return _CHOSEN[method]
    return "lcron" if get_spec(method).permutation else "bce"


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
