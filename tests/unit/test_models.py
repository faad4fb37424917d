"""Retrieval DSSM and pre-rank DIN (docs/protocol.md §4.6): shapes, masks, gradients, and equality
with slow per-candidate references written straight from the formulas."""

from __future__ import annotations

import pytest
import torch

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch, random_batch
from raytopk.models import SCORER_KINDS, SCORERS, PrerankDIN, RetrievalDSSM, build_scorer
from raytopk.nn import masked_softmax

TABLES = sorted(set(schema.EMBEDDING_TABLE.values()))
VOCAB = {t: 30 for t in TABLES} | {"weekday": 9, "hour": 26, "minute": 62}
B, N, L = 4, 9, schema.SEQ_LEN


def make_batch(seed: int = 0, b: int = B, n: int = N) -> CascadeBatch:
    """A random batch whose row 0 has an empty history and row 1 a full one."""
    g = torch.Generator().manual_seed(seed)
    seq_mask = torch.rand(b, L, generator=g) > 0.4
    seq_mask[0] = False  # an empty history
    seq_mask[1] = True  # a full one
    return random_batch(b, n, VOCAB, seed=seed, seq_mask=seq_mask)


def models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [RetrievalDSSM(VOCAB), PrerankDIN(VOCAB)]


def test_scorer_kinds_are_the_registry() -> None:
    from raytopk.train.config import ConfigError, load_config

    assert SCORER_KINDS == ("dssm", "din") == tuple(SCORERS)
    # The config accepts exactly the registered kinds (it has no list of its own).
    for kind in SCORER_KINDS:
        load_config(None, ["data.path=/d", f"model.stages=[{kind}]", "loss.ks=[10]"])
    with pytest.raises(ConfigError, match=r"unknown scorer 'mlp'; valid: \('dssm', 'din'\)"):
        load_config(None, ["data.path=/d", "model.stages=[dssm,mlp]"])


@pytest.mark.parametrize("kind", SCORER_KINDS)
def test_build_scorer_and_shapes(kind: str) -> None:
    model = build_scorer(kind, VOCAB, 8)
    batch = make_batch()
    out = model(batch)
    assert out.shape == (B, N) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for t in TABLES:
        emb = model.emb.tables[t]
        assert emb.num_embeddings == VOCAB[t] and emb.embedding_dim == 8
        assert emb.padding_idx == 0 and (emb.weight[0] == 0).all()


def test_dssm_vector_shapes() -> None:
    m = RetrievalDSSM(VOCAB, dim=4)
    batch = make_batch()
    assert m.user_vectors(batch).shape == (B, 32)
    assert m.item_vectors(batch.items).shape == (B, N, 32)
    assert m.item_vectors(batch.items[0]).shape == (N, 32)
    assert m.emb.tables["video_id"].embedding_dim == 4


def test_build_scorer_errors() -> None:
    with pytest.raises(ValueError, match="unknown scorer kind 'mlp'.*din.*dssm"):
        build_scorer("mlp", VOCAB, 8)
    bad = dict(VOCAB)
    del bad["author_id"]
    with pytest.raises(ValueError, match="missing embedding tables \\['author_id'\\]"):
        build_scorer("dssm", bad, 8)
    with pytest.raises(ValueError, match="vocab\\['hour'\\].*got 1"):
        build_scorer("din", VOCAB | {"hour": 1}, 8)


@pytest.mark.parametrize("idx", [0, 1])
def test_padded_sequence_positions_do_not_change_outputs(idx: int) -> None:
    model = models()[idx]
    batch = make_batch(1)
    ref = model(batch)
    g = torch.Generator().manual_seed(5)
    noisy = torch.randint(1, 30, batch.seq.shape, generator=g)
    seq = torch.where(batch.seq_mask.unsqueeze(-1), batch.seq, noisy)
    assert (seq != batch.seq).any()  # the test changes something
    out = model(CascadeBatch(**{**batch.__dict__, "seq": seq}))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("idx", [0, 1])
def test_valid_sequence_positions_do_change_outputs(idx: int) -> None:
    model = models()[idx]
    batch = make_batch(1)
    seq = batch.seq.clone()
    seq[1, 3] = (seq[1, 3] % 29) + 1  # row 1's history is all valid
    out = model(CascadeBatch(**{**batch.__dict__, "seq": seq}))
    ref = model(batch)
    assert not torch.allclose(out[1], ref[1])
    torch.testing.assert_close(out[2:], ref[2:])


@pytest.mark.parametrize("idx", [0, 1])
def test_empty_history_is_finite_with_finite_gradients(idx: int) -> None:
    model = models()[idx]
    batch = make_batch(2)
    batch.seq_mask[:] = False
    batch.seq[:] = 0
    out = model(batch)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("idx", [0, 1])
def test_candidates_are_scored_independently(idx: int) -> None:
    model = models()[idx]
    batch = make_batch(3)
    ref = model(batch)
    items = batch.items.clone()
    items[:, 4] = torch.randint(1, 9, items[:, 4].shape)
    out = model(CascadeBatch(**{**batch.__dict__, "items": items}))
    keep = torch.ones(N, dtype=torch.bool)
    keep[4] = False
    torch.testing.assert_close(out[:, keep], ref[:, keep], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 4], ref[:, 4])


@pytest.mark.parametrize("idx", [0, 1])
def test_gradient_reaches_every_layer(idx: int) -> None:
    model = models()[idx]
    batch = make_batch(4)
    model(batch).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name == "attn_out.bias":  # a constant shift of the softmax logits: gradient ≈ 0
            assert p.grad.abs().max() < 1e-5
            continue
        assert p.grad.abs().sum() > 0, name
    video = model.emb.tables["video_id"].weight.grad
    assert (video[0] == 0).all()  # padding row gets no gradient


def test_dssm_matches_reference() -> None:
    m = models()[0]
    batch = make_batch(5)
    emb = m.emb.tables

    def e(field: str, i: torch.Tensor) -> torch.Tensor:
        return emb[schema.EMBEDDING_TABLE[field]](i)

    expect = torch.empty(B, N)
    for b in range(B):
        parts = [e(f, batch.context[b, i]) for i, f in enumerate(schema.CONTEXT_FIELDS)]
        parts += [e(f, batch.user[b, i]) for i, f in enumerate(schema.USER_FIELDS)]
        valid = batch.seq_mask[b].nonzero().flatten()
        for i, f in enumerate(schema.SEQ_FIELDS):
            rows = [e(f, batch.seq[b, t, i]) for t in valid]
            parts.append(torch.stack(rows).mean(0) if rows else torch.zeros(8))
        u = m.user_tower(torch.cat(parts))
        for j in range(N):
            x = torch.cat([e(f, batch.items[b, j, i]) for i, f in enumerate(schema.ITEM_FIELDS)])
            expect[b, j] = u @ m.item_tower(x)
    torch.testing.assert_close(m(batch), expect, rtol=1e-5, atol=1e-5)


def _din_reference(m: PrerankDIN, batch: CascadeBatch) -> torch.Tensor:
    emb = m.emb.tables

    def e(field: str, i: torch.Tensor) -> torch.Tensor:
        return emb[schema.EMBEDDING_TABLE[field]](i)

    out = torch.empty(B, N)
    for b in range(B):
        user = [e(f, batch.user[b, i]) for i, f in enumerate(schema.USER_FIELDS)]
        user += [e(f, batch.context[b, i]) for i, f in enumerate(schema.CONTEXT_FIELDS)]
        hist = [
            torch.cat([e(f, batch.seq[b, t, i]) for i, f in enumerate(schema.SEQ_FIELDS)])
            for t in range(L)
            if batch.seq_mask[b, t]
        ]
        for j in range(N):
            c = torch.cat([e(f, batch.items[b, j, i]) for i, f in enumerate(schema.SEQ_FIELDS)])
            up = torch.cat(
                [e(f, batch.items[b, j, 5 + i]) for i, f in enumerate(schema.ITEM_FIELDS[5:])]
            )
            if hist:
                a = torch.stack(
                    [m.attn_out(torch.relu(m.attn_in(torch.cat([h, c])))) for h in hist]
                ).flatten()
                w = torch.softmax(a, 0)
                interest = (w.unsqueeze(-1) * torch.stack(hist)).sum(0)
            else:
                interest = torch.zeros(40)
            out[b, j] = m.scorer(torch.cat([*user, interest, c, up]))[0]
    return out


def test_din_matches_reference() -> None:
    m = models()[1]
    batch = make_batch(6)
    torch.testing.assert_close(m(batch), _din_reference(m, batch), rtol=1e-5, atol=1e-5)


def test_din_chunked_attention_equals_unchunked_with_gradients() -> None:
    batch = make_batch(7)
    torch.manual_seed(1)
    full = PrerankDIN(VOCAB, attention="reference")
    torch.manual_seed(1)
    chunked = PrerankDIN(VOCAB, attn_chunk_elems=B * L * 80 * 2, attention="reference")
    out_f, out_c = full(batch), chunked(batch)
    torch.testing.assert_close(out_c, out_f)
    out_f.pow(2).sum().backward()
    out_c.pow(2).sum().backward()
    for (name, pf), (_, pc) in zip(full.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(pc.grad, pf.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(chunked(batch), out_f)


def test_masked_softmax() -> None:
    # raytopk.nn.masked_softmax serves DIN (logits (B, n, L), mask (B, L)) and the permutation
    # ops (logits (..., N, N), mask (..., N)): one column mask shared by every row of a matrix.
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[0.5, -1.0, 9.0]]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_softmax(logits, mask)
    e1, e3 = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(3.0))
    torch.testing.assert_close(
        w[0, 0], torch.stack([e1 / (e1 + e3), torch.tensor(0.0), e3 / (e1 + e3)])
    )
    # No valid column: finite uniform weights, zeroed by the caller (DIN: by the sequence mask).
    torch.testing.assert_close(w[1, 0], torch.full((3,), 1 / 3))
    zeroed = w * mask.unsqueeze(1)
    assert (zeroed[1] == 0).all()
    (zeroed * torch.arange(3.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()
    assert logits.grad[0, 0, 1] == 0
    torch.testing.assert_close(masked_softmax(logits, None), torch.softmax(logits, -1))


def test_din_empty_history_has_zero_interest() -> None:
    m = models()[1]
    g = torch.Generator().manual_seed(0)
    seq, c = torch.randn(2, L, 40, generator=g), torch.randn(2, N, 40, generator=g)
    seq_mask = torch.ones(2, L, dtype=torch.bool)
    seq_mask[0] = False
    interest = m.interest(seq, seq_mask, c)
    assert (interest[0] == 0).all() and (interest[1] != 0).any()
