"""``train_fn_per_worker``: the cascade training loop run by every Ray Train worker.

Notation: B = requests per batch, N = candidates per request (40 own slots + sample_num sampled
negatives), S = cascade stages (retrieval DSSM, pre-rank DIN, ...).

Plain PyTorch; the few Ray steps are marked ``# Ray:``. The protocol is SPEC.md §4.4: train on
the days in date order, one pass, shuffled within a day; Adam (lr 1e-2) on the scorers and on the
loss's uncertainty weights; loss = the joint cascade loss of SPEC.md §3.1 (LCRON, §3.3, for the
permutation operators)::

    L = sum_s L_s / (2 w_s^2) + L_J + log prod_s w_s

After every day: a checkpoint (models, optimiser, loss weights, RNG, position, resolved config),
reported by rank 0 while every rank calls ``ray.train.report`` the same number of times; with
``run.stream_eval`` the next day is evaluated first (SPEC.md §4.4, streaming variant). At the end:
evaluation on the test day (SPEC.md §4.5: N = 200, joint Recall@10@20, per-stage recall, NDCG,
Kendall tau, all-reduced over workers) and full-corpus retrieval recall with faiss (rank 0, over
the user vectors gathered from every worker).

Resume: ``ray.train.get_checkpoint()`` (a restart after a worker failure, or a re-run of the same
``run.output_dir``) restores every state and continues at the next day (or, for a mid-day
checkpoint, skips the batches of that day already trained). A non-finite loss stops every worker at
the same step (the check is all-reduced, so no rank waits in a collective for a rank that quit),
reports the step and the loss parts, and leaves the last good checkpoint as the latest one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raytopk.data import schema
from raytopk.data.batch import CascadeBatch
from raytopk.ops import warmup as warmup_op
from raytopk.train.checkpoint import Position, load_state, rng_state, save_state, set_rng_state
from raytopk.train.config import TrainConfig, from_dict

__all__ = [
    "CascadeModel",
    "train_fn_per_worker",
    "evaluate",
    "eval_cuts",
    "train_key",
    "eval_key",
    "TEST_KEY",
    "NAN_STOP",
    "param_digest",
]

TEST_KEY = "test"
NAN_STOP = "non_finite_loss"


def train_key(day: str) -> str:
    return f"train_{day}"


def eval_key(day: str) -> str:
    return f"eval_{day}"


def eval_cuts(num_stages: int) -> tuple[int, ...]:
    """Survivors kept by each stage at evaluation: retrieval 30, pre-rank 20 (SPEC.md §4.5);
    a third (rank) stage keeps 10."""
    return (30, 20, 10, 5)[:num_stages] if num_stages > 1 else (20,)


class CascadeModel(nn.Module):
    """The S scorers of a cascade plus its loss module (which owns the learnable w_s), so that one
    DDP wrap all-reduces the gradients of both. ``forward`` returns (total loss, parts)."""

    def __init__(
        self,
        stages: list[str],
        vocab: dict[str, int],
        dim: int,
        op: str,
        op_params: dict[str, float],
        ks: list[int],
        k_truth: int,
    ) -> None:
        super().__init__()
        from raytopk.losses import build_loss
        from raytopk.models import build_scorer

        self.scorers = nn.ModuleList([build_scorer(kind, vocab, dim) for kind in stages])
        self.loss = build_loss(op, dict(op_params), list(ks), k_truth=k_truth)

    def scores(self, batch: CascadeBatch) -> list[torch.Tensor]:
        return [scorer(batch) for scorer in self.scorers]  # S x (B, N)

    def forward(self, batch: CascadeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.scores(batch)
        # Operators reject non-finite scores with an error (SPEC §2.1); a diverged model must
        # instead stop the run cleanly, naming the step (the loop's non-finite-loss stop). One
        # device sync per step, next to the loop's own per-step flag exchange.
        valid = batch.cand_mask
        bad = torch.stack([(~torch.isfinite(x) & valid).sum() for x in scores])  # (S,)
        if bool(bad.any()):
            nan = torch.full((), float("nan"), device=valid.device)
            parts = {f"stage{s}": nan for s in range(len(scores))}
            parts["joint"] = nan
            parts.update({f"nonfinite_scores{s}": bad[s].float() for s in range(len(scores))})
            return nan, parts
        return self.loss(scores, batch)

    @classmethod
    def from_config(cls, cfg: TrainConfig, vocab: dict[str, int]) -> CascadeModel:
        return cls(
            cfg.model.stages,
            vocab,
            cfg.model.dim,
            cfg.op.name,
            cfg.op.params,
            cfg.loss.ks,
            cfg.loss.k_truth,
        )


def param_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order: equal digests on two workers mean
    bit-identical replicas (what DDP must keep)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _loss_step(
    model: nn.Module, batch: CascadeBatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One request batch through every stage and the joint loss: (total scalar, parts)."""
    return model(batch)


# ---- evaluation -----------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def evaluate(
    cascade: CascadeModel,
    batches: Iterable[CascadeBatch],
    device: torch.device,
    *,
    k: int = schema.K_TRUTH,
    corpus_items: dict[str, np.ndarray] | None = None,
    corpus_ms: list[int] | tuple[int, ...] = (),
    max_batches: int = 0,
) -> dict[str, float]:
    """SPEC.md §4.5 metrics over ``batches`` (this worker's share of the test day).

    Sums and counts are all-reduced when torch.distributed runs several workers. Also returns
    ``random_joint_recall@10@20``: the exact expectation of joint recall when both stages pick at
    random (the final cut is then a uniform subset of the valid slots), on the same requests.
    With ``corpus_items`` and a retrieval DSSM first, adds ``corpus_recall@k@M`` for every M
    (faiss inner-product search over the whole item table; rank 0 computes it over the user
    vectors gathered from every worker, other ranks return the rest).
    """
    from raytopk.metrics import CascadeMetrics

    cascade.eval()
    cuts = eval_cuts(len(cascade.scorers))
    metrics = CascadeMetrics(cuts=cuts, k=k)
    rand = torch.zeros(3, dtype=torch.float64)  # expected recall sums (last cut, first cut), count
    retrieval = cascade.scorers[0]
    want_corpus = bool(
        corpus_items is not None and corpus_ms and hasattr(retrieval, "user_vectors")
    )
    users: list[np.ndarray] = []
    positives: list[np.ndarray] = []
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        scores = cascade.scores(batch)
        metrics.update(scores, batch)
        n = batch.cand_mask.sum(-1).double().cpu()  # (B,) valid slots
        # Random stages keep a uniform subset of min(cut, n) of the n valid slots, so they
        # recover that fraction of G in expectation (recall = |F ∩ G| / |G|, as CascadeMetrics).
        has = n > 0
        rand[0] += (n.clamp(max=cuts[-1]) / n.clamp(min=1))[has].sum()
        rand[1] += (n.clamp(max=cuts[0]) / n.clamp(min=1))[has].sum()
        rand[2] += has.sum()
        if want_corpus:
            users.append(retrieval.user_vectors(batch).float().cpu().numpy())
            pos_mask = batch.cand_mask[:, : schema.GROUP_SIZE].cpu().numpy()  # rank_pos slots
            vids = batch.items[:, : schema.GROUP_SIZE, 0].cpu().numpy()
            positives += [v[m] for v, m in zip(vids, pos_mask)]
    out = dict(metrics.compute())
    if _distributed():
        rand = rand.to(device)
        dist.all_reduce(rand)
        rand = rand.cpu()
    count = max(float(rand[2]), 1.0)
    out[f"random_joint_recall@{k}@{cuts[-1]}"] = float(rand[0]) / count
    out[f"random_retrieval_recall@{k}@{cuts[0]}"] = float(rand[1]) / count
    if want_corpus:
        out.update(_corpus_metrics(retrieval, corpus_items, users, positives, corpus_ms, k, device))
    cascade.train()
    return out


def _corpus_metrics(
    retrieval: nn.Module,
    items: dict[str, np.ndarray],
    users: list[np.ndarray],
    positives: list[np.ndarray],
    ms: list[int] | tuple[int, ...],
    k: int,
    device: torch.device,
) -> dict[str, float]:
    from raytopk.metrics.corpus import corpus_recall, embed_corpus

    u = np.concatenate(users) if users else np.zeros((0, 1), np.float32)
    if _distributed():
        # Rank 0 scores the whole test day; gathering (Q, 32) float32 vectors is cheap next to
        # building a faiss index on every worker.
        gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((u, positives), gathered, dst=0)
        if dist.get_rank() != 0:
            return {}
        u = np.concatenate([g[0] for g in gathered])
        positives = [p for g in gathered for p in g[1]]
    item_vecs, item_ids = embed_corpus(retrieval, items, device=device)
    res = corpus_recall(u, item_vecs, item_ids, positives, k=k, ms=tuple(ms))
    out = {key: float(v) for key, v in res.items()}
    for m in ms:  # a random retriever finds each positive with probability M / corpus size
        out[f"random_corpus_recall@{k}@{m}"] = min(m, len(item_ids)) / max(len(item_ids), 1)
    return out


# ---- the training loop ------------------------------------------------------------------------


class _Batches:
    """Iterate a Ray Data shard as CascadeBatches, timing how long the loop waits for each.

    ``warm_async()`` starts the shard's execution in a background thread and holds its first
    batch: each day is its own dataset, and starting one (split coordinator, read, sort) costs
    seconds that would otherwise be idle time at every day boundary. The next day is warmed
    while the current one trains."""

    def __init__(self, shard: Any, batch_size: int, prefetch: int) -> None:
        self._shard, self._batch_size, self._prefetch = shard, batch_size, prefetch
        self._it: Iterator[CascadeBatch] | None = None
        self._first: list[Any] = []  # [batch] or [StopIteration()] once warmed
        self._thread: threading.Thread | None = None
        self.wait = 0.0

    def _open(self) -> Iterator[CascadeBatch]:
        from ray.data.collate_fn import NumpyBatchCollateFn

        from raytopk.data.batch import collate

        class _Collate(NumpyBatchCollateFn):
            # Runs in Ray Data's prefetch threads: numpy -> CascadeBatch off the training thread.
            def __call__(self, batch: dict[str, np.ndarray]) -> CascadeBatch:
                return collate(batch)

        return iter(
            self._shard.iter_torch_batches(
                batch_size=self._batch_size,
                prefetch_batches=self._prefetch,
                collate_fn=_Collate(),
                drop_last=False,
            )
        )

    def _warm(self) -> None:
        try:
            self._it = self._open()
            self._first.append(next(self._it))
        except BaseException as e:  # StopIteration (empty shard) or a real error: re-raised
            self._first.append(e)  # in the training thread by __next__

    def warm_async(self) -> _Batches:
        if self._thread is None and self._it is None:
            self._thread = threading.Thread(target=self._warm, daemon=True, name="raytopk-warm")
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[CascadeBatch]:
        return self

    def __next__(self) -> CascadeBatch:
        t = time.perf_counter()
        try:
            if self._thread is not None:
                self._thread.join()
                self._thread = None
                if self._first:
                    item = self._first.pop()
                    if isinstance(item, BaseException):
                        raise item
                    return item
            if self._it is None:
                self._it = self._open()
            return next(self._it)
        finally:
            self.wait += time.perf_counter() - t


def _eval_batches(shard: Any, batch_size: int, prefetch: int) -> Iterator[CascadeBatch]:
    return _Batches(shard, batch_size, prefetch)


class _Window:
    """Running sums between two reports (loss parts on device: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None
        self.keys: list[str] = []
        self.steps = 0
        self.samples = 0
        self.seconds = 0.0
        self.wait = 0.0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> None:
        if self.sums is None:
            self.keys = list(parts)
        vec = torch.stack([total.detach()] + [parts[k].detach().reshape(()) for k in self.keys])
        self.sums = vec.double() if self.sums is None else self.sums + vec.double()
        self.steps += 1
        self.samples += rows

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        vals = (self.sums / max(self.steps, 1)).tolist()
        return dict(zip(["loss", *self.keys], vals))


def _report(metrics: dict[str, Any], state: dict[str, Any] | None, ckpt_name: str | None) -> None:
    """Ray: report metrics on every rank; rank 0 also passes the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raytopk-ckpt-") as tmp:
        save_state(tmp, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=ckpt_name,
        )


def _quiet_ray_train_logs() -> None:
    """Ray Train V2 logs every report (with its whole metrics dict) and every checkpoint at INFO
    from each worker; our controller-side progress line already says it once, readably."""
    try:
        from ray.train.v2._internal.execution import context as _ctx
        from ray.train.v2._internal.execution import storage as _storage
    except ImportError:  # a Ray without these modules: keep its logging as it is
        return
    logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)  # its logger is named by path
    logging.getLogger(_storage.__name__).setLevel(logging.WARNING)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config`` is built by raytopk.train.driver: the resolved
    TrainConfig as a dict ("cfg"), the dataset's vocabulary ("vocab"), the training schedule
    ("days"), the streaming-eval day after each training day ("next_day"), the item corpus path
    ("items_path", or None) and the CPU threads for torch ("threads")."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    cfg = from_dict(config["cfg"])
    days: list[str] = config["days"]
    next_day: dict[str, str] = config.get("next_day", {})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

    # Same seed on every rank: identical initial parameters (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)  # noqa: NPY002  (legacy global RNG, for third-party code)
    module = CascadeModel.from_config(cfg, config["vocab"])

    pos = Position()
    resumed: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()  # Ray: set after a worker failure or on a re-run
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            resumed = load_state(ckpt_dir)
        module.scorers.load_state_dict(resumed["scorers"])
        module.loss.load_state_dict(resumed["loss"])
        pos = Position.from_dict(resumed["position"])
    pos.starts += 1

    model = ray.train.torch.prepare_model(module)  # Ray: move to device, DDP (gloo CPU / nccl GPU)
    # Compile the operator's lazy kernels now, so that a time budget (the sample-scaling study)
    # and the step timings measure training, not a JIT compiler.
    warmup_op(cfg.op.name)
    cascade: CascadeModel = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(
        [
            {"params": list(cascade.scorers.parameters()), "name": "scorers"},
            {"params": list(cascade.loss.parameters()), "name": "loss_weights"},
        ],
        lr=cfg.optim.lr,
    )
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])  # moved onto the parameters' device
        set_rng_state(resumed["rng"])
        if rank == 0:
            print(
                f"[raytopk] resumed at step {pos.global_step} "
                f"({len(pos.days_done)} day(s) done, {pos.samples_seen:,} samples seen)",
                flush=True,
            )

    cfg_dict = config["cfg"]
    schedule = [(e, d) for e in range(cfg.run.epochs) for d in days]

    def state() -> dict[str, Any] | None:
        if rank != 0:
            return None
        return {
            "scorers": cascade.scorers.state_dict(),
            "loss": cascade.loss.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "position": pos.to_dict(),
            "config": cfg_dict,
        }

    def base(kind: str, epoch: int, day: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "rank": rank,
            "epoch": epoch,
            "day": day,
            "day_index": days.index(day) if day in days else -1,
            "num_days": len(days),
            "step": pos.step,
            "global_step": pos.global_step,
            "samples_seen": pos.samples_seen,
            "train_seconds": round(pos.train_seconds, 3),
        }

    window = _Window()
    stopped: str | None = None
    max_s, max_n = cfg.run.max_train_seconds, cfg.run.max_samples
    def day_batches(day: str) -> _Batches:
        shard = ray.train.get_dataset_shard(train_key(day))  # Ray: this worker's share of the day
        return _Batches(shard, cfg.data.batch_size, cfg.data.prefetch_batches)

    def test_batches() -> _Batches:
        shard = ray.train.get_dataset_shard(TEST_KEY)
        return _Batches(shard, cfg.data.eval_batch_size, cfg.data.prefetch_batches)

    upcoming: dict[Any, _Batches] = {}  # warmed iterators: schedule item -> batches, "test"
    model.train()
    for item in range(pos.item, len(schedule)):
        if pos.budget_spent:
            break
        epoch, day = schedule[item]
        skip = pos.step if item == pos.item else 0
        pos.item, pos.step = item, 0
        batches = upcoming.pop(item, None) or day_batches(day)
        # Start the next dataset while this day trains (not the same day again: one shard
        # cannot be iterated twice at once).
        if item + 1 < len(schedule) and schedule[item + 1][1] != day:
            upcoming[item + 1] = day_batches(schedule[item + 1][1]).warm_async()
        elif item + 1 == len(schedule):
            upcoming["test"] = test_batches().warm_async()
        day_t0, day_samples, day_loss = time.perf_counter(), 0, window.__class__()
        wait_seen = 0.0
        t_step = time.perf_counter()
        for batch in batches:
            if pos.step < skip:  # mid-day checkpoint: these batches were trained before
                pos.step += 1
                t_step = time.perf_counter()
                continue
            batch = batch.to(device, non_blocking=True)
            rows = batch.batch_size
            over = (max_s > 0 and pos.train_seconds >= max_s) or (
                max_n > 0 and pos.samples_seen >= max_n
            )
            total, parts = _loss_step(model, batch)
            # One small collective per step: every rank learns whether any rank saw a
            # non-finite loss or ran out of budget, so all stop at the same step, and the global
            # sample count. (A rank quitting alone would leave the others blocked in DDP.)
            flags = torch.stack(
                [
                    (~torch.isfinite(total.detach())).double(),
                    torch.tensor(float(over), device=total.device, dtype=torch.float64),
                    torch.tensor(float(rows), device=total.device, dtype=torch.float64),
                ]
            )
            if world > 1:
                dist.all_reduce(flags)
            n_bad, n_over, global_rows = flags.tolist()
            if n_bad > 0:
                vals = {"total": float(total.detach())}
                vals.update({k: float(v) for k, v in parts.items()})
                stopped = (
                    f"non-finite loss at global step {pos.global_step + 1} (epoch {epoch}, day "
                    f"{day}, step {pos.step + 1} of the day) on {int(n_bad)} of {world} "
                    f"worker(s); loss parts on worker {rank}: "
                    + ", ".join(f"{k}={v:.6g}" for k, v in vals.items())
                )
                break
            if n_over > 0:
                pos.budget_spent = True
                break
            optimizer.zero_grad(set_to_none=True)
            total.backward()  # DDP all-reduces gradients here
            optimizer.step()

            pos.step += 1
            pos.global_step += 1
            pos.samples_seen += int(global_rows)
            day_samples += int(global_rows)
            window.add(total, parts, rows)
            day_loss.add(total, parts, rows)
            now = time.perf_counter()
            dt = now - t_step
            t_step = now
            pos.train_seconds += dt
            window.seconds += dt
            window.wait += batches.wait - wait_seen
            wait_seen = batches.wait

            if pos.global_step % cfg.run.report_every_steps == 0:
                m = base("step", epoch, day)
                m.update(window.means())
                m["samples_per_s"] = window.samples / max(window.seconds, 1e-9)
                m["data_wait_frac"] = window.wait / max(window.seconds, 1e-9)
                window.reset()
                _report(m, None, None)
            every = cfg.run.checkpoint_every_steps
            if every and pos.global_step % every == 0:
                m = base("checkpoint", epoch, day)
                _report(m, state(), f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_step")
        if stopped is not None:
            break
        if pos.budget_spent:
            m = base("budget", epoch, day)
            _report(m, state(), f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_budget")
            break
        # End of the day: every rank evaluates the next day (optional), then rank 0 checkpoints.
        pos.item, pos.step = item + 1, 0
        pos.days_done.append(f"{epoch}:{day}")
        m = base("day", epoch, day)
        m.update({f"day_{k}": v for k, v in day_loss.means().items()})
        m["day_samples"] = day_samples
        m["day_seconds"] = round(time.perf_counter() - day_t0, 3)
        if cfg.run.stream_eval and day in next_day:
            ev_shard = ray.train.get_dataset_shard(eval_key(next_day[day]))
            ev = evaluate(
                cascade,
                _eval_batches(ev_shard, cfg.data.eval_batch_size, cfg.data.prefetch_batches),
                device,
                k=cfg.loss.k_truth,
                max_batches=cfg.run.eval_max_batches,
            )
            m["stream_day"] = next_day[day]
            m.update({f"stream_{k}": v for k, v in ev.items()})
        _report(m, state(), f"checkpoint_{pos.global_step:09d}_e{epoch}_{day}_day")

    if stopped is not None:
        if rank == 0:
            print(f"[raytopk] stopping: {stopped}", flush=True)
        epoch, day = schedule[pos.item] if pos.item < len(schedule) else (0, "")
        m = base(NAN_STOP, epoch, day)
        m["reason"] = stopped
        _report(m, None, None)  # no checkpoint: the latest one stays the last good state
        return

    # Final evaluation on the test day (SPEC.md §4.5).
    items = None
    if config.get("items_path") and cfg.run.corpus_ms:
        from raytopk.data.pipeline import load_items

        items = load_items(config["items_path"])
    t0 = time.perf_counter()
    ev = evaluate(
        cascade,
        upcoming.pop("test", None) or test_batches(),
        device,
        k=cfg.loss.k_truth,
        corpus_items=items,
        corpus_ms=cfg.run.corpus_ms,
        max_batches=cfg.run.eval_max_batches,
    )
    m = base("final", *(schedule[-1] if schedule else (0, "")))
    m.update(ev)
    m["eval_seconds"] = round(time.perf_counter() - t0, 3)
    m["days_trained"] = list(pos.days_done)
    m["starts"] = pos.starts
    m["budget_spent"] = pos.budget_spent
    m["test_day"] = config.get("test_day", "")
    m["num_parameters"] = sum(p.numel() for p in cascade.scorers.parameters())
    m["param_digest"] = param_digest(cascade)
    m["loss_weights"] = [
        float(v) for p in cascade.loss.parameters() for v in p.detach().cpu().reshape(-1)
    ]
    m = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in m.items()}
    _report(m, None, None)
