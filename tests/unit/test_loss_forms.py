"""One label rule in every loss family (docs/protocol.md §4.3), the bce baseline (§3.4) and the loss
forms (§3.5): hand-made batches with ties at the K-th priority and requests with < K own slots."""

from __future__ import annotations

import pytest
import torch

from raytopk.data.batch import CascadeBatch, random_batch
from raytopk.data.labels import ground_truth
from raytopk.losses import build_loss
from raytopk.ops import get_op, get_spec, list_ops

OPS = list_ops()
TOPK_OPS = [op for op in OPS if not get_spec(op).permutation]
PERM_OPS = [op for op in OPS if get_spec(op).permutation]


def batch_of(priority: torch.Tensor, mask: torch.Tensor) -> CascadeBatch:
    return random_batch(*priority.shape, priority=priority, mask=mask)


# K = 3. Row 0: 30 above, then 7, 7, 7 tied at the 3rd priority: 2/3 each (a slot-order tie-break
# would give slots 1, 2 and not 5). Row 1: two own valid slots, the rest sampled negatives
# (priority 0): 2 positives, not 3. Row 2: slots 4, 5 tie at the 3rd priority: 1/2 each.
TIE_PRIO = torch.tensor(
    [
        [5.0, 7.0, 7.0, 30.0, 6.0, 7.0, 0.0],
        [29.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0],
        [28.0, 27.0, 0.0, 5.0, 6.0, 6.0, 0.0],
    ]
)
TIE_MASK = torch.tensor([[True] * 7, [True] * 7, [True, True, True, False, True, True, True]])
TIE_Y = torch.tensor(
    [
        [0.0, 2 / 3, 2 / 3, 1.0, 0.0, 2 / 3, 0.0],
        [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0],
    ],
    dtype=torch.float64,
)
TIE_SCORES = [
    torch.randn(3, 7, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    for s in (1, 2)
]


@pytest.mark.parametrize("op", [*OPS, "bce"])
def test_every_family_uses_the_tie_rule_and_per_row_k(op: str) -> None:
    assert torch.equal(ground_truth(TIE_PRIO.double(), TIE_MASK, 3), TIE_Y)
    loss = build_loss(op, None, [4, 4], k_truth=3)
    _, parts = loss(TIE_SCORES, batch_of(TIE_PRIO.double(), TIE_MASK))
    _, by_hand = loss.from_labels(TIE_SCORES, TIE_Y, TIE_MASK)
    slot_order = TIE_Y.clone()  # what a slot-order tie-break with sampled positives would give
    slot_order[0] = torch.tensor([0, 1, 1, 1, 0, 0, 0.0])
    slot_order[1] = torch.tensor([1, 1, 1, 0, 0, 0, 0.0])
    slot_order[2] = torch.tensor([1, 1, 0, 0, 1, 0, 0.0])
    _, other = loss.from_labels(TIE_SCORES, slot_order, TIE_MASK)
    for key in ("stage0", "stage1", "joint"):
        assert parts[key].item() == pytest.approx(by_hand[key].item(), rel=1e-12)
    assert abs(parts["joint"].item() - other["joint"].item()) > 1e-6


def test_bce_baseline_matches_the_formula_and_is_not_an_operator() -> None:
    from raytopk.losses import list_methods

    assert "bce" in list_methods() and "bce" not in list_ops()
    loss = build_loss("bce", None, [10, 10], k_truth=3)
    assert loss.form == "bce" and loss.params == {}
    x = [s.clone().requires_grad_(True) for s in TIE_SCORES]
    total, parts = loss(x, batch_of(TIE_PRIO.double(), TIE_MASK))
    y, m = TIE_Y, TIE_MASK

    def bce(p: torch.Tensor) -> float:
        return float((-(y * p.log() + (1 - y) * (1 - p).log()))[m].mean())

    p0, p1 = torch.sigmoid(TIE_SCORES[0]), torch.sigmoid(TIE_SCORES[1])
    assert parts["stage0"].item() == pytest.approx(bce(p0), rel=1e-10)  # k = 10 >= #valid: used
    assert parts["joint"].item() == pytest.approx(bce(p0 * p1), rel=1e-10)
    total.backward()
    assert all((g.grad[m] != 0).all() and (g.grad[~m] == 0).all() for g in x)
    with pytest.raises(ValueError, match="takes no parameters"):
        build_loss("bce", {"tau": 1.0}, [10, 10])
    with pytest.raises(ValueError, match="not available for 'bce'"):
        build_loss("bce", None, [10, 10], form="mse")


@pytest.mark.parametrize("form", ["mse", "bce_logits"])
@pytest.mark.parametrize("op", TOPK_OPS)
def test_bounded_forms_match_their_formula(op: str, form: str) -> None:
    loss = build_loss(op, None, [3, 2], k_truth=3, form=form)
    assert loss.form == form
    _, parts = loss.from_labels(TIE_SCORES, TIE_Y, TIE_MASK)
    p = [get_op(op)(x, k, TIE_MASK) for x, k in zip(TIE_SCORES, (3, 2))]
    q = p[0] * p[1]

    def term(v: torch.Tensor) -> float:
        t = (v - TIE_Y) ** 2 if form == "mse" else torch.nn.functional.softplus(v) - TIE_Y * v
        return float(t[TIE_MASK].mean())

    assert parts["stage0"].item() == pytest.approx(term(p[0]), rel=1e-9)
    assert parts["stage1"].item() == pytest.approx(term(p[1]), rel=1e-9)
    assert parts["joint"].item() == pytest.approx(term(q), rel=1e-9)


def test_lapsum_log_form_equals_bce_and_keeps_gradients_at_large_scores() -> None:
    log_form = build_loss("lapsum", None, [3, 3], k_truth=3, form="bce_log")
    plain = build_loss("lapsum", None, [3, 3], k_truth=3, form="bce")
    x = [s.clone().requires_grad_(True) for s in TIE_SCORES]
    y = [s.clone().requires_grad_(True) for s in TIE_SCORES]
    t1, a = log_form.from_labels(x, TIE_Y, TIE_MASK)
    t2, b = plain.from_labels(y, TIE_Y, TIE_MASK)
    for key in ("stage0", "stage1", "joint"):
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-9)
    t1.backward()
    t2.backward()
    for gx, gy in zip(x, y):
        torch.testing.assert_close(gx.grad, gy.grad, rtol=1e-7, atol=1e-12)
    # Score scale 1e4 (α = 5): memberships underflow to exact 0/1; the plain form loses the
    # gradient there, the log form keeps it.
    big = [(s * 1e4).requires_grad_(True) for s in TIE_SCORES]
    big2 = [(s * 1e4).requires_grad_(True) for s in TIE_SCORES]
    t1, a = log_form.from_labels(big, TIE_Y, TIE_MASK)
    t2, b = plain.from_labels(big2, TIE_Y, TIE_MASK)
    t1.backward()
    t2.backward()
    zero_log = sum(int(((g.grad == 0) & TIE_MASK).sum()) for g in big)
    zero_plain = sum(int(((g.grad == 0) & TIE_MASK).sum()) for g in big2)
    assert zero_log < zero_plain
    # The clamp caps −log p at −log(tiny); the log form gives the true value (|t| − log 2).
    assert a["stage0"].item() > b["stage0"].item()


def test_forms_are_validated() -> None:
    from raytopk.losses import default_form, forms_for

    assert forms_for("dftopk")[0] == default_form("dftopk")
    assert "bce_log" in forms_for("lapsum") and "bce_log" not in forms_for("sparse_topk")
    for op in PERM_OPS:
        assert forms_for(op) == ("lcron",)
        with pytest.raises(ValueError, match="not available"):
            build_loss(op, None, [10, 10], form="mse")
    with pytest.raises(ValueError, match="not available for 'dftopk'"):
        build_loss("dftopk", None, [10, 10], form="bce_log")


def test_sparse_hinge_keeps_gradients_where_the_operator_saturates_wrongly() -> None:
    from raytopk.losses.joint import stage_membership, stage_terms

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 12, generator=g, dtype=torch.float64) * 5
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[0, -3:] = False
    y = torch.zeros(6, 12, dtype=torch.float64)
    y[:, :3] = 1.0
    none = torch.zeros(6, dtype=torch.bool)
    zero_wrong = {}
    for form in ("mse", "hinge"):
        x = x0.clone().requires_grad_(True)
        m = stage_membership("sparse_topk", x, 3, mask, {"l": 1.0}, none, form)
        stage_terms(m, y, form)[mask].sum().backward()
        wrong = mask & ((m.p - y).abs() >= 0.5)
        zero_wrong[form] = int(((x.grad == 0) & wrong).sum())
        assert wrong.sum() > 3 and (x.grad[~mask] == 0).all()
        if form == "hinge":  # m = clip(u, 0, 1): u is the operator's own unclipped membership
            torch.testing.assert_close(m.u.clamp(0, 1)[mask], m.p[mask])
    assert zero_wrong["mse"] > 3 and zero_wrong["hinge"] == 0
    loss = build_loss("sparse_topk", None, [3, 3], k_truth=3, form="hinge")
    total, _ = loss.from_labels([x0, x0.flip(-1)], y, mask)
    assert torch.isfinite(total)
