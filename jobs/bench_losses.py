"""Loss forms per operator, measured (docs/protocol.md §3.5; raytopk.losses.forms).

    PYTHONPATH=. python jobs/bench_losses.py [--seconds 0] [--ops dftopk lapsum sparse_topk bce]
        [--out /tmp/bench_losses]

For every operator and each loss form it can take: a short local-backend run (no Ray) on the
quickstart's synthetic data (jobs/configs/quickstart.yaml, 1 CPU thread) trained on the first two
days, validated on the LAST training day of the quickstart (2024-01-15; never the test day
2024-01-16). By default one pass over the two days, so every form sees the same 12,000 requests
(a time budget, ``--seconds`` > 0, would depend on the shared machine's load). Then, on
``--batches`` training-protocol batches of the validation day, with the trained model: per stage
the loss L_s, the learned weight w_s, the norm of ∂L/∂x_s of the weighted total (× the batch's
valid slots, i.e. of the slot-summed loss; per request, mean) and the fraction of valid slots
where it is exactly 0; the same at scores × ``--scale`` (large scores, as after a long run); and
the validation joint Recall@10@20. Prints a table and writes ``<out>/bench_losses.json``.

"before" = form bce for every operator (what training used before the loss forms of
docs/protocol.md §3.5); the forms chosen
(raytopk.losses.forms) are marked with *.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["main", "diagnose"]

DAYS = ["2024-01-13", "2024-01-14"]
VALIDATION = "2024-01-15"  # the quickstart's last training day


def diagnose(model, batches, scale: float = 1.0) -> dict[str, float]:
    """Per stage s: L_s, w_s, mean per-request ‖∂total/∂x_s‖ (of the slot-summed loss), the
    fraction of valid slots with exactly zero gradient (zero), of positives with zero gradient
    (pos_zero), and of valid slots with zero gradient while their membership is on the wrong
    side, |p − y| ≥ 0.5 (stuck: a confident correct slot at zero gradient is no harm)."""
    import torch

    from raytopk.data.labels import ground_truth
    from raytopk.losses.joint import stage_membership

    loss = model.loss
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        scores = [s.detach().mul(scale).requires_grad_(True) for s in model.scores(batch)]
        total, parts = loss(scores, batch)
        grads = torch.autograd.grad(total, scores)
        mask = batch.cand_mask
        y = ground_truth(batch.priority, mask, loss.k_truth)
        for s, g in enumerate(grads):
            # × #valid slots: the gradient of the slot-summed loss (the loss is a mean over slots).
            g = g.masked_fill(~mask, 0.0) * mask.sum()
            with torch.no_grad():
                nodecide = torch.zeros(mask.shape[0], dtype=torch.bool)
                p = stage_membership(
                    loss.op, scores[s].detach(), loss.ks[s], mask, loss.params, nodecide, loss.form
                ).p
            zero = (g == 0) & mask
            pos = (y > 0) & mask
            vals = {
                f"L{s}": float(parts[f"stage{s}"]),
                f"w{s}": float(parts[f"w{s}"]),
                f"grad{s}": float(g.norm(dim=-1).mean()),
                f"zero{s}": float(zero.sum() / mask.sum()),
                f"pos_zero{s}": float((zero & pos).sum() / pos.sum().clamp(min=1)),
                f"stuck{s}": float((zero & ((p - y).abs() >= 0.5)).sum() / mask.sum()),
            }
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
        sums["joint"] = sums.get("joint", 0.0) + float(parts["joint"])
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="jobs/configs/quickstart.yaml")
    p.add_argument("--ops", nargs="+", default=["dftopk", "lapsum", "sparse_topk", "bce"])
    p.add_argument("--seconds", type=float, default=0.0,
                   help="training step seconds per run (0: no time budget: the 2 days, 1 pass)")
    p.add_argument("--batches", type=int, default=8, help="validation batches diagnosed")
    p.add_argument("--scale", type=float, default=100.0, help="score scale of the 2nd diagnosis")
    p.add_argument("--out", default="/tmp/bench_losses")
    p.add_argument("--seed", type=int, default=42, help="run.seed (data order, negatives, init)")
    p.add_argument("--reuse", action="store_true",
                   help="diagnose the runs already in --out instead of training again")
    args = p.parse_args(argv)

    import torch

    from raytopk.data.batch import collate
    from raytopk.data.convert import read_meta
    from raytopk.data.local_reader import iter_local_groups
    from raytopk.losses import forms_for
    from raytopk.losses.forms import default_form
    from raytopk.train.checkpoint import load_state
    from raytopk.train.config import load_config
    from raytopk.train.driver import load_run_config, run
    from raytopk.train.model import CascadeModel
    from raytopk.train.prepare import latest_checkpoint

    torch.set_num_threads(1)
    rows = []
    for op in args.ops:
        for form in forms_for(op):
            out = Path(args.out) / f"{op}-{form}-s{args.seed}"
            over = [
                f"op.name={op}",
                f"loss.form={form}",
                "run.backend=local",
                "scaling.cpus_per_worker=1",
                f"run.output_dir={out}",
                "run.resume=false",
                "run.epochs=1",
                f"run.seed={args.seed}",
                f"run.max_train_seconds={args.seconds}",
                f"data.train_days=[{','.join(DAYS)}]",
                f"data.test_day={VALIDATION}",
                "run.eval_max_batches=20",
                "run.corpus_ms=[]",
            ]
            if op != "dftopk":
                over.append("op.params={}")
            if args.reuse and (out / "metrics.json").is_file():
                final = json.loads((out / "metrics.json").read_text())
            else:
                shutil.rmtree(out, ignore_errors=True)
                final = run(load_config(args.config, over), verbose=False)
            cfg = load_run_config(out)  # resolved: data.path set
            state = load_state(str(latest_checkpoint(out)))
            model = CascadeModel.from_config(cfg, read_meta(cfg.data.path, "data.path")["vocab"])
            model.scorers.load_state_dict(state["scorers"])
            model.loss.load_state_dict(state["loss"])
            groups = iter_local_groups(
                cfg.data.path, [VALIDATION], train=True, sample_num=cfg.data.sample_num,
                batch_size=cfg.data.batch_size, seed=cfg.run.seed,
            )
            batches = [collate(g) for _, g in zip(range(args.batches), groups)]
            row = {
                "op": op,
                "form": form,
                "seed": args.seed,
                "chosen": form == default_form(op),
                "val_joint_recall@10@20": final["joint_recall@10@20"],
                "train_seconds": final["train_seconds"],
                "samples_seen": final["samples_seen"],
                **diagnose(model, batches),
                **{f"x{args.scale:g}_{k}": v for k, v in diagnose(model, batches, args.scale)
                   .items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_losses.json").write_text(json.dumps(rows, indent=1))
    x = f"×{args.scale:g}"
    head = (
        "| op | form | val joint R@10@20 | L0 | L1 | w0 | w1 | ‖g0‖ | ‖g1‖ | pos_zero0 | "
        f"pos_zero1 | stuck0 | stuck1 | L0 {x} | ‖g0‖ {x} | pos_zero0 {x} | stuck0 {x} | "
        f"stuck1 {x} |"
    )
    print("\n" + head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in rows:
        s = args.scale
        print(
            f"| {r['op']} | {r['form']}{'*' if r['chosen'] else ''} | "
            f"{r['val_joint_recall@10@20']:.4f} | {r['L0']:.3f} | {r['L1']:.3f} | {r['w0']:.2f} | "
            f"{r['w1']:.2f} | {r['grad0']:.3g} | {r['grad1']:.3g} | {r['pos_zero0']:.2f} | "
            f"{r['pos_zero1']:.2f} | {r['stuck0']:.2f} | {r['stuck1']:.2f} | "
            f"{r[f'x{s:g}_L0']:.3g} | {r[f'x{s:g}_grad0']:.3g} | {r[f'x{s:g}_pos_zero0']:.2f} | "
            f"{r[f'x{s:g}_stuck0']:.2f} | {r[f'x{s:g}_stuck1']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
