"""Test-day evaluation of a trained cascade (docs/protocol.md §4.5), on one worker or all-reduced
over many.

Notation: B = requests per batch, N = schema.N_EVAL = 200 candidates per request (40 own slots +
160 sampled), S = cascade stages, G = the ground-truth top-K (K = 10), cuts = the survivors each
stage keeps (``raytopk.metrics.eval_cuts``: retrieval 30, pre-rank 20, ...).

Besides the metrics of ``raytopk.metrics.CascadeMetrics`` (joint and per-stage recall, NDCG,
Kendall tau; names from ``raytopk.metrics.metric_keys``) it returns what random selection scores
on the same requests, and, with a retrieval DSSM first and an item corpus, full-corpus retrieval
recall with faiss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch
from raytopk.metrics import CascadeMetrics, eval_cuts, stage_names
from raytopk.progress import Progress
from raytopk.train.model import CascadeModel

__all__ = ["evaluate", "random_key"]


def random_key(key: str) -> str:
    """The name of random selection's score for metric ``key`` (e.g. random_joint_recall@10@20)."""
    return f"random_{key}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def evaluate(
    cascade: CascadeModel,
    batches: Iterable[CascadeBatch],
    device: torch.device,
    *,
    k: int = schema.K_TRUTH,
    corpus_items: dict[str, np.ndarray] | None = None,
    corpus_ms: list[int] | tuple[int, ...] = (),
    progress: Progress | None = None,
) -> dict[str, float]:
    """docs/protocol.md §4.5 metrics over ``batches`` (this worker's share of the test day).
    ``progress``: advanced once per batch (a long evaluation's progress lines).

    Sums and counts are all-reduced when torch.distributed runs several workers. Also returns
    the exact expectation of each recall when the stages pick at random (a stage keeping c of n
    valid slots at random keeps a uniform subset, so it recovers min(c, n) / n of G in
    expectation; the joint cut is then a uniform subset of min(cuts[-1], n) slots), named by
    ``random_key``, on the same requests. With ``corpus_items`` and a retrieval DSSM first, adds
    ``corpus_recall@k@M`` for every M (faiss inner-product search over the whole item table;
    rank 0 computes it over the user vectors gathered from every worker, other ranks return the
    rest).
    """
    cascade.eval()
    cuts = eval_cuts(len(cascade.scorers))
    names = stage_names(len(cascade.scorers))
    metrics = CascadeMetrics(cuts=cuts, k=k)
    # Expected random recall sums at each stage's cut, then at the joint (last) cut; the count.
    rand = torch.zeros(len(cuts) + 2, dtype=torch.float64)
    retrieval = cascade.scorers[0]
    want_corpus = bool(
        corpus_items is not None and corpus_ms and hasattr(retrieval, "user_vectors")
    )
    users: list[np.ndarray] = []
    positives: list[np.ndarray] = []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        scores = cascade.scores(batch)
        metrics.update(scores, batch)
        n = batch.cand_mask.sum(-1).double().cpu()  # (B,) valid slots
        has = n > 0
        for i, c in enumerate((*cuts, cuts[-1])):
            rand[i] += (n.clamp(max=c) / n.clamp(min=1))[has].sum()
        rand[-1] += has.sum()
        if want_corpus:
            users.append(retrieval.user_vectors(batch).float().cpu().numpy())
            pos_mask = batch.cand_mask[:, : schema.GROUP_SIZE].cpu().numpy()  # rank_pos slots
            vids = batch.items[:, : schema.GROUP_SIZE, 0].cpu().numpy()
            positives += [v[m] for v, m in zip(vids, pos_mask)]
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.done()
    out = dict(metrics.compute())
    if _distributed():
        rand = rand.to(device)
        dist.all_reduce(rand)
        rand = rand.cpu()
    count = max(float(rand[-1]), 1.0)
    for i, (name, c) in enumerate(zip(names, cuts)):
        out[random_key(f"{name}_recall@{k}@{c}")] = float(rand[i]) / count
    out[random_key(f"joint_recall@{k}@{cuts[-1]}")] = float(rand[len(cuts)]) / count
    if want_corpus:
        out.update(_corpus_metrics(retrieval, corpus_items, users, positives, corpus_ms, k, device))
    cascade.train()
    return out


def _corpus_metrics(
    retrieval: nn.Module,
    items: dict[str, np.ndarray],
    users: list[np.ndarray],
    positives: list[np.ndarray],
    ms: list[int] | tuple[int, ...],
    k: int,
    device: torch.device,
) -> dict[str, float]:
    from raytopk.metrics.corpus import corpus_recall, embed_corpus

    u = np.concatenate(users) if users else np.zeros((0, 1), np.float32)
    if _distributed():
        # Rank 0 scores the whole test day; gathering (Q, 32) float32 vectors is cheap next to
        # building a faiss index on every worker.
        gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((u, positives), gathered, dst=0)
        if dist.get_rank() != 0:
            return {}
        u = np.concatenate([g[0] for g in gathered])
        positives = [p for g in gathered for p in g[1]]
    item_vecs, item_ids = embed_corpus(retrieval, items, device=device)
    res = corpus_recall(u, item_vecs, item_ids, positives, k=k, ms=tuple(ms))
    out = {key: float(v) for key, v in res.items()}
    for m in ms:  # a random retriever finds each positive with probability M / corpus size
        out[random_key(f"corpus_recall@{k}@{m}")] = min(m, len(item_ids)) / max(len(item_ids), 1)
    return out
