"""DIN's attention score without its (B, N, L, H) block: a fused CPU kernel (numba) and the
plain PyTorch path it replaces, which stays as the reference and the fallback.

Notation: B = requests, N = candidates, L = behaviour slots, H = attention hidden width;
pe (B, L, H) = W_e e_t (the behaviour half of the first layer), pc (B, N, H) = W_c c + b₁ (the
candidate half), w₂ (H,), b₂ scalar. The score of candidate n against behaviour l is

    a[b,n,l] = Σ_h w₂[h] · ReLU(pe[b,l,h] + pc[b,n,h]) + b₂.

The plain path materialises h = ReLU(pe + pc) as a (B, N, L, H) tensor only to reduce it over H;
at (B=1024, N=200, L=50, H=80) that is 3.3 GB of float32 written and read for 80 multiply-adds
per (n, l) pair. The fused kernel keeps the H-loop in registers. With g = ∂loss/∂a and the mask
m[b,n,l,h] = [pe[b,l,h] + pc[b,n,h] > 0], the backward is closed-form and never needs the block
either:

    ∂pe[b,l,h] = w₂[h] · Σ_n g[b,n,l] · m[b,n,l,h]
    ∂pc[b,n,h] = w₂[h] · Σ_l g[b,n,l] · m[b,n,l,h]
    ∂w₂[h]     = Σ_{b,n,l} g[b,n,l] · ReLU(pe[b,l,h] + pc[b,n,h])
    ∂b₂        = Σ_{b,n,l} g[b,n,l]

Numerics: the kernels run in the inputs' dtype (float32 or float64; bf16 inputs, as under
autocast, are computed in float32 and their gradients cast back). ∂w₂ is summed per (b, n) in
the working dtype and across (b, n) in float64, which makes it more accurate than the plain
path's float32 reduction over B·N·L terms (at B=128, N=1000 the plain path is 3e-5 off a float64
computation, the fused one 2e-7). The forward is reassociated over H (SIMD), so float32 results
differ from the plain path by rounding only (~1e-7 relative). Slots whose g is exactly zero
(padded behaviours, masked out by the softmax) are skipped in the backward.

Choice (``impl``): "fused" (CPU tensors only), "reference" (the plain path, any device; chunked
over candidates by the caller to bound memory), or "auto" = ``AUTO_IMPL[device type]``: fused on
CPU, the plain path elsewhere (no CUDA kernel is shipped yet).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AUTO_IMPL",
    "IMPLS",
    "attention_scores",
    "reference_scores",
    "resolve_impl",
    "warmup",
]

IMPLS = ("auto", "fused", "reference")
AUTO_IMPL = {"cpu": "fused"}  # device type -> impl for "auto"; anything else: "reference"

# Reassociation (SIMD reductions over H), fused multiply-add, signed zeros ignored. No "nnan" /
# "ninf": a NaN score must stay a NaN for the operators' finiteness check to name it.
_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _forward_kernel(pe, pc, w2, b2, out):  # pragma: no cover - compiled
    """out[b, n, l] = Σ_h w2[h]·max(pe[b,l,h] + pc[b,n,h], 0) + b2, parallel over (b, n)."""
    nb, nl, nh = pe.shape
    nn_ = pc.shape[1]
    for i in numba.prange(nb * nn_):
        b = i // nn_
        n = i - b * nn_
        for l in range(nl):
            s = b2 - b2  # a zero of the working dtype
            for h in range(nh):
                v = pe[b, l, h] + pc[b, n, h]
                if v > 0:
                    s += w2[h] * v
            out[b, n, l] = s + b2


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _backward_kernel(pe, pc, w2, g, dpe, dpc, dw2_rows):  # pragma: no cover - compiled
    """∂pe, ∂pc (zero-initialised, filled here) and per-request ∂w₂ rows (float64), parallel
    over requests: each b owns dpe[b], dpc[b] and dw2_rows[b], so no two threads write one."""
    nb, nl, nh = pe.shape
    nn_ = pc.shape[1]
    for b in numba.prange(nb):
        part = np.zeros(nh, pe.dtype)  # ∂w₂ of one (b, n), in the working dtype
        for n in range(nn_):
            part[:] = 0
            for l in range(nl):
                gl = g[b, n, l]
                if gl == 0:
                    continue
                for h in range(nh):
                    v = pe[b, l, h] + pc[b, n, h]
                    if v > 0:
                        t = gl * w2[h]
                        dpe[b, l, h] += t
                        dpc[b, n, h] += t
                        part[h] += gl * v
            for h in range(nh):
                dw2_rows[b, h] += part[h]


def _kernel_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _FusedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pe, pc, w2, b2):  # noqa: D401 - autograd signature
        dt = _kernel_dtype(pe)
        pe_k = pe.detach().to(dt).contiguous()
        pc_k = pc.detach().to(dt).contiguous()
        w2_k = w2.detach().to(dt).contiguous()
        out = torch.empty(pe.shape[0], pc.shape[1], pe.shape[1], dtype=dt)
        b2_k = np.array(float(b2.detach().reshape(())), dtype=pe_k.numpy().dtype)[()]
        _forward_kernel(pe_k.numpy(), pc_k.numpy(), w2_k.numpy(), b2_k, out.numpy())
        ctx.save_for_backward(pe_k, pc_k, w2_k)
        ctx.dtypes = (pe.dtype, pc.dtype, w2.dtype, b2.dtype)
        ctx.b2_shape = b2.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        pe_k, pc_k, w2_k = ctx.saved_tensors
        g_k = g.to(pe_k.dtype).contiguous()
        dpe = torch.zeros_like(pe_k)
        dpc = torch.zeros_like(pc_k)
        rows = torch.zeros(pe_k.shape[0], pe_k.shape[2], dtype=torch.float64)
        _backward_kernel(
            pe_k.numpy(), pc_k.numpy(), w2_k.numpy(), g_k.numpy(), dpe.numpy(), dpc.numpy(),
            rows.numpy(),
        )
        dw2 = rows.sum(0)
        db2 = g.sum(dtype=torch.float64).reshape(ctx.b2_shape)
        t_pe, t_pc, t_w2, t_b2 = ctx.dtypes
        return dpe.to(t_pe), dpc.to(t_pc), dw2.to(t_w2), db2.to(t_b2)


def _finite(pe: torch.Tensor, pc: torch.Tensor) -> bool:
    """The kernel's ReLU skips a NaN (a comparison), so non-finite inputs take the plain path,
    which carries them into the scores for the operators' check to report."""
    return bool(torch.isfinite(pe).all()) and bool(torch.isfinite(pc).all())


def reference_scores(
    pe: torch.Tensor, pc: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """The plain path: builds ReLU(pe + pc) as (B, N, L, H), then one Linear over H."""
    h = (pe.unsqueeze(1) + pc.unsqueeze(2)).relu_()  # (B, N, L, H); add's output is ours
    return F.linear(h, w2.reshape(1, -1), b2.reshape(1)).squeeze(-1)  # (B, N, L)


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """``impl`` with "auto" resolved for ``device``; "fused" off the CPU is an error."""
    if impl not in IMPLS:
        raise ValueError(f"'attention' should be one of {IMPLS} but got {impl!r}")
    dev = torch.device(device).type
    if impl == "auto":
        return AUTO_IMPL.get(dev, "reference")
    if impl == "fused" and dev != "cpu":
        raise ValueError(
            f"attention='fused' runs on CPU tensors only, got a {dev} tensor; use 'auto' or "
            "'reference'"
        )
    return impl


def attention_scores(
    pe: torch.Tensor, pc: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """a (B, N, L) from pe (B, L, H), pc (B, N, H), w₂ (H,) or (1, H), b₂ (1,) or scalar.

    "reference" here is one unchunked call; :class:`raytopk.models.din.PrerankDIN` chunks it.
    """
    if resolve_impl(impl, pe.device) == "fused" and _finite(pe, pc):
        return _FusedScores.apply(pe, pc, w2.reshape(-1), b2)
    return reference_scores(pe, pc, w2, b2)


def warmup(dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """Compile the fused kernels (forward and backward, per dtype) on tiny inputs, so that a
    timed step or a time budget does not pay numba's compiler (cached on disk after the first
    process)."""
    for dt in dtypes:
        pe = torch.zeros(2, 3, 4, dtype=dt, requires_grad=True)
        pc = torch.ones(2, 2, 4, dtype=dt, requires_grad=True)
        w2 = torch.ones(4, dtype=dt, requires_grad=True)
        b2 = torch.zeros(1, dtype=dt, requires_grad=True)
        _FusedScores.apply(pe, pc, w2, b2).sum().backward()
