"""jobs/gpu_check.py at a tiny size on CPU, as it will run on a bare GPU machine: in a fresh
interpreter where ray, faiss and matplotlib cannot be imported (that machine has none of them).
Timings are not asserted (docs/design.md, Benchmarks), only that every part ran and what it
wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blocked_imports import blocked_run

ROOT = Path(__file__).resolve().parents[2]

# A meta-path finder that refuses the modules the GPU machine lacks, and records every attempt.
_BLOCKED_RUN = blocked_run("jobs/gpu_check.py", {"ray", "faiss", "matplotlib"})


def test_gpu_check_tiny_on_cpu_without_ray_or_faiss(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _BLOCKED_RUN,
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "BLOCKED_IMPORTS_TRIED []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["errors"] == {}
    assert r["modules_loaded"] == {"ray": False, "faiss": False, "matplotlib": False}
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch"]
    assert set(r["seconds"]) == {"data", "parity", "select", "train", "total"}

    from raytopk.ops import list_ops
    from raytopk.ops.dftopk import TORCH_SELECTS

    parity = r["parity"]
    assert parity["ok"] and all(rec["ok"] for rec in parity["records"])
    tested = {rec["op"] for rec in parity["records"]}
    assert tested == {f"dftopk[select={s}]" for s in TORCH_SELECTS} | set(list_ops()[1:])
    assert {rec["dtype"] for rec in parity["records"]} == {"float64", "float32", "bfloat16"}

    sel = r["selection"]
    assert sel["recommended"] in sel["geomean_ms"]
    assert sel["training_shapes"]["recommended"] in sel["geomean_ms"]  # B = 1024, k = 10
    lines = set(sel["records"][0]["ms"])
    assert {"authors_dftopk", "elementwise_floor", "dftopk[select=topk]"} <= lines
    assert {rec["mode"] for rec in sel["records"]} == {"forward", "forward_backward"}

    train = r["train"]
    assert [(t["N"], t["precision"]) for t in train] == [
        (40, "fp32"),
        (40, "bf16"),
        (200, "fp32"),
        (200, "bf16"),
    ]
    for t in train:
        assert t["requests_per_s"] > 0 and 0 <= t["data_wait_frac"] <= 1
        assert t["loss_finite"] and t["amp_used"] == ("bfloat16" if t["amp"] else "off")
        assert t["steps_total"] == 6 and t["steps_measured"] == 4  # fixed step counts
        assert set(t["split_ms"]) == {"data_wait", "h2d", "forward", "backward", "optimizer"}
        assert t["split_ms"]["forward"] > 0 and t["split_ms"]["backward"] > 0
        assert t["peak_gpu_bytes"] is None  # CPU
    assert not (tmp_path / "work" / "synthetic" / "raw").exists()  # raw release deleted
