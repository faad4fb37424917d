"""Cascade metrics (docs/protocol.md §4.5) against scikit-learn / scipy, hand-built recall cases,
and the DDP aggregation (sums and counts all-reduced, not a mean of means) on a 2-process gloo
group."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score

from raytopk.data.batch import CascadeBatch, random_batch
from raytopk.data.labels import ground_truth
from raytopk.metrics import (
    CascadeMetrics,
    eval_cuts,
    headline_key,
    joint_recall_at,
    kendall_tau_b,
    metric_keys,
    ndcg_at,
    recall_at,
    stage_names,
)


def batch_of(priority: torch.Tensor, mask: torch.Tensor) -> CascadeBatch:
    """A random batch carrying these priorities and candidate mask."""
    return random_batch(*priority.shape, priority=priority, mask=mask)


def recflow_like(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Priorities shaped like docs/protocol.md §4.3 (rank_pos 30 - rank_index, groups 7/6/5, sampled
    0) with padded slots; ties everywhere but the rank_pos group."""
    batch = random_batch(b, n, seed=seed)
    return batch.priority, batch.cand_mask


def test_ndcg_matches_sklearn_with_ties_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    b, n = 200, 40
    prio, mask = recflow_like(b, n, seed=1)
    scores = torch.randint(0, 8, (b, n), generator=g).float()  # heavy score ties
    scores[::3] = torch.randn(len(range(0, b, 3)), n, generator=g)  # and rows without ties
    prio[5] = 0.0  # a row with every gain 0 (sklearn scores 0)
    for k in (10, 3, 60):
        ours = ndcg_at(scores, prio, mask, k)
        ref = [
            ndcg_score([prio[r, mask[r]].numpy()], [scores[r, mask[r]].numpy()], k=k)
            for r in range(b)
        ]
        np.testing.assert_allclose(ours.numpy(), np.array(ref), rtol=0, atol=1e-12)
    assert ours[5] == 0


def test_kendall_tau_matches_scipy() -> None:
    g = torch.Generator().manual_seed(2)
    b, n = 150, 30
    prio, mask = recflow_like(b, n + 10, seed=3)
    prio, mask = prio[:, :n], mask[:, :n]
    scores = torch.randint(0, 6, (b, n), generator=g).float()
    scores[::2] = torch.randn(b // 2, n, generator=g)
    scores[7] = 1.0  # all scores tied: undefined
    mask[9] = False
    mask[9, 4] = True  # one valid slot: undefined
    tau, ok = kendall_tau_b(scores, prio, mask)
    for r in range(b):
        with warnings.catch_warnings():  # scipy warns on the 1-slot row; NaN is the point
            warnings.simplefilter("ignore")
            ref = kendalltau(scores[r, mask[r]].numpy(), prio[r, mask[r]].numpy()).statistic
        if math.isnan(ref):
            assert not ok[r], r
        else:
            assert ok[r], r
            assert abs(tau[r].item() - ref) < 1e-12, r
    assert not ok[7] and not ok[9]


def test_kendall_tau_row_blocks_and_the_cpu_kernel_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # The vectorised path (other devices), in row blocks of any size, and the CPU kernel give
    # the same τ (ties included: integer scores).
    import raytopk.metrics.cascade as mc

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(13, 20, generator=g), torch.randn(13, 20, generator=g)
    x[::3] = torch.randint(0, 4, (5, 20), generator=g).float()
    mask = torch.rand(13, 20, generator=g) > 0.3
    kernel = kendall_tau_b(x, y, mask)
    full = mc._kendall_blocks(x, y, mask)
    monkeypatch.setattr(mc, "_KENDALL_BLOCK", 3 * 20 * 20)  # 3 rows per block
    blocked = mc._kendall_blocks(x, y, mask)
    assert torch.equal(full[0], blocked[0]) and torch.equal(full[1], blocked[1])
    assert torch.equal(kernel[1], full[1])
    assert torch.allclose(kernel[0], full[0], rtol=0, atol=1e-15)


def test_recall_perfect_and_reversed() -> None:
    prio, mask = recflow_like(64, 40, seed=5)
    truth = ground_truth(prio, mask, 10)
    assert torch.allclose(truth.sum(-1), ((prio > 0) & mask).sum(-1).clamp(max=10).float())
    # A perfect scorer ranks by priority; every slot with label mass (above or tied at the
    # 10th priority: at most 10 rank_pos + 10 tied rank_neg) is in its top 30.
    perfect = prio - 1e-3 * torch.arange(40).float()
    assert torch.all(recall_at(perfect, mask, truth, 30) == 1.0)
    # Its top 10: everything above the 10th priority, and some of the tied slots, each worth
    # its share (k_b − |A|)/|T|: recall@10 = (|A| + (k_b − |A|)²/|T|) / k_b.
    kb = truth.sum(-1).double()
    n_above = (truth == 1).sum(-1).double()
    n_tied = ((truth > 0) & (truth < 1)).sum(-1).double()
    rest = kb - n_above
    want = (n_above + torch.where(n_tied > 0, rest * rest / n_tied.clamp(min=1), rest)) / kb
    torch.testing.assert_close(recall_at(perfect, mask, truth, 10), want)
    assert (want < 1).any()  # the batch has ties at the 10th priority
    # The reversed scorer's top 10 are the 10 lowest valid slots: no label mass there.
    n_valid = mask.sum(-1)
    r = recall_at(-perfect, mask, truth, 10)
    mass_low = (n_valid - (truth > 0).sum(-1)) >= 10
    assert torch.all(r[mass_low] == 0.0)
    # The scores of masked slots never matter.
    noisy = torch.where(mask, perfect, torch.full_like(perfect, 1e6))
    assert torch.all(recall_at(noisy, mask, truth, 30) == 1.0)


def test_recall_tie_rule_and_sampled_negatives_by_hand() -> None:
    # K = 2: slot 0 (priority 9) is a positive; slots 1-3 tie at 7 and share one label: 1/3 each.
    # Slots 4-5 are sampled negatives (priority 0).
    prio = torch.tensor([[9.0, 7.0, 7.0, 7.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    truth = ground_truth(prio, mask, 2)
    s = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.0, 0.0], [0.0, 9.0, 8.0, 7.0, 6.0, 5.0]])
    # Row 0: top 2 = slots 0, 1 -> (1 + 1/3) / 2; top 3 adds a sampled negative: no mass.
    # Row 1: one own slot, so k_b = 1 (a sampled negative is never a positive): the top 5 miss it.
    torch.testing.assert_close(recall_at(s, mask, truth, 2), torch.tensor([2 / 3, 0.0]).double())
    torch.testing.assert_close(recall_at(s, mask, truth, 3), torch.tensor([2 / 3, 0.0]).double())
    torch.testing.assert_close(recall_at(s, mask, truth, 6), torch.tensor([1.0, 1.0]).double())
    joint = joint_recall_at([s, -s], mask, truth, (3, 1))  # pre-rank keeps the worst of 3
    torch.testing.assert_close(joint, torch.tensor([0.0, 0.0]).double())
    joint = joint_recall_at([s, s], mask, truth, (3, 2))
    torch.testing.assert_close(joint, torch.tensor([2 / 3, 0.0]).double())
    metric = CascadeMetrics((3, 2), k=2)
    metric.update([s, s], batch_of(prio, mask))
    assert metric.compute()["joint_recall@2@2"] == pytest.approx(1 / 3)


def test_recall_small_requests_divide_by_truth_size() -> None:
    prio = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])
    mask = torch.tensor([[True, True, True, False, False, False]])
    truth = ground_truth(prio, mask, 10)  # |G| = 3 valid slots
    assert recall_at(torch.tensor([[0.0, 1.0, 2.0, 9.0, 9.0, 9.0]]), mask, truth, 2) == 2 / 3


def test_joint_recall_chains_the_cuts() -> None:
    # N = 6, truth = slots {0, 1}, cuts (3, 2): retrieval keeps its top 3, pre-rank the top 2 of
    # those. Pre-rank loves slot 1, but retrieval drops it: the joint recall cannot count it.
    prio = torch.tensor([[9.0, 8.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    truth = ground_truth(prio, mask, 2)
    retrieval = torch.tensor([[5.0, 0.0, 4.0, 3.0, 2.0, 1.0]])  # keeps {0, 2, 3}
    prerank = torch.tensor([[2.0, 9.0, 1.0, 0.0, 0.0, 3.0]])  # alone: top 2 = {1, 5}
    assert recall_at(prerank, mask, truth, 2) == 0.5
    assert recall_at(retrieval, mask, truth, 3) == 0.5
    # Joint: of {0, 2, 3} pre-rank keeps {0, 2}: hits {0}.
    assert joint_recall_at([retrieval, prerank], mask, truth, (3, 2)) == 0.5
    # Same, but pre-rank now prefers 2 and 3 among the survivors: joint 0 although slot 0 was
    # retrieved and pre-rank alone would still rank slot 1 first.
    prerank2 = torch.tensor([[0.0, 9.0, 1.0, 2.0, 0.0, 3.0]])
    assert joint_recall_at([retrieval, prerank2], mask, truth, (3, 2)) == 0.0
    # Masked slots do not survive a cut in place of valid ones.
    mask2 = torch.tensor([[True, True, True, False, True, True]])
    ret2 = torch.tensor([[5.0, 4.5, 4.0, 99.0, 2.0, 1.0]])
    pre3 = torch.tensor([[5.0, 9.0, 1.0, 99.0, 0.0, 3.0]])  # would keep masked slot 3 first
    assert joint_recall_at([ret2, pre3], mask2, ground_truth(prio, mask2, 2), (3, 2)) == 1.0


def test_joint_recall_three_stages_and_errors() -> None:
    prio = torch.tensor([[9.0, 8.0, 7.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    truth = ground_truth(prio, mask, 2)
    s1 = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # keeps 0..3
    s2 = torch.tensor([[1.0, 5.0, 4.0, 3.0, 9.0, 9.0]])  # of 0..3 keeps 1, 2, 3
    s3 = torch.tensor([[9.0, 1.0, 5.0, 4.0, 9.0, 9.0]])  # of 1..3 keeps 2
    assert joint_recall_at([s1, s2, s3], mask, truth, (4, 3, 1)) == 0.0
    assert joint_recall_at([s1, s2, s2], mask, truth, (4, 3, 1)) == 0.5
    with pytest.raises(ValueError, match="has 2 stages but 'cuts'"):
        joint_recall_at([s1, s2], mask, truth, (4, 3, 1))


def _reference_metrics(scores, prio, mask, cuts=(30, 20), k=10) -> dict[str, float]:
    """Per-request Python/sklearn/scipy reference of CascadeMetrics' values."""
    rows = [r for r in range(prio.shape[0]) if mask[r].any()]
    out: dict[str, list[float]] = {}
    for r in rows:
        v = mask[r].nonzero().flatten().tolist()
        p = prio[r, v].tolist()
        # The label rule by hand: k_b own (priority > 0) slots; the slots tied at the k_b-th
        # priority share what the slots above it leave.
        own = sorted((x for x in p if x > 0), reverse=True)
        kb = min(k, len(own))
        theta = own[kb - 1] if kb else math.inf
        above = sum(1 for x in own if x > theta)
        tied = sum(1 for x in own if x == theta)
        y = {
            j: (1.0 if x > theta else (kb - above) / tied if x == theta else 0.0)
            for j, x in zip(v, p)
        }

        def hits(kept: list[int], y=y, kb=kb) -> float:
            return sum(y[j] for j in kept) / max(kb, 1)

        survivors = v
        for s, (sc, cut) in enumerate(zip(scores, cuts)):
            name = ("retrieval", "prerank")[s]
            alone = sorted(v, key=lambda j, sc=sc: -sc[r, j].item())[:cut]
            out.setdefault(f"{name}_recall@{k}@{cut}", []).append(hits(alone))
            survivors = sorted(survivors, key=lambda j, sc=sc: -sc[r, j].item())[:cut]
            if len(v) > 1:
                ndcg = ndcg_score([p], [sc[r, v].tolist()], k=k)
            else:
                ndcg = 1.0 if p[0] > 0 else 0.0
            out.setdefault(f"{name}_ndcg@{k}", []).append(ndcg)
            tau = kendalltau(sc[r, v].numpy(), np.array(p)).statistic
            if not math.isnan(tau):
                out.setdefault(f"{name}_kendall_tau", []).append(tau)
        out.setdefault(f"joint_recall@{k}@{cuts[-1]}", []).append(hits(survivors))
    res = {key: float(np.mean(vals)) for key, vals in out.items()}
    res["num_requests"] = float(len(rows))
    return res


def _random_eval(b: int, seed: int, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    prio, mask = recflow_like(b, n, seed)
    ret = prio + 3 * torch.randn(b, n, generator=g)
    pre = prio + 2 * torch.randn(b, n, generator=g)
    return [ret, pre], prio, mask


def test_cascade_metrics_match_reference_and_are_means_over_requests() -> None:
    metric = CascadeMetrics()
    batches = [_random_eval(b, seed) for b, seed in ((17, 0), (3, 1), (40, 2))]
    batches[1][2][0] = False  # a request without a valid slot is not counted
    for scores, prio, mask in batches:
        metric.update(scores, batch_of(prio, mask))
    got = metric.compute()
    scores = [torch.cat([bt[0][s] for bt in batches]) for s in range(2)]
    prio = torch.cat([bt[1] for bt in batches])
    mask = torch.cat([bt[2] for bt in batches])
    ref = _reference_metrics(scores, prio, mask)
    assert set(got) == {
        "joint_recall@10@20",
        "retrieval_recall@10@30",
        "prerank_recall@10@20",
        "retrieval_ndcg@10",
        "prerank_ndcg@10",
        "retrieval_kendall_tau",
        "prerank_kendall_tau",
        "num_requests",
    }
    assert got["num_requests"] == 59
    for key, val in ref.items():
        assert abs(got[key] - val) < 1e-9, (key, got[key], val)
    # Not a mean of per-batch means:
    per_batch = []
    for scores_b, prio_b, mask_b in batches:
        m = CascadeMetrics()
        m.update(scores_b, batch_of(prio_b, mask_b))
        per_batch.append(m.compute()["joint_recall@10@20"])
    assert abs(np.mean(per_batch) - got["joint_recall@10@20"]) > 1e-6
    metric.reset()
    assert math.isnan(metric.compute()["joint_recall@10@20"])


def test_cascade_metrics_rejects_bad_input() -> None:
    (ret, pre), prio, mask = _random_eval(4, 0)
    m = CascadeMetrics()
    with pytest.raises(ValueError, match="has 1 stages but cuts"):
        m.update([ret], batch_of(prio, mask))
    bad = pre.clone()
    bad[mask] = float("nan")
    with pytest.raises(ValueError, match="'prerank' scores are not finite"):
        m.update([ret, bad], batch_of(prio, mask))
    with pytest.raises(ValueError, match="non-increasing"):
        CascadeMetrics(cuts=(20, 30))


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = CascadeMetrics()
        # Uneven shards: rank 0 sees 30 requests, rank 1 sees 5.
        scores, prio, mask = _random_eval(30 if rank == 0 else 5, seed=10 + rank)
        metric.update(scores, batch_of(prio, mask))
        res = metric.compute()
        if rank == 0:
            torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def test_cascade_metrics_all_reduce_across_workers(tmp_path) -> None:
    out = tmp_path / "res.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    single = CascadeMetrics()
    for rank in range(2):
        scores, prio, mask = _random_eval(30 if rank == 0 else 5, seed=10 + rank)
        single.update(scores, batch_of(prio, mask))
    expect = single.compute()
    assert got["num_requests"] == 35
    for key, val in expect.items():
        assert abs(got[key] - val) < 1e-12, key


def test_metric_names_come_from_one_place() -> None:
    assert [eval_cuts(s) for s in (1, 2, 3, 4)] == [(20,), (30, 20), (30, 20, 10), (30, 20, 10, 5)]
    assert stage_names(1) == ("retrieval",) and stage_names(3) == ("retrieval", "prerank", "rank")
    assert headline_key(1) == "joint_recall@10@20" and headline_key(2) == "joint_recall@10@20"
    assert headline_key(3) == "joint_recall@10@10" and headline_key(3, k=5) == "joint_recall@5@10"
    assert metric_keys(2) == (
        "joint_recall@10@20",
        "retrieval_recall@10@30",
        "retrieval_ndcg@10",
        "retrieval_kendall_tau",
        "prerank_recall@10@20",
        "prerank_ndcg@10",
        "prerank_kendall_tau",
    )
    for s in (1, 2, 3, 4):
        keys = metric_keys(s)
        assert keys[0] == headline_key(s) and len(keys) == 1 + 3 * s == len(set(keys))
        metric = CascadeMetrics(cuts=eval_cuts(s))
        assert metric.names == stage_names(s) and metric.keys == keys
        assert set(metric.compute()) - {"num_requests"} == set(keys)
        (ret, pre), prio, mask = _random_eval(5, seed=s)
        metric.update([ret, pre, pre - ret, ret + pre][:s], batch_of(prio, mask))
        got = metric.compute()
        assert list(got) == [*keys, "num_requests"] and got["num_requests"] == 5
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="'num_stages' should be an int in 1..4"):
            metric_keys(bad)
    with pytest.raises(ValueError, match="'names' should name each of the 5 stages"):
        CascadeMetrics(cuts=(30, 20, 10, 5, 2))
