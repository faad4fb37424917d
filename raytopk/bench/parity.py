"""Operator parity between two devices (jobs/gpu_check.py): every registered operator on a
device against the same operator on CPU, same dtype, forward and backward.

Notation: B = rows, N = scores per row, k = selected per row (uniform, or per row).

Inputs are distinct multiples of 1/8 (exact in bfloat16 for |x| < 32), so no dtype sees ties and
every selection primitive picks the same boundary slots (at a tie any two tied slots are right,
and two correct implementations may differ). A mask leaves about 20% of the slots out, never
enough to make k reach a row's number of valid slots. dtypes: float64, float32, and bfloat16 for
operators whose registry entry declares it; DFTopK once per torch selection primitive (its CPU
reference is ``select="auto"``, the numba kernel). O(N^3) operators run at N <= 64 only (their
CPU reference costs ~10 s per call at N = 200).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raytopk.bench.cost import complexity_exponent
from raytopk.ops import get_op, get_spec, list_ops
from raytopk.ops.dftopk import TORCH_SELECTS

__all__ = ["TOL", "op_parity"]

TOL = {  # (membership abs, gradient relative to the row's largest) device vs CPU
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (8e-3, 2e-2),  # one bf16 rounding step of a float32 result, either way
}


def _run_op(
    name: str, x: torch.Tensor, k: Any, mask: torch.Tensor, w: torch.Tensor, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    p = get_op(name)(x, k, mask, **kw)
    (p * w).sum().backward()
    return p.detach().double().cpu(), x.grad.double().cpu()


def op_parity(
    device: torch.device, shapes: list[tuple[int, int]], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every registered op (DFTopK: every torch select) on ``device`` vs on CPU, same dtype."""
    records = []
    for name in list_ops():
        spec = get_spec(name)
        dtypes = [torch.float64, torch.float32] + ([torch.bfloat16] if spec.bf16 else [])
        selects: list[str | None] = list(TORCH_SELECTS) if name == "dftopk" else [None]
        for b, n in shapes:
            if complexity_exponent(spec.complexity) >= 3 and n > 64:
                continue  # O(N^3) on the CPU reference: ~10 s per call at N = 200
            g = torch.Generator().manual_seed(n)
            # Distinct multiples of 1/8 (exact in bf16 up to |x| < 32): no ties in any dtype, so
            # every select picks the same boundary slots (at a tie any two tied slots are right).
            perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
            x64 = (perm.double() - n / 2) / 8  # (B, N)
            mask = torch.rand(b, n, generator=g) > 0.2
            mask[:, : n // 2] = True  # every row keeps more valid slots than any k below
            ks = {
                "uniform": min(10, n // 2 - 1),
                "per_row": torch.randint(1, n // 2, (b,), generator=g),
            }
            for dtype in dtypes:
                x = x64.to(dtype)
                w = torch.randn(b, n, generator=g).to(dtype)
                for kind, k in ks.items():
                    ref_p, ref_g = _run_op(name, x, k, mask, w, **{spec.param: 1.0})
                    scale = ref_g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
                    kd = k.to(device) if isinstance(k, torch.Tensor) else k
                    for sel in selects:
                        kw = {spec.param: 1.0, **({"select": sel} if sel else {})}
                        rec = {
                            "op": name + (f"[select={sel}]" if sel else ""),
                            "dtype": str(dtype).removeprefix("torch."),
                            "B": b,
                            "N": n,
                            "k": kind,
                        }
                        try:
                            xd, md, wd = x.to(device), mask.to(device), w.to(device)
                            p, gr = _run_op(name, xd, kd, md, wd, **kw)
                        except Exception as e:  # a device failure is a parity failure
                            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
                            records.append(rec)
                            log(f"PARITY ERROR {rec}")
                            continue
                        out_err = float((p - ref_p).abs().max())
                        grad_err = float(((gr - ref_g).abs() / scale).max())
                        tol_out, tol_grad = TOL[dtype]
                        rec.update(
                            out_max_abs=out_err,
                            grad_max_rel=grad_err,
                            ok=out_err <= tol_out and grad_err <= tol_grad,
                        )
                        records.append(rec)
                        if not rec["ok"]:
                            log(f"PARITY FAIL {rec}")
    ok = all(r["ok"] for r in records)
    log(f"parity: {sum(r['ok'] for r in records)}/{len(records)} within tolerance")
    tol = {
        str(d).removeprefix("torch."): {"out_abs": t[0], "grad_rel": t[1]} for d, t in TOL.items()
    }
    return {"ok": ok, "tolerance": tol, "records": records}
