"""One GPU check of raytopk (issue 13): the local training loop, mixed precision and DFTopK's
selection primitive, measured on one device in one short run, written to ONE JSON.

    PYTHONPATH=. python jobs/gpu_check.py --device cuda --out runs/gpu_check   # < 8 min, H200
    PYTHONPATH=. python jobs/gpu_check.py --device cpu --tiny --out /tmp/gc    # seconds (tests)

Needs torch, numpy, numba, pandas, pyarrow and PyYAML, nothing else: no Ray, no faiss, no
matplotlib (tests/unit/test_gpu_check.py runs it with ray and faiss made unimportable). Where
PyYAML is missing, a copy in ``.gpu_deps/`` is used: ``mkdir -p .gpu_deps && cp -r
"$(python -c 'import os,yaml;print(os.path.dirname(yaml.__file__))')" .gpu_deps/``.

Parts, in order (``--parts`` picks some):
1. data: a synthetic RecFlow release (raytopk.data.synthetic, no Ray) converted to parquet in a
   work folder: two days, the first long enough for every training step, the second the test day;
2. parity: every registered operator on the device against the same operator on CPU, float64,
   float32 and (where its registry declares bf16) bfloat16, forward and backward, uniform and
   per-row k, with a mask; DFTopK once per torch selection primitive (CPU reference: auto);
3. select: raytopk.bench.select.compare_selects at the benchmark's shapes; its
   ``recommended`` is what ``_AUTO_SELECT[device]`` in raytopk/ops/dftopk.py should say;
4. train: the local backend's training loop (raytopk.train.loop.train_loop with a LocalSession,
   ``run.backend=local``) at the paper's shape, batch 1024, N = 40 and 200 (sample_num 0, 160),
   float32 and bf16 autocast (``optim.amp``), a fixed number of steps (``run.max_samples``), no
   corpus evaluation. Throughput pass: requests/s and data-wait fraction from the loop's own
   step reports, the first windows (CUDA/cuBLAS start-up, the day's read) left out. Profiled
   pass, separate and short, so the throughput pass runs unsynchronised: the same step with a
   device synchronisation after each phase (data wait + host-to-device copy / forward and loss /
   backward / optimiser). Peak GPU memory of each configuration.

Output: ``<out>/gpu_check.json`` (machine, settings, seconds per part, parity, selection, train).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import yaml  # noqa: F401  (the config and checkpoint code need it)
except ImportError:  # a bare GPU machine: the copy carried in .gpu_deps/ (see above)
    sys.path.append(str(ROOT / ".gpu_deps"))

import torch  # noqa: E402

from raytopk.bench.harness import sync  # noqa: E402
from raytopk.bench.machine import machine_info  # noqa: E402
from raytopk.bench.select import SELECT_SHAPES, compare_selects  # noqa: E402
from raytopk.ops import get_op, get_spec, list_ops  # noqa: E402
from raytopk.ops.dftopk import TORCH_SELECTS  # noqa: E402
from raytopk.train.local import LocalSession  # noqa: E402

__all__ = ["main", "parse_args", "op_parity", "train_configs", "SIZES"]

PARTS = ("data", "parity", "select", "train")
GOAL = {"requests_per_s": 55_000, "data_wait_frac": 0.10}  # batch 1024, N = 40, one H200
SIZES = {
    # batch, report window (steps), warm-up windows, measured windows, profiled steps (+ warm)
    "full": {
        "batch": 1024,
        "window": 10,
        "warm_windows": 2,
        "windows": 8,
        "profile": 20,
        "profile_warm": 3,
        "parity": [(16, 40), (16, 200)],
        "select": list(SELECT_SHAPES),
        "select_seconds": 1.0,
        "select_rounds": 200,
    },
    "tiny": {
        "batch": 16,
        "window": 2,
        "warm_windows": 1,
        "windows": 2,
        "profile": 2,
        "profile_warm": 1,
        "parity": [(3, 12)],
        "select": [(8, 40, 10)],
        "select_seconds": 0.01,
        "select_rounds": 3,
    },
}
TOL = {  # (membership abs, gradient relative to the row's largest) device vs CPU
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (8e-3, 2e-2),  # one bf16 rounding step of a float32 result, either way
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output folder (gpu_check.json)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU tests, seconds)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--work", default="", help="data and run folder (default: a temp folder)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder")
    p.add_argument("--data", default="", help="an existing converted dataset (skips 'data')")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device")
    return args


# ---- 2. operator parity, device vs CPU --------------------------------------------------------


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
            g = torch.Generator().manual_seed(n)
            x64 = 3.0 * torch.randn(b, n, generator=g, dtype=torch.float64)
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
                        p, gr = _run_op(name, x.to(device), kd, mask.to(device), w.to(device), **kw)
                        out_err = float((p - ref_p).abs().max())
                        grad_err = float(((gr - ref_g).abs() / scale).max())
                        tol_out, tol_grad = TOL[dtype]
                        rec = {
                            "op": name + (f"[select={sel}]" if sel else ""),
                            "dtype": str(dtype).removeprefix("torch."),
                            "B": b,
                            "N": n,
                            "k": kind,
                            "out_max_abs": out_err,
                            "grad_max_rel": grad_err,
                            "ok": out_err <= tol_out and grad_err <= tol_grad,
                        }
                        records.append(rec)
                        if not rec["ok"]:
                            log(f"PARITY FAIL {rec}")
    ok = all(r["ok"] for r in records)
    log(f"parity: {sum(r['ok'] for r in records)}/{len(records)} within tolerance")
    tol = {
        str(d).removeprefix("torch."): {"out_abs": t[0], "grad_rel": t[1]} for d, t in TOL.items()
    }
    return {"ok": ok, "tolerance": tol, "records": records}


# ---- 4. training: throughput pass and profiled pass ------------------------------------------


def train_configs() -> list[dict[str, Any]]:
    """The paper's shape at N = 40 and 200, float32 and bf16 autocast."""
    return [
        {"N": 40 + s, "sample_num": s, "precision": p, "amp": p == "bf16"}
        for s in (0, 160)
        for p in ("fp32", "bf16")
    ]


class _Recording(LocalSession):
    """A LocalSession that also keeps every report in memory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], *rest: Any, **kwargs: Any) -> None:
        self.records.append(dict(metrics))
        super().report(metrics, *rest, **kwargs)


def _prepared(data: Path, work: Path, size: dict[str, Any], c: dict[str, Any], label: str) -> Any:
    from raytopk.train.config import load_config
    from raytopk.train.prepare import prepare

    days = json.loads((data / "meta.json").read_text())["days"]
    steps = size["window"] * (size["warm_windows"] + size["windows"])
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"data.train_days=[{days[0]}]",
            f"data.test_day={days[1]}",
            f"data.batch_size={size['batch']}",
            f"data.eval_batch_size={size['batch']}",
            f"data.sample_num={c['sample_num']}",
            f"optim.amp={str(c['amp']).lower()}",
            "run.backend=local",
            f"run.report_every_steps={size['window']}",
            "run.corpus_ms=[]",
            f"run.max_samples={steps * size['batch']}",
            "run.eval_max_batches=1",
            f"run.output_dir={work / label}",
            f"run.name={label}",
            "run.resume=false",
        ],
    )
    prep = prepare(cfg)
    prep.output_dir.mkdir(parents=True, exist_ok=True)  # as raytopk.train.driver.run does
    return prep


def _throughput(prep: Any, device: torch.device, size: dict[str, Any], threads: int) -> dict:
    from raytopk.train.driver import dataset_specs, loop_config
    from raytopk.train.loop import train_loop

    session = _Recording(prep, dataset_specs(prep), device, False)
    t0 = time.perf_counter()
    train_loop(loop_config(prep, threads), session)
    wall = time.perf_counter() - t0
    steps = [m for m in session.records if m["kind"] == "step"]
    final = next(m for m in session.records if m["kind"] == "final")
    measured = steps[size["warm_windows"] :]
    rows = size["window"] * size["batch"]  # every window is `window` full batches
    secs = [rows / m["samples_per_s"] for m in measured]
    wait = sum(m["data_wait_frac"] * s for m, s in zip(measured, secs))
    return {
        "requests_per_s": round(rows * len(measured) / sum(secs), 1),
        "data_wait_frac": round(wait / sum(secs), 4),
        "step_ms": round(1e3 * sum(secs) / (len(measured) * size["window"]), 3),
        "steps_measured": len(measured) * size["window"],
        "steps_total": final["global_step"],
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "loss_finite": all(math.isfinite(m["loss"]) for m in steps),
        "amp_used": final["amp"],
        "wall_s": round(wall, 2),
    }


def _profile(prep: Any, device: torch.device, size: dict[str, Any], threads: int) -> dict:
    """The same training step with a device sync after each phase (mean ms over the steps)."""
    from raytopk.data.batches import CascadeBatches
    from raytopk.ops import warmup as warmup_op
    from raytopk.train.checkpoint import Position
    from raytopk.train.driver import dataset_specs, loop_config
    from raytopk.train.loop import _Worker, train_key
    from raytopk.train.model import CascadeModel

    cfg, day = prep.cfg, prep.cfg.data.train_days[0]
    torch.manual_seed(cfg.run.seed)
    model = CascadeModel.from_config(cfg, dict(prep.meta["vocab"]), device).to(device)
    warmup_op(cfg.op.name)
    w = _Worker(loop_config(prep, threads), 0, 1, model, Position())
    session = _Recording(prep, dataset_specs(prep), device, False)
    bs, pf = cfg.data.batch_size, cfg.data.prefetch_batches
    source = session.dataset(train_key(day), bs, pf)
    batches = CascadeBatches(source, bs, pf, pin=device.type == "cuda")
    phases = ("data_wait", "h2d", "forward", "backward", "optimizer")
    sums = dict.fromkeys(phases, 0.0)
    warm, n = size["profile_warm"], size["profile"]
    it = iter(batches)
    for i in range(warm + n):
        sync(device)
        t = {"start": time.perf_counter()}
        batch = next(it)  # blocked here: the data wait
        t["data"] = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        sync(device)
        t["h2d"] = time.perf_counter()

        def mark(phase: str, t: dict = t) -> None:
            sync(device)
            t[phase] = time.perf_counter()

        w.step(batch, f"profile step {i}", mark)
        if i >= warm:
            order = ["start", "data", "h2d", "forward", "backward", "optimizer"]
            for phase, a, b in zip(phases, order, order[1:]):
                sums[phase] += t[b] - t[a]
    return {p: round(1e3 * v / n, 3) for p, v in sums.items()}


def _make_data(work: Path, size: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Two synthetic days: the first holds every training step's batch, the second is the test
    day. The raw release is deleted once converted (it is ~9 KB per request)."""
    from raytopk.data.synthetic import prepare_synthetic

    steps = size["window"] * (size["warm_windows"] + size["windows"])
    requests = size["batch"] * (steps + 1)
    t0 = time.perf_counter()
    data = prepare_synthetic(work / "synthetic", days=2, requests_per_day=requests, seed=0)
    shutil.rmtree(work / "synthetic" / "raw", ignore_errors=True)
    return data, {"requests_per_day": requests, "seconds": round(time.perf_counter() - t0, 2)}


def _train(
    data: Path, work: Path, device: torch.device, size: dict[str, Any], threads: int, log: Any
) -> list[dict[str, Any]]:
    out = []
    for c in train_configs():
        label = f"n{c['N']}_{c['precision']}"
        prep = _prepared(data, work, size, c, label)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rec = {**c, "batch": size["batch"], **_throughput(prep, device, size, threads)}
        rec["split_ms"] = _profile(prep, device, size, threads)
        rec["peak_gpu_bytes"] = (
            int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        )
        out.append(rec)
        log(
            f"train {label}: {rec['requests_per_s']:,.0f} requests/s, data wait "
            f"{100 * rec['data_wait_frac']:.1f}%, step {rec['step_ms']:.2f} ms, split "
            f"{rec['split_ms']}, loss {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}"
        )
    return out


def _goal(train: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal at batch 1024, N = 40 (either precision)."""
    got = {r["precision"]: r for r in train if r["N"] == 40 and r["batch"] == 1024}
    return {
        **GOAL,
        "met": {
            p: r["requests_per_s"] >= GOAL["requests_per_s"]
            and r["data_wait_frac"] < GOAL["data_wait_frac"]
            for p, r in got.items()
        },
    }


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    import traceback

    args = parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raytopk-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.tiny else max(1, (os.cpu_count() or 2) - 1)
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "cuda": torch.version.cuda,
        "settings": {"tiny": args.tiny, "parts": args.parts, "threads": threads, **size},
        "seconds": {},
        "errors": {},
    }
    t_all = time.perf_counter()
    data = Path(args.data) if args.data else None
    try:
        for part in PARTS:
            if part not in args.parts or (part == "data" and data is not None):
                continue
            if part == "train" and data is None:
                result["errors"]["train"] = "no dataset: run the data part or pass --data"
                continue
            t0 = time.perf_counter()
            try:
                if part == "data":
                    data, result["data"] = _make_data(work, size)
                elif part == "parity":
                    result["parity"] = op_parity(device, size["parity"], log)
                elif part == "select":
                    result["selection"] = compare_selects(
                        device,
                        size["select"],
                        max_seconds=size["select_seconds"],
                        max_rounds=size["select_rounds"],
                        log=log,
                    )
                    log(f"selection: recommended {result['selection']['recommended']}")
                else:
                    result["train"] = _train(data, work, device, size, threads, log)
                    result["goal"] = _goal(result["train"])
            except Exception:  # one GPU run: keep going, report every part's outcome
                result["errors"][part] = traceback.format_exc()
                log(f"{part} FAILED:\n{result['errors'][part]}")
            result["seconds"][part] = round(time.perf_counter() - t0, 2)
    finally:
        result["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
        result["modules_loaded"] = {m: m in sys.modules for m in ("ray", "faiss", "matplotlib")}
        path = out / "gpu_check.json"
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        log(f"wrote {path} ({result['seconds']['total']} s)")
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    res = main()
    bad = res["errors"] or not res.get("parity", {"ok": True})["ok"]
    sys.exit(1 if bad else 0)
