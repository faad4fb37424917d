"""An operator is one registry entry: a toy operator registered in this test alone (no other
file changed) is accepted by the config, gets its loss forms from what its entry provides, and
trains a step of the cascade (docs/design.md, Contract: operator)."""

from __future__ import annotations

import pytest
import torch

from raytopk.data import schema
from raytopk.data.batch import random_batch
from raytopk.ops import register, unregister


def _toy_logits(scores, k, mask=None, *, temp=2.0):  # noqa: ANN001, ANN202
    # A soft top-k: σ((x − t)/temp) with t the row's mean (not a real top-k: a test double of
    # the contract's shape, which is all the framework may rely on).
    x = scores if mask is None else scores.masked_fill(~mask, 0.0)
    n = mask.sum(-1, keepdim=True).clamp_min(1) if mask is not None else scores.shape[-1]
    t = (x.sum(-1, keepdim=True) / n).detach()
    z = (scores - t) / temp
    return z if mask is None else z.masked_fill(~mask, float("-inf"))


@pytest.fixture
def toy() -> str:
    @register("toy_sigmoid", param="temp", hard_limit=1e-3, sums_to_k=False, complexity="O(N)",
              step_bytes=lambda b, n, itemsize=4: 8 * b * n * itemsize, bf16=False,
              bf16_reason="a test operator", logits=_toy_logits)  # fmt: skip
    def toy_sigmoid(scores, k, mask=None, *, temp=2.0):  # noqa: ANN001, ANN202
        return torch.sigmoid(_toy_logits(scores, k, mask, temp=temp))

    yield "toy_sigmoid"
    unregister("toy_sigmoid")


def test_a_registered_toy_operator_trains_one_step(toy: str) -> None:
    from raytopk.losses import default_form, forms_for, list_methods
    from raytopk.train.config import load_config
    from raytopk.train.model import CascadeModel

    assert toy in list_methods()
    assert forms_for(toy) == ("bce", "bce_logits", "mse") and default_form(toy) == "bce"
    cfg = load_config(None, ["data.path=/d", f"op.name={toy}", "op.params.temp=0.5"])
    vocab = {t: 30 for t in set(schema.EMBEDDING_TABLE.values())}
    vocab |= {"weekday": 9, "hour": 26, "minute": 62}
    torch.manual_seed(0)
    model = CascadeModel.from_config(cfg, vocab)
    assert model.loss.params == {"temp": 0.5}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = random_batch(8, 24, vocab, seed=1)
    before = [p.detach().clone() for p in model.scorers.parameters()]
    total, parts = model(batch)
    assert torch.isfinite(total) and {"stage0", "stage1", "joint"} <= set(parts)
    opt.zero_grad()
    total.backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.scorers.parameters())]
    assert any(moved)
    with pytest.raises(ValueError, match="does not take"):
        CascadeModel.from_config(load_config(None, ["data.path=/d", f"op.name={toy}"]), vocab
                                 ).loss.__class__(toy, {"tau": 1.0})  # fmt: skip


def test_the_toy_is_gone_after_its_test() -> None:
    from raytopk.losses import list_methods

    assert "toy_sigmoid" not in list_methods()
