"""Mixed precision (``optim.amp``): bf16 autocast around the scorers only, the operator and the
loss in float32; off on CPU by default so CPU numerics stay plain float32. Runs on CPU (torch's
CPU autocast supports bf16); the CUDA path is measured by jobs/gpu_check.py."""

from __future__ import annotations

import pytest
import torch

from raytopk.data.batch import _default_vocab, random_batch
from raytopk.train.config import load_config
from raytopk.train.model import CascadeModel, autocast_dtype


def _model(amp: object) -> CascadeModel:
    cfg = load_config(None, ["data.path=/d", f"optim.amp={str(amp).lower()}"])
    torch.manual_seed(0)
    return CascadeModel.from_config(cfg, _default_vocab(), "cpu")


def test_auto_is_bf16_on_cuda_only() -> None:
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    assert autocast_dtype(True, "cpu") is torch.bfloat16
    assert autocast_dtype(False, "cuda") is None
    assert _model("auto").amp_dtype is None  # the CPU default: float32 training


def test_bf16_forward_is_close_and_the_loss_sees_float32() -> None:
    batch = random_batch(16, 40, seed=1)
    ref, amp = _model(False), _model(True)
    assert amp.amp_dtype is torch.bfloat16
    seen: list[torch.dtype] = []
    amp.loss.register_forward_pre_hook(lambda mod, args: seen.extend(x.dtype for x in args[0]))
    with torch.no_grad():
        scores = amp.scores(batch)  # evaluation path: float32 whatever the training precision
    assert all(s.dtype == torch.float32 for s in scores)
    total_ref, _ = ref(batch)
    total, parts = amp(batch)
    assert seen == [torch.float32, torch.float32]  # one (B, N) score tensor per stage
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    # Same initial weights: bf16 matmuls move the loss by far less than a training step does.
    torch.testing.assert_close(total, total_ref, rtol=2e-2, atol=2e-2)
    total.backward()
    grads = [p.grad for p in amp.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("amp", [False, "auto"])
def test_off_on_cpu_is_bit_identical_to_float32(amp: object) -> None:
    batch = random_batch(8, 40, seed=2)
    a, b = _model(amp), _model(False)
    torch.testing.assert_close(a(batch)[0], b(batch)[0], rtol=0, atol=0)
