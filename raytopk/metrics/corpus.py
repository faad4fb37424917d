"""Full-corpus retrieval evaluation with faiss (docs/protocol.md §4.5, last item; as RecFlow's
retrieval benchmark, arXiv 2410.20868).

Notation: Q = queries (test requests), M = corpus items, D = vector dim, P_q = query q's positive
items (its rank_pos video ids, in priority order), R_q^m = the m corpus items of largest inner
product ⟨u_q, v_i⟩ (exact search, faiss IndexFlatIP).

    corpus_recall@K@m = mean_q |R_q^m ∩ P_q[:K]| / min(K, |P_q|)

over the queries with at least one positive (others are left out; their number is not in the
mean). Positives are compared by stored video id as sets: duplicate ids in P_q count once, and a
corpus holding one id twice cannot count it twice. The first K positives are used (callers pass
them in priority order; with RecFlow's ≤ 10 rank_pos slots and K = 10 that is all of them).

The index is a GPU IndexFlatIP when faiss has GPUs (``faiss.StandardGpuResources`` exists and
``faiss.get_num_gpus() > 0``) and max(ms) is within faiss' GPU k limit (2048), else a CPU one.
Queries are searched in blocks so the (Q, max m) result never has to be held at once, with as
many threads as torch has (``torch.get_num_threads()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from raytopk.data import schema

__all__ = ["corpus_recall", "embed_corpus", "build_index", "GPU_MAX_K"]

GPU_MAX_K = 2048  # faiss GPU brute-force search returns at most this many neighbours
_QUERY_BLOCK = 16384


def _faiss():
    try:
        import faiss
    except ImportError as e:  # faiss is an extra: faiss-cpu or faiss-gpu-cu12
        raise ImportError(
            "corpus retrieval needs faiss: pip install 'raytopk[cpu]' (faiss-cpu) or "
            "'raytopk[gpu]' (faiss-gpu-cu12)"
        ) from e
    # faiss brings its own OpenMP runtime, sized by OMP_NUM_THREADS or every core: search with
    # the threads torch was given (a worker's allotment; run.eval_threads after training).
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _as_f32(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"'{name}' should have shape (rows, D) but got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"'{name}' has non-finite values")
    return arr


def build_index(item_vecs: np.ndarray, max_k: int, use_gpu: bool | None = None) -> tuple:
    """Exact inner-product index over item_vecs (M, D) float32, GPU when available.

    Returns (index, resources): keep ``resources`` (the GPU memory manager, None on CPU) alive
    as long as the index is used."""
    faiss = _faiss()
    d = item_vecs.shape[1]
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    gpu = (has_gpu and max_k <= GPU_MAX_K) if use_gpu is None else bool(use_gpu)
    if gpu and not has_gpu:
        raise ValueError("'use_gpu' is True but this faiss build has no GPU support or no GPU")
    if gpu and max_k > GPU_MAX_K:
        raise ValueError(f"a GPU index returns at most {GPU_MAX_K} neighbours; got m = {max_k}")
    index = faiss.IndexFlatIP(d)
    res = None
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(item_vecs)
    return index, res


def corpus_recall(
    user_vecs: np.ndarray | torch.Tensor,
    item_vecs: np.ndarray | torch.Tensor,
    item_ids: np.ndarray | torch.Tensor,
    positives: Sequence[Sequence[int] | np.ndarray],
    k: int = 10,
    ms: Sequence[int] = (100, 500),
    *,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """Recall@k@m of exact inner-product retrieval over the corpus for each m in ``ms``.

    Args:
        user_vecs: (Q, D) query vectors (the retrieval user tower).
        item_vecs: (M, D) corpus vectors (the retrieval item tower).
        item_ids: (M,) stored video id of each corpus row.
        positives: Q sequences of stored video ids (the query's rank_pos items).
        k: K, how many positives count per query.
        ms: retrieval depths m.
        use_gpu: None = a GPU index when faiss has one; True/False to force.

    Returns:
        {"corpus_recall@{k}@{m}": float for m in ms} and "corpus_num_queries" (queries with at
        least one positive).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"'k' should be an int >= 1 but got {k!r}")
    ms = tuple(ms)
    if not ms or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms):
        raise ValueError(f"'ms' should be ints >= 1 but got {ms!r}")
    u = _as_f32(user_vecs, "user_vecs")
    v = _as_f32(item_vecs, "item_vecs")
    if u.shape[1] != v.shape[1]:
        raise ValueError(
            f"'user_vecs' dim {u.shape[1]} does not match 'item_vecs' dim {v.shape[1]}"
        )
    ids = np.asarray(
        item_ids.cpu().numpy() if isinstance(item_ids, torch.Tensor) else item_ids, dtype=np.int64
    )
    if ids.shape != (v.shape[0],):
        raise ValueError(
            f"'item_ids' should have shape ({v.shape[0]},) like item_vecs' rows but got {ids.shape}"
        )
    if len(positives) != u.shape[0]:
        raise ValueError(
            f"'positives' has {len(positives)} entries but 'user_vecs' has {u.shape[0]} queries"
        )
    q = u.shape[0]
    # Positives as a (Q, K) id matrix padded with -2 (faiss' "no result" maps to id -1 below, so
    # padding can never match a retrieved slot); duplicates dropped keeping first occurrences.
    pos = np.full((q, k), -2, dtype=np.int64)
    for i, p in enumerate(positives):  # building the input, not the hot path
        arr = np.asarray(p, dtype=np.int64).reshape(-1)
        _, first = np.unique(arr, return_index=True)
        arr = arr[np.sort(first)][:k]
        pos[i, : arr.size] = arr
    n_pos = (pos != -2).sum(1)
    has = n_pos > 0

    max_m = min(max(ms), v.shape[0])
    hits = {m: 0.0 for m in ms}
    if max_m > 0 and has.any():
        index, _res = build_index(v, max_m, use_gpu)
        for start in range(0, q, _QUERY_BLOCK):
            sl = slice(start, start + _QUERY_BLOCK)
            _, labels = index.search(u[sl], max_m)  # (q_b, max_m), best first
            got = torch.from_numpy(np.where(labels >= 0, ids[np.maximum(labels, 0)], -1))
            p = torch.from_numpy(pos[sl])  # (q_b, K)
            denom = torch.from_numpy(np.minimum(n_pos[sl], k).clip(min=1)).to(torch.float64)
            for m in ms:
                top = torch.sort(got[:, : min(m, max_m)], dim=1).values
                at = torch.searchsorted(top, p).clamp_max(top.shape[1] - 1)
                found = (top.gather(1, at) == p).sum(1).to(torch.float64)  # (q_b,)
                hits[m] += float((found / denom)[torch.from_numpy(has[sl])].sum())
    n = int(has.sum())
    out = {f"corpus_recall@{k}@{m}": (hits[m] / n if n else float("nan")) for m in ms}
    out["corpus_num_queries"] = float(n)
    return out


@torch.no_grad()
def embed_corpus(
    model: nn.Module,
    items: Mapping[str, np.ndarray],
    *,
    batch_size: int = 65536,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Item-tower vectors of a whole corpus: (vecs (M, D) float32, video ids (M,) int64).

    ``model`` is a RetrievalDSSM (or anything with ``item_vectors(items (..., 8))``, e.g. the
    ``.module`` of a DDP wrapper); ``items`` maps every schema.ITEM_FIELDS column to (M,) stored
    ids, as ``raytopk.data.pipeline.load_items`` returns.
    """
    missing = [f for f in schema.ITEM_FIELDS if f not in items]
    if missing:
        raise ValueError(f"'items' is missing item columns {missing}; got {sorted(items)}")
    table = np.stack([np.asarray(items[f], dtype=np.int64) for f in schema.ITEM_FIELDS], 1)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, table.shape[0], batch_size):
        chunk = torch.from_numpy(table[start : start + batch_size]).to(device)
        out.append(model.item_vectors(chunk).float().cpu())
    model.train(was_training)
    dim = getattr(model, "out_dim", 0)
    vecs = torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)
    return vecs, table[:, 0].copy()
