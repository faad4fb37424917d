"""The operator benchmark's functions on tiny shapes: record/JSON structure, the memory-skip
record of an O(N²) op, the CPU peak-memory probe, and the authors' DFTopK reference against
dftopk_logits. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from raytopk.bench.harness import interleaved_times, peak_memory, round_orders, time_fn
from raytopk.bench.machine import MACHINE_KEYS, machine_info
from raytopk.bench.op_sweeps import bench_operators, build_lines, operator_configs
from raytopk.bench.reference import authors_dftopk, authors_dftopk_logits, full_sort_logits
from raytopk.bench.step import ToyDSSM, make_step
from raytopk.ops import get_spec, list_ops
from raytopk.ops.dftopk import dftopk, dftopk_logits

ROOT = Path(__file__).resolve().parents[2]


def _load_cli():
    spec = importlib.util.spec_from_file_location("bench_ops_cli", ROOT / "jobs" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", [1, 7, 29])
@pytest.mark.parametrize("select", ["auto", "topk", "kthvalue"])
def test_authors_reference_matches_dftopk_logits(k: int, select: str) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(4, 30, generator=g, dtype=torch.float64)
    upstream = torch.randn(4, 30, generator=g, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    za = authors_dftopk_logits(xa, k, tau=0.7)
    zb = dftopk_logits(xb, k, 0.7, select=select)
    torch.testing.assert_close(za, zb, rtol=1e-12, atol=1e-12)
    (za * upstream).sum().backward()
    (zb * upstream).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(authors_dftopk(x, k, 0.7), dftopk(x, k, tau=0.7))


def test_full_sort_reference_matches_dftopk_logits() -> None:
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(full_sort_logits(x, 6), dftopk_logits(x, 6, tau=1.0))


def test_machine_info_has_one_set_of_keys() -> None:
    info = machine_info()
    assert tuple(info) == MACHINE_KEYS
    assert info["device"] == "cpu" and info["device_name"] == info["cpu_model"]
    assert info["torch"] == torch.__version__ and info["cpu_cores"] >= 1


def test_authors_reference_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="'k'"):
        authors_dftopk_logits(torch.randn(2, 5), 5)


def test_operator_records_structure() -> None:
    lines = build_lines(select_compare=True)
    names = [line.name for line in lines]
    assert names[:2] == ["authors_dftopk", "elementwise_floor"]
    assert set(list_ops()) <= set(names)
    assert "dftopk[select=numba]" in names
    configs = operator_configs([1], [10], ["10", "N//2"])
    assert [(b, n, k) for b, n, k, _ in configs] == [(1, 10, 5), (1, 10, 9)]
    records = bench_operators(lines, configs, warmup=1, repeats=2, max_seconds=0.5)
    assert len(records) == len(lines) * len(configs) * 2
    for r in records:
        assert r["status"] == "ok", r
        assert r["mode"] in ("forward", "forward_backward")
        assert 1 <= r["repeats"] <= 2
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["scores_bytes"] == r["B"] * r["N"] * 4


def test_over_budget_quadratic_op_is_skipped_with_needed_bytes() -> None:
    quadratic = [line for line in build_lines() if line.name == "neuralsort"]
    records = bench_operators(
        quadratic, [(1024, 1000, 10, "10")], repeats=1, max_seconds=0.1, mem_budget_gb=1.0
    )
    # The skip uses the operator's own estimate from its registry entry.
    needed = get_spec("neuralsort").step_bytes(1024, 1000, 4)
    assert needed > 2**30
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert all(r["reason"] == "memory" and r["needed_bytes"] == needed for r in records)
    assert "median_ms" not in records[0]


def test_time_extrapolation_skips_a_slow_line() -> None:
    line = [x for x in build_lines() if x.name == "diffsort"]
    # A time budget of ~0 forces every shape after the first (smallest) one to be skipped.
    configs = operator_configs([1], [10, 40], ["10"])
    records = bench_operators(line, configs, repeats=1, max_seconds=0.1, time_budget_s=1e-9)
    assert [r["status"] for r in records] == ["ok", "ok", "skipped", "skipped"]
    assert records[-1]["reason"] == "time" and records[-1]["estimated_s"] >= 0


def test_cpu_peak_memory_sees_a_64_mib_tensor() -> None:
    def alloc() -> None:
        torch.ones(2**24).sum()  # 64 MiB written, then freed

    peak = peak_memory(alloc, "cpu")
    assert peak["bytes"] >= 60 * 2**20, peak
    assert isinstance(peak["method"], str)


def test_rounds_shuffle_so_no_line_always_follows_the_same_one() -> None:
    names = ["a", "b", "c", "d", "e"]
    orders = round_orders(names, 12)
    assert orders == round_orders(names, 12)  # seeded: a run is repeatable
    assert all(sorted(o) == names for o in orders)  # every line once per round
    # A rotation keeps each line behind one neighbour; the shuffle gives each several.
    behind = {n: {o[o.index(n) - 1] for o in orders if o.index(n) > 0} for n in names}
    assert all(len(v) >= 2 for v in behind.values()), behind
    calls: list[str] = []
    times = interleaved_times({n: (lambda n=n: calls.append(n)) for n in names}, "cpu", 12, 0)
    assert [calls[i * 5 : i * 5 + 5] for i in range(12)] == orders
    assert all(len(t) == 12 for t in times.values())


def test_time_fn_counts_repeats() -> None:
    calls = []
    t = time_fn(lambda: calls.append(1), "cpu", warmup=3, repeats=4, max_seconds=10.0)
    assert len(calls) == 7 and t["repeats"] == 4 and t["median_s"] >= 0


@pytest.mark.parametrize("line", ["authors_dftopk", *list_ops()])
def test_step_runs_and_frees_gradients(line: str) -> None:
    model = ToyDSSM()
    step, loss_name, _ = make_step(line, 6, model, "cpu")
    step()
    assert all(p.grad is None for p in model.parameters())
    if line in ("dftopk", "authors_dftopk"):
        assert loss_name == "bce_with_logits"
    elif get_spec(line).permutation:
        assert loss_name == "lcron_single_stage"
    else:
        assert loss_name == "bce_membership"


def test_cli_writes_json_and_plots(tmp_path: Path) -> None:
    cli = _load_cli()
    result = cli.main(
        [
            "--out",
            str(tmp_path),
            "--batches",
            "1",
            "--sizes",
            "10",
            "--step-sizes",
            "5",
            "--repeats",
            "2",
            "--no-target-shapes",
            "--headline-shapes",
            "4,12,3",
        ]
    )
    data = json.loads((tmp_path / "bench_ops.json").read_text())
    assert set(data) == {
        "machine",
        "settings",
        "seconds",
        "headline",
        "operator",
        "step",
        "targets",
    }
    head = data["headline"]
    assert [(r["B"], r["N"], r["k"], r["mode"]) for r in head] == [
        (4, 12, 3, "forward"),
        (4, 12, 3, "forward_backward"),
    ]
    for r in head:
        assert set(r["ms"]) == {"dftopk", "authors_dftopk", "full_sort", "elementwise_floor"}
        assert all(v > 0 for v in r["ms"].values()) and r["rounds"] >= 5
    for key in ("platform", "cpu_model", "cpu_cores", "torch", "torch_threads", "device_name"):
        assert key in data["machine"]
    assert data["settings"]["sizes"] == [10] and data["settings"]["extra_shapes"] == []
    lines = {r["line"] for r in data["operator"]}
    assert lines == {"authors_dftopk", "elementwise_floor", *list_ops()}
    fb = [r for r in data["operator"] if r["mode"] == "forward_backward"]
    assert all("peak_bytes" in r and r["peak_bytes"] >= 0 for r in fb)
    assert {(r["line"], r["n"]) for r in data["step"]} == {
        (name, 5) for name in ["authors_dftopk", *list_ops()]
    }
    assert all(r["status"] == "ok" and r["steps"] >= 1 for r in data["step"])
    assert data["targets"]["min_speedup_vs_authors"]["N"] == 10
    assert (tmp_path / "bench_ops_operator.png").stat().st_size > 0
    assert (tmp_path / "bench_ops_step.png").stat().st_size > 0
    assert result["operator"] == data["operator"]


def test_plain_throughput_counts_timed_steps_after_warmup() -> None:
    # The baseline loop of jobs/bench_train.py on in-memory batches (no Ray, no data files).
    from test_models import VOCAB, make_batch  # same folder; pytest puts it on sys.path

    from raytopk.bench.train import plain_throughput
    from raytopk.train.config import load_config

    cfg = load_config(None, ["model.dim=8", "data.synthetic.enabled=true"])
    batches = [make_batch(i, b=4, n=12) for i in range(3)]
    one_pass = plain_throughput(cfg, VOCAB, batches, warmup=1)
    assert one_pass["steps"] == 3  # one pass over the batches after one warm-up step
    capped = plain_throughput(cfg, VOCAB, batches, warmup=1, max_steps=5)
    assert capped["steps"] == 5
    for r in (one_pass, capped):
        assert r["samples_per_s"] > 0 and r["s_per_step"] > 0


def test_select_recommendation_is_the_fastest_geomean_ties_to_the_first() -> None:
    from raytopk.bench.select import device_selects, recommend

    assert device_selects("cpu")[0] == "numba" and "numba" not in device_selects("cuda")

    def rec(mode: str, topk: float, sort: float) -> dict:
        return {"mode": mode, "ms": {"dftopk[select=topk]": topk, "dftopk[select=sort]": sort}}

    # forward records do not vote; within 3% the earlier select (topk: any per-row k) wins
    close = [rec("forward_backward", 1.0, 0.99), rec("forward", 9.0, 0.1)]
    assert recommend(close, ["topk", "sort"])["recommended"] == "topk"
    far = [rec("forward_backward", 1.0, 0.5), rec("forward_backward", 4.0, 4.0)]
    r = recommend(far, ["topk", "sort"])
    assert r["recommended"] == "sort" and r["geomean_ms"] == {"topk": 2.0, "sort": 1.4142}
    with pytest.raises(ValueError, match="forward_backward"):
        recommend([rec("forward", 1.0, 1.0)], ["topk", "sort"])
