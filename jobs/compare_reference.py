"""Score raytopk's and the reference code's trained cascades with ONE evaluation (raytopk's).

    python jobs/compare_reference.py --reference-dir /tmp/dftopk_ref/torch \\
        --raytopk rt_t1_s1=runs/refcmp/rt_t1_s1 ... \\
        --reference ref_t1_s1=/path/to/root/checkpoints ... --out docs/reference/scores.json

Every model is scored on the same test-day batches (docs/protocol.md §4.5: the day's requests in
file order, 40 own slots + 160 sampled from the batch, N = 200; one fixed ``--eval-seed`` for all),
by ``raytopk.train.evaluate.evaluate``. A raytopk run is its output directory (latest checkpoint);
a reference run is the directory its training script saved into (``retrival_*_D<n>.pkl`` and
``prerank_*_D<n>.pkl``: the largest n, i.e. after the last training day), loaded into the
reference's own ``models.DSSM`` / ``models.DIN`` imported from ``--reference-dir`` (its torch/
folder; nothing of it is in this repository) and fed through
``raytopk.bench.reference_cascade`` (the reference's input encoding). The dataset and test day
come from the first raytopk run's config (or ``--data`` / ``--test-day``); the reference's
``id_cnt.pkl`` from ``--id-cnt`` (default: <synthetic root>/raw/others/id_cnt.pkl).
Writes one JSON object label -> metrics, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

__all__ = ["main", "reference_checkpoints"]

_KEYS = ("joint_recall@10@20", "retrieval_recall@10@30", "prerank_recall@10@20")


def reference_checkpoints(directory: str | Path) -> tuple[Path, Path]:
    """(retrieval, pre-rank) state-dict files of the last training day the reference's script
    saved in ``directory`` (``retrival_…_D<n>.pkl``, ``prerank_…_D<n>.pkl``, largest n)."""
    d = Path(directory)
    found: dict[str, dict[int, Path]] = {"retrival": {}, "prerank": {}}
    for p in d.glob("*.pkl"):
        m = re.match(r"(retrival|prerank)_.*_D(\d+)\.pkl$", p.name)
        if m:
            found[m.group(1)][int(m.group(2))] = p
    if not found["retrival"] or not found["prerank"]:
        raise FileNotFoundError(
            f"{str(d)!r} holds no retrival_*_D<n>.pkl / prerank_*_D<n>.pkl pair (the reference "
            "training script's daily checkpoints)"
        )
    last = max(set(found["retrival"]) & set(found["prerank"]))
    return found["retrival"][last], found["prerank"][last]


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for s in items:
        if "=" not in s:
            raise SystemExit(f"{flag} expects LABEL=DIR, got {s!r}")
        label, path = s.split("=", 1)
        out.append((label, path))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference-dir", help="the reference's torch/ folder (for its models.py)")
    p.add_argument("--raytopk", nargs="*", action="extend", default=[], help="LABEL=run output dir")
    p.add_argument(
        "--reference", nargs="*", action="extend", default=[], help="LABEL=reference checkpoint dir"
    )
    p.add_argument("--data", help="converted dataset (default: the first raytopk run's)")
    p.add_argument("--test-day", help="default: the first raytopk run's")
    p.add_argument("--id-cnt", help="the raw release's others/id_cnt.pkl (reference models)")
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)

    from raytopk.data.batch import collate
    from raytopk.data.convert import read_meta
    from raytopk.data.local_reader import iter_local_groups
    from raytopk.train.checkpoint import load_state
    from raytopk.train.driver import load_run_config
    from raytopk.train.evaluate import evaluate
    from raytopk.train.model import CascadeModel
    from raytopk.train.prepare import latest_checkpoint

    torch.set_num_threads(1)
    runs = _pairs(args.raytopk, "--raytopk")
    refs = _pairs(args.reference, "--reference")
    cfg0 = load_run_config(runs[0][1]) if runs else None
    data = args.data or (cfg0.data.path if cfg0 else None)
    test_day = args.test_day or (cfg0.data.test_day if cfg0 else None)
    if not data or not test_day:
        raise SystemExit("pass --data and --test-day, or at least one --raytopk run")
    meta = read_meta(Path(data))
    vocab = dict(meta["vocab"])
    batches = [
        collate(g)
        for g in iter_local_groups(
            data, [test_day], train=False, sample_num=0, batch_size=args.eval_batch_size,
            seed=args.eval_seed,
        )
    ]  # fmt: skip
    print(f"test day {test_day}: {sum(b.batch_size for b in batches)} requests, N = "
          f"{batches[0].num_candidates}, eval seed {args.eval_seed}", flush=True)  # fmt: skip
    device = torch.device("cpu")
    results: dict[str, dict[str, float]] = {}

    def score(label: str, cascade: torch.nn.Module) -> None:
        t = time.perf_counter()
        m = evaluate(cascade, batches, device)
        results[label] = {k: float(v) for k, v in m.items()}
        print(f"{label:24s} " + "  ".join(f"{k} {m[k]:.4f}" for k in _KEYS)
              + f"  ({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip

    for label, run_dir in runs:
        cfg = load_run_config(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise SystemExit(f"{run_dir!r} has no checkpoint")
        model = CascadeModel.from_config(cfg, vocab)
        model.scorers.load_state_dict(load_state(ckpt)["scorers"])
        score(label, model)

    if refs:
        from raytopk.bench.reference_cascade import (
            ReferenceCascade,
            ReferenceScorer,
            import_reference_models,
        )

        if not args.reference_dir:
            raise SystemExit("--reference needs --reference-dir")
        ref_models = import_reference_models(args.reference_dir)
        id_cnt_path = args.id_cnt or str(Path(cfg0.data.synthetic.root) / "raw/others/id_cnt.pkl")
        with open(id_cnt_path, "rb") as f:
            id_cnt = pickle.load(f)
        for label, ck_dir in refs:
            r_path, p_path = reference_checkpoints(ck_dir)
            dssm = ref_models.DSSM(8, 50, device, id_cnt, nn_units=128)
            din = ref_models.DIN(8, 50, device, id_cnt, nn_units=128)
            dssm.load_state_dict(torch.load(r_path, map_location="cpu", weights_only=True))
            din.load_state_dict(torch.load(p_path, map_location="cpu", weights_only=True))
            cascade = ReferenceCascade([ReferenceScorer(dssm, 50), ReferenceScorer(din, 10)])
            score(label, cascade)

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
