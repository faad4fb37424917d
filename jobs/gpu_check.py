"""One GPU check of raytopk: the local training loop, mixed precision and DFTopK's
selection primitive, measured on one device in one short run, written to ONE JSON.

    PYTHONPATH=. python jobs/gpu_check.py --device cuda --out runs/gpu_check   # ~3-5 min, H200
    PYTHONPATH=. python jobs/gpu_check.py --device cpu --tiny --out /tmp/gc    # seconds (tests)

Needs torch, numpy, numba, pandas, pyarrow and PyYAML, nothing else: no Ray, no faiss, no
matplotlib (tests/unit/test_gpu_check.py runs it with those three unimportable). A bare GPU
machine without PyYAML uses a copy carried in the git-ignored ``.gpu_deps/`` (~1 MiB), made
once on the machine that sends the job:

    mkdir -p .gpu_deps && cp -r "$(python -c 'import os,yaml;print(os.path.dirname(
        yaml.__file__))')" .gpu_deps/ && rm -rf .gpu_deps/yaml/__pycache__

On the device machine (the session's ``run`` tool), from the repository root:

    command: PYTHONPATH=. python jobs/gpu_check.py --device cuda --out $OUT/gpu_check
    carry: [".gpu_deps"]        timeout_s: 480   (expected ~3-5 min, the data part ~1 min of it)

then read ``gpu_check/gpu_check.json`` where the files come back. Set ``_AUTO_SELECT["cuda"]``
in raytopk/ops/dftopk.py to its ``selection.recommended`` (and quote ``selection.geomean_ms``).

Parts, in this order (``--parts`` picks some; the JSON is rewritten after each, so a run cut
short still reports the parts it finished; a failing part is recorded under ``errors`` and the
next one runs):
1. select: raytopk.bench.select.compare_selects at the benchmark's shapes (every select, the
   authors' two-kthvalue formulation, the elementwise floor), and the recommended select;
2. parity: raytopk.bench.parity.op_parity, every registered operator on the device against the
   same operator on CPU, float64, float32 and (where its registry declares it) bfloat16,
   forward and backward, uniform and per-row k, with a mask, N = 40 and 200;
3. data: a synthetic RecFlow release (raytopk.data.synthetic, no Ray) converted to parquet in a
   work folder: two days, the first long enough for every training step, the second the test
   day (the raw release is deleted once converted);
4. train: raytopk.bench.local_train, the local backend's training loop (``run.backend=local``)
   at the paper's shape, batch 1024, N = 40 and 200 (sample_num 0, 160), float32 and bf16
   autocast (``optim.amp``), 80 steps each (20 left out as warm-up), no corpus evaluation:
   requests/s and data-wait fraction from the loop's own reports; the step-time split (data
   wait / host-to-device / forward / backward / optimiser) from a separate synchronised pass;
   peak GPU memory; the GPU goal of docs/protocol.md §5.3 (>= 55,000 requests/s, data wait
   < 10% at N = 40).

Output: ``<out>/gpu_check.json``: machine (device name, torch, CUDA), settings, seconds per
part, selection, parity, data, train, goal, errors, modules_loaded.
"""

from __future__ import annotations

import argparse
import json
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

from raytopk.bench.local_train import goal, measure_configs  # noqa: E402
from raytopk.bench.machine import machine_info  # noqa: E402
from raytopk.bench.parity import op_parity  # noqa: E402
from raytopk.bench.select import SELECT_SHAPES, compare_selects  # noqa: E402

__all__ = ["main", "parse_args", "SIZES"]

PARTS = ("select", "parity", "data", "train")  # run in this order; the JSON after each
SIZES = {
    # batch, report window (steps), warm-up windows, measured windows, profiled steps (+ warm)
    "full": {
        "batch": 1024,
        "window": 10,
        "warm_windows": 2,
        "windows": 6,
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
        "select": [(1024, 40, 10)],
        "select_seconds": 0.01,
        "select_rounds": 3,
    },
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
        "settings": {"tiny": args.tiny, "parts": args.parts, "threads": threads, **size},
        "seconds": {},
        "errors": {},
    }
    t_all = time.perf_counter()
    data = Path(args.data) if args.data else None
    path = out / "gpu_check.json"

    def write() -> None:  # after every part: a run cut short still reports what it measured
        result["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
        result["modules_loaded"] = {m: m in sys.modules for m in ("ray", "faiss", "matplotlib")}
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    try:
        for part in PARTS:
            if part not in args.parts or (part == "data" and data is not None):
                continue
            if part == "train" and data is None:
                result["errors"]["train"] = "no dataset: run the data part or pass --data"
                continue
            log(f"[gpu_check] {part} ({time.perf_counter() - t_all:.0f} s so far)")
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
                    from raytopk.ops.dftopk import _AUTO_SELECT

                    result["selection"]["auto_select_now"] = dict(_AUTO_SELECT)
                    log(f"selection: recommended {result['selection']['recommended']}")
                else:
                    result["train"] = measure_configs(data, work, device, size, threads, log)
                    result["goal"] = goal(result["train"])
            except Exception:  # one GPU run: keep going, report every part's outcome
                result["errors"][part] = traceback.format_exc()
                log(f"{part} FAILED:\n{result['errors'][part]}")
            result["seconds"][part] = round(time.perf_counter() - t0, 2)
            write()
    finally:
        write()
        log(f"wrote {path} ({result['seconds']['total']} s)")
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    res = main()
    bad = res["errors"] or not res.get("parity", {"ok": True})["ok"]
    sys.exit(1 if bad else 0)
