"""DIN's fused attention score (raytopk/models/attention.py): float64 gradcheck of the closed-form
backward, float32 equality with the plain (B, N, L, H) path on random and real batches (masks,
empty histories, padded candidates), bf16 inputs, non-finite inputs, and the path's choice."""

from __future__ import annotations

import pytest
import torch
from test_models import VOCAB, make_batch

from raytopk.data.batch import collate
from raytopk.data.local_reader import iter_local_groups
from raytopk.models import PrerankDIN
from raytopk.models.attention import attention_scores, reference_scores, resolve_impl


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| / max |ref|: the error relative to the tensor's scale."""
    x, ref = x.detach(), ref.detach()
    err = (x.double() - ref.double()).abs().max()
    return float(err / ref.double().abs().max().clamp_min(1e-30))


def _inputs(b, n, l, h, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(b, l, h), mk(b, n, h), mk(1, h), mk(1)


def test_gradcheck_float64() -> None:
    pe, pc, w2, b2 = _inputs(3, 4, 5, 7, torch.float64)
    fused = lambda *a: attention_scores(*a, impl="fused")  # noqa: E731
    assert torch.autograd.gradcheck(fused, (pe, pc, w2, b2))


def test_gradcheck_float64_with_zero_upstream_slots() -> None:
    # The backward skips slots whose upstream gradient is exactly 0 (padded behaviours).
    pe, pc, w2, b2 = _inputs(2, 3, 6, 5, torch.float64, seed=1)
    keep = torch.ones(2, 3, 6, dtype=torch.float64)
    keep[:, :, 4:] = 0
    keep[1] = 0
    f = lambda *a: attention_scores(*a, impl="fused") * keep  # noqa: E731
    assert torch.autograd.gradcheck(f, (pe, pc, w2, b2))


@pytest.mark.parametrize("shape", [(4, 9, 50, 80), (2, 1, 3, 1), (1, 33, 7, 16)])
def test_float32_equals_plain_path(shape) -> None:
    b, n, l, h = shape
    args = _inputs(b, n, l, h, seed=sum(shape))
    up = torch.randn(b, n, l)
    up[..., l // 2 :] = 0  # skipped slots
    out = {}
    for impl in ("fused", "reference"):
        a = attention_scores(*args, impl=impl)
        out[impl] = (a, *torch.autograd.grad(a, args, up))
    for name, x, ref in zip(("a", "pe", "pc", "w2", "b2"), out["fused"], out["reference"]):
        assert x.shape == ref.shape and x.dtype == ref.dtype, name
        assert _rel(x, ref) <= 1e-5, (name, _rel(x, ref))


def _din_pair(seed: int = 3) -> tuple[PrerankDIN, PrerankDIN]:
    torch.manual_seed(seed)
    fused = PrerankDIN(VOCAB, attention="fused")
    torch.manual_seed(seed)
    plain = PrerankDIN(VOCAB, attention="reference")
    return fused, plain


def _assert_din_equal(fused: PrerankDIN, plain: PrerankDIN, batch) -> None:
    out_f, out_p = fused(batch), plain(batch)
    assert _rel(out_f, out_p) <= 1e-5
    (out_f * batch.cand_mask).pow(2).sum().backward()
    (out_p * batch.cand_mask).pow(2).sum().backward()
    for (name, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters()):
        if pp.grad is None:
            assert pf.grad is None, name
            continue
        if name == "attn_out.bias":  # the softmax is shift-invariant: b₂'s true gradient is 0
            assert pf.grad.abs().max() <= 1e-6 and pp.grad.abs().max() <= 1e-6
            continue
        assert _rel(pf.grad, pp.grad) <= 1e-5, (name, _rel(pf.grad, pp.grad))
    with torch.no_grad():
        assert _rel(fused(batch), out_p) <= 1e-5


def test_din_random_batch_with_masks_and_empty_history() -> None:
    # make_batch: row 0 has an empty history, row 1 a full one; ~20% padded candidate slots.
    _assert_din_equal(*_din_pair(), make_batch(11, b=6, n=23))


def test_din_real_batch(tiny) -> None:
    from raytopk.data.convert import read_meta

    vocab = dict(read_meta(tiny)["vocab"])
    groups = iter_local_groups(
        tiny, ["2024-01-15"], train=False, sample_num=0, batch_size=16, seed=0, max_requests=16
    )
    batch = collate(next(groups))
    assert not batch.cand_mask.all()  # padded candidates are in it
    torch.manual_seed(5)
    fused = PrerankDIN(vocab, attention="fused")
    torch.manual_seed(5)
    plain = PrerankDIN(vocab, attention="reference")
    _assert_din_equal(fused, plain, batch)


def test_bf16_inputs_keep_their_gradient_dtypes() -> None:
    pe, pc, w2, b2 = (t.detach().bfloat16().requires_grad_() for t in _inputs(2, 5, 6, 8))
    a = attention_scores(pe, pc, w2, b2, impl="fused")
    assert a.dtype == torch.float32  # computed in float32
    ref = reference_scores(pe.float(), pc.float(), w2.float(), b2.float())
    assert _rel(a, ref) <= 1e-5
    a.sum().backward()
    assert [t.grad.dtype for t in (pe, pc, w2, b2)] == [torch.bfloat16] * 4


def test_non_finite_input_reaches_the_scores() -> None:
    pe, pc, w2, b2 = (t.detach() for t in _inputs(2, 3, 4, 5))
    pe[1, 2, 0] = float("nan")
    a = attention_scores(pe, pc, w2, b2, impl="fused")
    assert torch.isnan(a[1, :, 2]).all() and torch.isfinite(a[0]).all()


def test_choice_of_path() -> None:
    assert resolve_impl("auto", "cpu") == "fused"
    assert resolve_impl("auto", "cuda") == "reference"
    assert resolve_impl("reference", "cuda") == "reference"
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_impl("fused", "cuda")
    with pytest.raises(ValueError, match="'attention' should be one of"):
        PrerankDIN(VOCAB, attention="triton")


def test_config_names_the_attention_field() -> None:
    from raytopk.train.config import ConfigError, load_config

    assert load_config(None, ["data.path=/d"]).model.attention == "auto"
    with pytest.raises(ConfigError, match="model.attention: 'fast'"):
        load_config(None, ["data.path=/d", "model.attention=fast"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_is_the_plain_path() -> None:
    torch.manual_seed(0)
    m = PrerankDIN(VOCAB).cuda()
    batch = make_batch(2).to("cuda")
    torch.manual_seed(0)
    cpu = PrerankDIN(VOCAB)
    assert _rel(m(batch).cpu(), cpu(make_batch(2))) <= 1e-4
