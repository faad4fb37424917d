"""Cascade losses (docs/protocol.md §3.1 joint BCE loss, §3.3 LCRON): float64 references written
slot by slot from the formulas, masks, the uncertainty weights, rows with k >= #valid, every
registered operator, and descent when the scores themselves are optimised."""

from __future__ import annotations

import math

import pytest
import torch

from raytopk.data.batch import CascadeBatch, random_batch
from raytopk.data.labels import ground_truth
from raytopk.losses import (
    CascadeTopKLoss,
    LCRONLoss,
    build_loss,
    lcron_single_stage_loss,
    topk_stage_loss,
)
from raytopk.losses.joint import combine, log1mexp, uncertainty_total
from raytopk.losses.lcron import label_param_of, soft_permutation_fn
from raytopk.ops import get_op, get_spec, list_ops

OPS = list_ops()
TOPK_OPS = [op for op in OPS if not get_spec(op).permutation]
PERM_OPS = [op for op in OPS if get_spec(op).permutation]
EPS = 1e-8


def batch_of(priority: torch.Tensor, mask: torch.Tensor) -> CascadeBatch:
    """A random batch carrying these priorities and candidate mask."""
    return random_batch(*priority.shape, priority=priority, mask=mask)


# A small float64 example: 2 stages, 3 requests of 6 slots, masked slots holding junk, ties in
# the priorities, one row with only 4 valid slots.
SCORES = [
    torch.tensor(
        [
            [2.0, -1.0, 0.5, 3.0, 9.0, 0.2],
            [0.1, 0.4, -0.3, 1.2, 0.0, 0.7],
            [1.5, -0.5, 0.3, 0.8, -2.0, 2.5],
        ],
        dtype=torch.float64,
    ),
    torch.tensor(
        [
            [1.0, 0.0, 2.0, -2.0, 7.0, 0.4],
            [0.3, -0.2, 0.9, 0.5, 0.6, -0.1],
            [-1.0, 0.6, 0.2, 1.1, 0.0, 0.5],
        ],
        dtype=torch.float64,
    ),
]
PRIO = torch.tensor(
    [[5.0, 7.0, 6.0, 30.0, 99.0, 7.0], [7.0, 7.0, 5.0, 6.0, 0.0, 28.0], [6, 5, 7, 0, 29, 7.0]]
)
MASK = torch.tensor(
    [
        [True, True, True, True, False, True],
        [True] * 6,
        [True, False, True, True, True, False],
    ]
)


def _params(op: str, value: float = 1.0) -> dict[str, float]:
    return {get_spec(op).param: value}


TINY = torch.finfo(torch.float64).tiny


def _bce(p: float, y: float) -> float:
    """BCE against the label mass y ∈ [0, 1], logs of exact 0s clamped at log(tiny), as the loss
    documents."""
    return -(y * math.log(max(p, TINY)) + (1.0 - y) * math.log(max(1.0 - p, TINY)))


def _reference_topk_loss(op, params, scores, prio, mask, ks, k_truth):
    """Slot-by-slot docs/protocol.md §3.1 in Python floats (DFTopK's membership by hand, others from
    the op)."""
    labels = ground_truth(prio, mask, k_truth)
    b, n = mask.shape
    p = []
    for x, k in zip(scores, ks):
        if op == "dftopk":
            ps = torch.zeros(b, n, dtype=torch.float64)
            for r in range(b):
                vals = sorted((x[r, j].item() for j in range(n) if mask[r, j]), reverse=True)
                for j in range(n):
                    if not mask[r, j]:
                        continue
                    if k >= len(vals):
                        ps[r, j] = 1.0
                    else:
                        theta = (vals[k - 1] + vals[k]) / 2
                        ps[r, j] = 1 / (1 + math.exp(-(x[r, j].item() - theta) / params["tau"]))
            p.append(ps)
        else:
            p.append(get_op(op)(x, k, mask, **params))
    stage_losses = []
    for ps, k in zip(p, ks):
        terms = [
            _bce(ps[r, j].item(), float(labels[r, j]))
            for r in range(b)
            for j in range(n)
            if mask[r, j] and k < mask[r].sum()
        ]
        stage_losses.append(sum(terms) / len(terms))
    joint = []
    for r in range(b):
        if all(k >= mask[r].sum() for k in ks):
            continue
        for j in range(n):
            if mask[r, j]:
                q = math.prod(ps[r, j].item() for ps in p)
                joint.append(_bce(q, float(labels[r, j])))
    joint_loss = sum(joint) / len(joint)
    return stage_losses, joint_loss


@pytest.mark.parametrize("op", TOPK_OPS)
def test_cascade_loss_matches_slot_by_slot_reference(op: str) -> None:
    params = {"tau": 0.7} if op == "dftopk" else _params(op, 2.0 if op == "lapsum" else 1.0)
    ks = [3, 2]
    loss = build_loss(op, params, ks, k_truth=2, form="bce")  # formulas: docs/protocol.md §3.1
    assert isinstance(loss, CascadeTopKLoss)
    total, parts = loss(SCORES, batch_of(PRIO, MASK))
    stages, joint = _reference_topk_loss(op, params, SCORES, PRIO, MASK, ks, 2)
    for s, ref in enumerate(stages):
        assert parts[f"stage{s}"].item() == pytest.approx(ref, rel=1e-9)
        assert parts[f"w{s}"].item() == 1.0
    assert parts["joint"].item() == pytest.approx(joint, rel=1e-9)
    assert total.item() == pytest.approx(sum(stages) / 2 + joint, rel=1e-9)
    assert set(parts) == {"stage0", "stage1", "joint", "w0", "w1"}


def test_dftopk_pinned_value() -> None:
    # One row, k = 1, τ = 1: x = (2, 0, 1) -> θ = 1.5, z = (0.5, -1.5, -0.5), y = (1, 0, 0).
    x = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    prio = torch.tensor([[3.0, 1.0, 2.0]])
    stage = topk_stage_loss("dftopk", x, ground_truth(prio, mask, 1), 1, mask, tau=1.0)
    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expect = (softplus(-0.5) + softplus(-1.5) + softplus(-0.5)) / 3  # y=1: sp(-z); y=0: sp(z)
    assert stage.item() == pytest.approx(expect, rel=1e-12)
    assert stage.item() == pytest.approx(0.383189082114, rel=1e-11)


def test_weights_enter_as_uncertainty_terms() -> None:
    loss = build_loss("dftopk", {"tau": 1.0}, [3, 2], 2)
    batch = batch_of(PRIO, MASK)
    total, parts = loss(SCORES, batch)
    total.backward()
    # dL/dρ_s = 1 - L_s / w_s² with w = exp(ρ) = 1 at initialisation.
    expect = torch.stack([1 - parts["stage0"], 1 - parts["stage1"]]).float()
    torch.testing.assert_close(loss.log_w.grad, expect)
    with torch.no_grad():
        loss.log_w.copy_(torch.tensor([math.log(2.0), math.log(0.5)]))
    total2, parts2 = loss(SCORES, batch)
    ref = parts["stage0"] / 8 + parts["stage1"] * 2 + parts["joint"] + math.log(2.0 * 0.5)
    assert total2.item() == pytest.approx(ref.item(), rel=1e-6)
    assert parts2["w0"].item() == pytest.approx(2.0) and parts2["w1"].item() == pytest.approx(0.5)
    assert not parts2["w0"].requires_grad and not parts2["stage0"].requires_grad


def _with_junk_in_masked_slots(scores, prio, mask):
    junk = [torch.where(mask, s, torch.full_like(s, 1e3)) for s in scores]
    return junk, torch.where(mask, prio, torch.full_like(prio, 1e3))


@pytest.mark.parametrize("op", OPS)
def test_masked_slots_do_not_change_the_loss(op: str) -> None:
    loss = build_loss(op, _params(op), [3, 2], k_truth=2)
    total, parts = loss(SCORES, batch_of(PRIO, MASK))
    junk_scores, junk_prio = _with_junk_in_masked_slots(SCORES, PRIO, MASK)
    total2, parts2 = loss(junk_scores, batch_of(junk_prio, MASK))
    torch.testing.assert_close(total2, total)
    # One request alone equals the same request with its masked slots removed.
    keep = MASK[0]
    single = [s[:1] for s in SCORES]
    t_masked, _ = loss(single, batch_of(PRIO[:1], MASK[:1]))
    t_removed, _ = loss(
        [s[:, keep] for s in single], batch_of(PRIO[:1, keep], torch.ones(1, 5, dtype=torch.bool))
    )
    torch.testing.assert_close(t_masked, t_removed)


@pytest.mark.parametrize("op", OPS)
def test_rows_with_k_at_least_valid_are_finite(op: str) -> None:
    prio = PRIO.clone()
    mask = MASK.clone()
    mask[1, 3:] = False  # 3 valid: stage 0 (k=3) keeps everything, stage 1 (k=2) selects
    mask[2, :] = False
    mask[2, 2] = True  # 1 valid: every stage keeps everything
    scores = [s.clone().requires_grad_(True) for s in SCORES]
    loss = build_loss(op, _params(op), [3, 2], k_truth=2)
    total, parts = loss(scores, batch_of(prio, mask))
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    for s in scores:
        assert torch.isfinite(s.grad).all()
        assert (s.grad[~mask] == 0).all()
    assert (scores[0].grad[1:] == 0).all()  # stage 0 selects nothing in rows 1, 2
    assert (scores[1].grad[2] == 0).all()
    # The row where every stage keeps everything contributes nothing.
    t_without, _ = loss([s[:2] for s in SCORES], batch_of(prio[:2], mask[:2]))
    torch.testing.assert_close(total.detach(), t_without)
    # k beyond every row: still finite (no selection anywhere, only the weight terms remain).
    t_big, _ = build_loss(op, _params(op), [50, 50], k_truth=2)(scores, batch_of(prio, mask))
    assert t_big.item() == 0.0


@pytest.mark.parametrize("op", TOPK_OPS)
def test_extreme_scores_stay_finite(op: str) -> None:
    # Scores far apart relative to the operator's parameter saturate memberships at 0 and 1.
    x = [SCORES[0] * 1e4, -SCORES[1] * 1e4]
    for s in x:
        s.requires_grad_(True)
    loss = build_loss(op, _params(op, 1e-3), [3, 2], k_truth=2)
    total, _ = loss(x, batch_of(PRIO, MASK))
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(s.grad).all() for s in x)


def test_log1mexp() -> None:
    a = torch.tensor([-1e-30, -1e-8, -0.5, -0.7, -1.0, -30.0, -800.0], dtype=torch.float64)
    a.requires_grad_(True)
    out = log1mexp(a)
    ref = [math.log(-math.expm1(v)) for v in a.tolist()]
    for got, want in zip(out.tolist(), ref):
        assert got == pytest.approx(want, rel=1e-12)
    out.sum().backward()
    assert torch.isfinite(a.grad).all()


# ---- LCRON -----------------------------------------------------------------------------------


def test_lcron_single_stage_by_hand() -> None:
    perm = torch.tensor(
        [[[0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]], dtype=torch.float64
    ).requires_grad_(True)
    labels = torch.tensor(
        [[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64
    )
    loss = lcron_single_stage_loss(perm, labels, k=1)
    col = [1.1 + EPS, 0.8 + EPS, 1.1 + EPS]  # column sums (+ ε, as in the formula)
    u = [0.6 / col[0], 0.3 / col[1], 0.1 / col[2]]
    d = [0.5 / col[0], 0.5 / col[1], 1.0 / col[2]]
    yhat, ybar = [0, 1, 0], [1, 0, 1]
    terms = [-(yhat[j] * math.log(u[j] + EPS) + ybar[j] * math.log(d[j] + EPS)) for j in range(3)]
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    loss.backward()
    # Stop-gradient on the column sums c_j:
    # dL/dP[r, j] = -(1/3) (ŷ_j/(u_j+ε) [r<k] + ȳ_j/(d_j+ε) [r≥k]) / c_j
    grad = torch.zeros(3, 3, dtype=torch.float64)
    for r in range(3):
        for j in range(3):
            g = yhat[j] / (u[j] + EPS) if r < 1 else ybar[j] / (d[j] + EPS)
            grad[r, j] = -g / (3 * col[j])
    torch.testing.assert_close(perm.grad[0], grad)
    # A mask drops slot 2 from the mean; k >= #valid drops the row.
    m = torch.tensor([[True, True, False]])
    assert lcron_single_stage_loss(perm, labels, 1, m).item() == pytest.approx(sum(terms[:2]) / 2)
    assert lcron_single_stage_loss(perm, labels, 2, m).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        lcron_single_stage_loss(perm, labels[..., :2], 1)


def _reference_lcron(loss: LCRONLoss, scores, prio, mask):
    """Slot-by-slot docs/protocol.md §3.3 in Python floats from the op's soft permutations."""
    sp = soft_permutation_fn(loss.op)
    labels = ground_truth(prio, mask, loss.k_truth)  # ŷ = y, ȳ = 1 − y (one label rule)
    perms = [sp(x, loss.params[loss.param_name], mask) for x in scores]
    b, n = mask.shape
    stage_terms = [[] for _ in scores]
    joint_terms = []
    for r in range(b):
        nv = int(mask[r].sum())
        for j in range(n):
            if not mask[r, j]:
                continue
            yhat = float(labels[r, j])
            ybar = 1.0 - yhat
            us, ds = [], []
            for s, (perm, k) in enumerate(zip(perms, loss.ks)):
                col = sum(perm[r, i, j].item() for i in range(n)) + EPS
                u = sum(perm[r, i, j].item() for i in range(k)) / col
                d = sum(perm[r, i, j].item() for i in range(k, n)) / col
                if k >= nv:
                    u, d = 1.0, 0.0
                else:
                    stage_terms[s].append(-(yhat * math.log(u + EPS) + ybar * math.log(d + EPS)))
                us.append(u)
                ds.append(d)
            if all(k >= nv for k in loss.ks):
                continue
            up = math.prod(us)
            keep = math.prod(1 - d for d in ds)
            joint_terms.append(-(yhat * math.log(up + EPS) + (1 - yhat) * math.log(1 - keep + EPS)))
    stages = [sum(t) / len(t) for t in stage_terms]
    return stages, sum(joint_terms) / len(joint_terms)


@pytest.mark.parametrize("op", PERM_OPS)
def test_lcron_matches_slot_by_slot_reference(op: str) -> None:
    params = _params(op, 0.5)
    loss = build_loss(op, params, [3, 2], k_truth=2)
    assert isinstance(loss, LCRONLoss) and loss.label_param == label_param_of(op)
    scores = [s.clone().requires_grad_(True) for s in SCORES]
    total, parts = loss(scores, batch_of(PRIO.double(), MASK))
    stages, joint = _reference_lcron(loss, SCORES, PRIO, MASK)
    for s, ref in enumerate(stages):
        assert parts[f"stage{s}"].item() == pytest.approx(ref, rel=1e-7)
    assert parts["joint"].item() == pytest.approx(joint, rel=1e-7)
    assert total.item() == pytest.approx(sum(stages) / 2 + joint, rel=1e-7)
    total.backward()
    for s in scores:
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        assert (s.grad[~MASK] == 0).all()


@pytest.mark.parametrize("op", PERM_OPS)
def test_lcron_labels(op: str) -> None:
    loss = build_loss(op, None, [10, 10], k_truth=2)
    assert loss.params == {get_spec(op).param: get_spec(op).default}
    # Distinct priorities: the label relaxation is (nearly) the hard top-2.
    prio = torch.tensor([[3.0, 9.0, 1.0, 7.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    yperm = loss.label_permutation(prio, mask)
    yhat = yperm[0, :2].sum(0)
    tol = 1e-3 if op == "diffsort" else 1e-6
    torch.testing.assert_close(yhat, torch.tensor([0.0, 1, 0, 1, 0, 0]), atol=tol, rtol=0)
    # Ties straddling rank K: the tie block shares the remaining rank(s).
    prio = torch.tensor([[9.0, 7.0, 7.0, 7.0, 1.0, 0.0]])
    yhat = loss.label_permutation(prio, torch.ones(1, 6, dtype=torch.bool))[0, :2].sum(0)
    assert yhat[0].item() == pytest.approx(1.0, abs=tol)
    assert yhat[1:4].sum().item() == pytest.approx(1.0, abs=tol)
    assert (yhat[1:4] > 0.2).all()  # shared, not given to one slot
    assert yhat[4:].sum().item() == pytest.approx(0.0, abs=tol)


@pytest.mark.parametrize("op", OPS)
def test_optimising_scores_decreases_loss(op: str) -> None:
    torch.manual_seed(0)
    b, n = 4, 20
    prio = torch.rand(b, n) * 10
    mask = torch.rand(b, n) > 0.1
    batch = batch_of(prio, mask)
    scores = [torch.nn.Parameter(torch.randn(b, n)) for _ in range(2)]
    loss = build_loss(op, _params(op), [5, 5], k_truth=5)
    opt = torch.optim.Adam([*scores, *loss.parameters()], lr=0.1)
    history = []
    for _ in range(25):
        total, _ = loss(scores, batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < history[0] - 0.1, history


def test_three_stages_and_errors() -> None:
    loss = build_loss("dftopk", {"tau": 1.0}, [4, 3, 2], k_truth=2)
    third = SCORES[0] - SCORES[1]
    total, parts = loss([*SCORES, third], batch_of(PRIO, MASK))
    assert {"stage2", "w2"} <= set(parts) and torch.isfinite(total)
    stages, joint = _reference_topk_loss(
        "dftopk", {"tau": 1.0}, [*SCORES, third], PRIO, MASK, [4, 3, 2], 2
    )
    assert parts["joint"].item() == pytest.approx(joint, rel=1e-9)
    with pytest.raises(ValueError, match="'scores' has 2 stages but ks"):
        loss(SCORES, batch_of(PRIO, MASK))
    with pytest.raises(ValueError, match="does not take; its parameter is 'tau'"):
        build_loss("dftopk", {"alpha": 5.0}, [10, 10])
    with pytest.raises(ValueError, match="unknown operator 'nope'"):
        build_loss("nope", {}, [10, 10])
    with pytest.raises(ValueError, match="'ks\\[1\\]' should be an int >= 1"):
        build_loss("lapsum", {}, [10, 0])
    for op in ("dftopk", PERM_OPS[0]):  # one k check for both losses
        with pytest.raises(ValueError, match="'k_truth' should be an int >= 1 but got True"):
            build_loss(op, {}, [10, 10], k_truth=True)
    with pytest.raises(ValueError, match="use LCRONLoss"):
        CascadeTopKLoss(PERM_OPS[0], {}, [10, 10])
    with pytest.raises(ValueError, match="not a permutation relaxation"):
        LCRONLoss("dftopk", {}, [10, 10])


def test_defaults_come_from_the_registry() -> None:
    for op in OPS:
        loss = build_loss(op, {}, [10, 10])
        assert loss.params == {get_spec(op).param: get_spec(op).default}


def test_combine_is_the_weighted_total_and_the_logged_parts() -> None:
    stage = [torch.tensor(0.8, requires_grad=True), torch.tensor(0.3, requires_grad=True)]
    joint = torch.tensor(1.1, requires_grad=True)
    log_w = torch.tensor([math.log(2.0), 0.0], requires_grad=True)
    total, parts = combine(stage, joint, log_w)
    assert total.item() == pytest.approx(0.8 / 8 + 0.3 / 2 + 1.1 + math.log(2.0))
    assert torch.equal(total, uncertainty_total(stage, joint, log_w))
    assert list(parts) == ["stage0", "stage1", "joint", "w0", "w1"]
    assert parts["w0"].item() == pytest.approx(2.0) and parts["joint"].item() == pytest.approx(1.1)
    assert not any(v.requires_grad for v in parts.values()) and total.requires_grad
    with pytest.raises(ValueError, match="'stage_losses' has 1 stages but 'log_w' has 2"):
        combine(stage[:1], joint, log_w)

