"""Full-corpus faiss retrieval recall (raytopk.metrics.corpus): a hand-built case, a numpy brute
force, and the item-tower embedding of a corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytopk.data import schema
from raytopk.metrics.corpus import build_index, corpus_recall, embed_corpus
from raytopk.models import RetrievalDSSM


def test_hand_built_corpus() -> None:
    # 2-d corpus of 5 items, ids 10..14; inner products with q0 = (1, 0) order them
    # 12 (3.0), 10 (2.0), 14 (1.0), 11 (0.0), 13 (-1.0).
    items = np.array([[2, 0], [0, 1], [3, 0], [-1, 5], [1, 2]], dtype=np.float32)
    ids = np.array([10, 11, 12, 13, 14])
    users = np.array([[1, 0], [0, 1]], dtype=np.float32)
    # q1 = (0, 1) orders 13 (5), 14 (2), 11 (1), 10 (0), 12 (0).
    positives = [[10, 13, 10], [11, 99]]  # duplicate 10 counts once; 99 is not in the corpus
    out = corpus_recall(users, items, ids, positives, k=10, ms=(1, 2, 3, 5))
    assert out["corpus_recall@10@1"] == pytest.approx((0 / 2 + 0 / 2) / 2)
    assert out["corpus_recall@10@2"] == pytest.approx((1 / 2 + 0 / 2) / 2)
    assert out["corpus_recall@10@3"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert out["corpus_recall@10@5"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert out["corpus_num_queries"] == 2
    # K caps the positives: with k = 1 only the first positive (10 for q0, 11 for q1) counts.
    out = corpus_recall(users, items, ids, positives, k=1, ms=(2, 3))
    assert out["corpus_recall@1@2"] == pytest.approx((1 + 0) / 2)
    assert out["corpus_recall@1@3"] == pytest.approx((1 + 1) / 2)
    # A query without positives is left out; m beyond the corpus retrieves everything.
    out = corpus_recall(users, items, ids, [[], [11]], k=10, ms=(100,))
    assert out == {"corpus_recall@10@100": 1.0, "corpus_num_queries": 1.0}


def _brute_force(u, v, ids, positives, k, m) -> float:
    scores = u @ v.T
    vals = []
    for q, pos in enumerate(positives):
        pos = list(dict.fromkeys(int(p) for p in pos))[:k]
        if not pos:
            continue
        top = set(ids[np.argsort(-scores[q], kind="stable")[:m]].tolist())
        vals.append(len(top & set(pos)) / min(k, len(pos)))
    return float(np.mean(vals))


def test_matches_numpy_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, m, d = 60, 400, 8
    u = rng.normal(size=(q, d)).astype(np.float32)
    v = rng.normal(size=(m, d)).astype(np.float32)
    ids = rng.permutation(10_000)[:m] + 1
    scores = u @ v.T
    positives = []
    for i in range(q):
        near = ids[np.argsort(-scores[i])[rng.integers(0, 150, size=rng.integers(0, 14))]]
        far = rng.integers(20_000, 30_000, size=rng.integers(0, 3))  # not in the corpus
        positives.append(np.concatenate([near, far]))
    out = corpus_recall(torch.from_numpy(u), v, torch.from_numpy(ids), positives, ms=(5, 50, 100))
    for mm in (5, 50, 100):
        ref = _brute_force(u, v, ids, positives, 10, mm)
        assert out[f"corpus_recall@10@{mm}"] == pytest.approx(ref, abs=1e-12)
    assert out["corpus_num_queries"] == sum(len(p) > 0 for p in positives)
    assert 0 < out["corpus_recall@10@5"] < out["corpus_recall@10@50"] < 1


def test_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import raytopk.metrics.corpus as corpus

    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(33, 4)), rng.normal(size=(80, 4))
    ids = np.arange(80) + 1
    pos = [rng.integers(1, 81, size=5) for _ in range(33)]
    whole = corpus_recall(u, v, ids, pos, ms=(10,))
    monkeypatch.setattr(corpus, "_QUERY_BLOCK", 7)
    assert corpus.corpus_recall(u, v, ids, pos, ms=(10,)) == whole


def test_cpu_index_without_gpu() -> None:
    import faiss

    index, res = build_index(np.eye(3, dtype=np.float32), 2, use_gpu=False)
    assert isinstance(index, faiss.IndexFlatIP) and res is None and index.ntotal == 3


def test_errors_name_the_argument() -> None:
    u, v = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    ids = np.arange(4)
    with pytest.raises(ValueError, match="'user_vecs' dim 2 does not match 'item_vecs' dim 3"):
        corpus_recall(np.zeros((2, 2)), v, ids, [[1], [2]])
    with pytest.raises(ValueError, match="'positives' has 1 entries but 'user_vecs' has 2"):
        corpus_recall(u, v, ids, [[1]])
    with pytest.raises(ValueError, match="'item_ids' should have shape \\(4,\\)"):
        corpus_recall(u, v, ids[:3], [[1], [2]])
    with pytest.raises(ValueError, match="'ms' should be ints >= 1"):
        corpus_recall(u, v, ids, [[1], [2]], ms=(0,))
    with pytest.raises(ValueError, match="'item_vecs' has non-finite"):
        corpus_recall(u, np.full((4, 3), np.nan), ids, [[1], [2]])


def test_embed_corpus_uses_the_item_tower() -> None:
    vocab = {t: 20 for t in set(schema.EMBEDDING_TABLE.values())}
    torch.manual_seed(0)
    model = RetrievalDSSM(vocab)
    rng = np.random.default_rng(2)
    items = {f: rng.integers(1, 9, size=11) for f in schema.ITEM_FIELDS}
    vecs, ids = embed_corpus(model, items, batch_size=4)
    table = torch.from_numpy(np.stack([items[f] for f in schema.ITEM_FIELDS], 1))
    with torch.no_grad():
        expect = model.item_vectors(table).numpy()
    np.testing.assert_allclose(vecs, expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ids, items["video_id"])
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="missing item columns \\['upload_minute'\\]"):
        embed_corpus(model, {f: items[f] for f in schema.ITEM_FIELDS[:-1]})


def test_faiss_searches_with_torchs_threads() -> None:
    # faiss has its own OpenMP runtime (OMP_NUM_THREADS or every core): a worker bound to one
    # CPU must not search on all of them, and run.eval_threads must reach faiss too.
    import faiss

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rng = np.random.default_rng(threads)
            v = rng.standard_normal((50, 4)).astype(np.float32)
            corpus_recall(v[:3], v, np.arange(50), [[0], [1], [2]], k=1, ms=(5,))
            assert faiss.omp_get_max_threads() == threads
    finally:
        torch.set_num_threads(before)
