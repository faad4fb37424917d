"""Cascade evaluation metrics of the RecFlow protocol (docs/protocol.md §4.5; Zhu et al., arXiv
2510.11472).

Notation: B = requests, N = candidates per request, V_b = request b's valid slots, K = |G| target
(10), G_b = ground-truth top-K, π^s = stage s's scores.

- ground truth (raytopk.data.labels.ground_truth, shared with the losses): the label mass y_b,
  Σ_j y_bj = k_b = min(K, #valid own slots): 1 above the K-th priority, the slots tied AT the
  K-th priority share the remaining mass equally, 0 at sampled negatives (priority 0) — the one
  tie rule of every loss and metric (docs/protocol.md §4.3). G_b = {j : y_bj > 0}.
- Recall@K@M of one stage: Σ_{j ∈ top-M of π^s over V_b} y_bj / k_b (with 0/1 labels:
  |top-M ∩ G_b| / |G_b|; a tied slot counts by its share).
- joint Recall@K@M_S (cuts M_1 > … > M_S): stage 1 keeps its top M_1 of V_b, stage s keeps its
  top M_s of what stage s−1 kept; Σ_{j ∈ F_b} y_bj / k_b with F_b the last stage's survivors.
  k_b = K = 10 (the "/10" of joint Recall@10@20) whenever a request has >= 10 own valid slots; a
  request with fewer has fewer positives, and a perfect scorer still scores 1.0 on it.
- NDCG@K of one stage: gains = priorities of V_b, exactly sklearn.metrics.ndcg_score(
  y_true=priority[V_b], y_score=π^s[V_b], k=K): log2 discounts, ties in the scores averaged over
  the positions they share, a request whose gains are all 0 scores 0.
- Kendall τ of one stage: tau-b between π^s[V_b] and priority[V_b] as scipy.stats.kendalltau,
  τ_b = (n_c − n_d) / sqrt((n_0 − n_x)(n_0 − n_y)); requests where it is undefined (fewer than 2
  valid slots, or all scores or all priorities tied: scipy returns NaN) are left out of the mean.

Every metric is a mean over requests. Across DDP workers the per-request sums and counts are
all-reduced and divided once (a mean over all requests, not a mean of per-worker means).
Everything is vectorised in torch; Kendall τ is O(N²) per request in row blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
import torch.distributed as dist

from raytopk.data.batch import CascadeBatch
from raytopk.data.labels import check_rows, ground_truth
from raytopk.data.schema import K_TRUTH

__all__ = [
    "recall_at",
    "joint_recall_at",
    "ndcg_at",
    "kendall_tau_b",
    "CascadeMetrics",
    "STAGE_NAMES",
    "eval_cuts",
    "stage_names",
    "headline_key",
    "metric_keys",
]

# The names and evaluation cuts of a cascade's stages, first to last: every metric key is built
# from them here (metric_keys), so a 3-stage run's headline is joint_recall@10@10 everywhere.
STAGE_NAMES = ("retrieval", "prerank", "rank", "rerank")
_EVAL_CUTS = (30, 20, 10, 5)  # survivors kept by each stage at evaluation (docs/protocol.md §4.5)
_KENDALL_BLOCK = 2**24  # elements of one (rows, N, N) pairwise block


def _topk_idx(scores: torch.Tensor, mask: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (B, min(m, N)) of the top m valid slots (masked slots only fill rows with fewer
    than m valid ones; they never hold a truth item)."""
    key = scores.masked_fill(~mask, float("-inf"))
    return torch.topk(key, min(m, scores.shape[-1]), dim=-1).indices


def _truth_size(truth: torch.Tensor) -> torch.Tensor:
    return truth.to(torch.float64).sum(-1)  # k_b


@torch.no_grad()
def recall_at(
    scores: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor, m: int
) -> torch.Tensor:
    """Per-request Σ_{top-m} y / Σ y (float64, (B,)) for the label mass ``truth`` (B, N)
    (data.labels.ground_truth; a bool G works too); 0 where there is no positive."""
    check_rows(scores, mask)
    hits = truth.to(torch.float64).gather(-1, _topk_idx(scores, mask, m)).sum(-1)
    return hits / _truth_size(truth).clamp_min(1.0)


@torch.no_grad()
def joint_recall_at(
    scores: Sequence[torch.Tensor], mask: torch.Tensor, truth: torch.Tensor, cuts: Sequence[int]
) -> torch.Tensor:
    """Per-request joint recall (B,): stage s keeps its top cuts[s] of stage s−1's survivors."""
    if len(scores) != len(cuts) or not scores:
        raise ValueError(
            f"'scores' has {len(scores)} stages but 'cuts' {tuple(cuts)} has {len(cuts)}"
        )
    b, n = mask.shape
    kept = torch.arange(n, device=mask.device).expand(b, n)  # slot ids still alive, (B, n_s)
    alive = mask
    for s, (sc, m) in enumerate(zip(scores, cuts)):
        check_rows(sc, mask, f"scores[{s}]")
        sub = sc.gather(-1, kept)  # (B, n_s) this stage's scores of the survivors
        pick = _topk_idx(sub, alive, m)  # (B, n_{s+1}) positions within `kept`
        kept = kept.gather(-1, pick)
        alive = alive.gather(-1, pick)
    hits = (truth.to(torch.float64).gather(-1, kept) * alive).sum(-1)
    return hits / _truth_size(truth).clamp_min(1.0)


@torch.no_grad()
def ndcg_at(
    scores: torch.Tensor, gains: torch.Tensor, mask: torch.Tensor, k: int = 10
) -> torch.Tensor:
    """Per-request NDCG@k over valid slots (float64, (B,)), equal to sklearn's ndcg_score on
    each request's valid slots (tie-averaged DCG; 0 when every gain is 0)."""
    check_rows(scores, mask)
    n = scores.shape[-1]
    s = scores.to(torch.float64)
    g = gains.to(torch.float64).masked_fill(~mask, 0.0)
    pos = torch.arange(n, device=s.device, dtype=torch.float64)
    disc = torch.where(pos < k, 1.0 / torch.log2(pos + 2.0), torch.zeros_like(pos))  # (N,)
    cum = torch.cat([disc.new_zeros(1), disc.cumsum(0)])  # cum[i] = Σ_{t<i} disc[t]
    # Sort key ascending = scores descending; masked slots go last so valid ones hold
    # positions 0..|V|-1 as in sklearn on the valid slots alone.
    key = torch.where(mask, -s, torch.full_like(s, float("inf")))
    sorted_key = torch.sort(key, dim=-1).values
    start = torch.searchsorted(sorted_key, key, right=False)  # first position of my tie group
    end = torch.searchsorted(sorted_key, key, right=True)  # one past its last position
    avg_disc = (cum[end] - cum[start]) / (end - start).to(torch.float64)  # (B, N)
    dcg = (g * avg_disc).sum(-1)
    ideal = torch.sort(g, dim=-1, descending=True).values
    idcg = (ideal * disc).sum(-1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(1e-300), torch.zeros_like(dcg))


@numba.njit(cache=True, nogil=True, parallel=True)
def _kendall_rows(x, y, m, tau, ok):  # pragma: no cover - compiled
    """τ-b per row over the valid slots, counting unordered pairs in O(N²) time and O(1) extra
    memory per row: s = Σ sign(Δx)·sign(Δy), ties in x and in y, n0 = n(n − 1)/2."""
    for r in numba.prange(x.shape[0]):
        s = 0
        tx = 0
        ty = 0
        nv = 0
        n = x.shape[1]
        for i in range(n):
            if not m[r, i]:
                continue
            nv += 1
            xi, yi = x[r, i], y[r, i]
            for j in range(i + 1, n):
                if not m[r, j]:
                    continue
                dx = xi - x[r, j]
                dy = yi - y[r, j]
                sx = (dx > 0) - (dx < 0)
                sy = (dy > 0) - (dy < 0)
                s += sx * sy
                tx += sx == 0
                ty += sy == 0
        n0 = nv * (nv - 1) // 2
        den = float(n0 - tx) * float(n0 - ty)
        if den > 0:
            tau[r] = s / np.sqrt(den)
            ok[r] = True
        else:
            tau[r] = 0.0
            ok[r] = False


@torch.no_grad()
def kendall_tau_b(
    scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request Kendall tau-b over valid slots: (tau (B,) float64, defined (B,) bool).

    tau is 0 where undefined (scipy gives NaN there); ``defined`` says which rows count. On CPU a
    numba kernel counts the pairs row by row (parallel over rows, no (B, N, N) tensor); on other
    devices the pairs are formed as (rows, N, N) blocks of at most ``_KENDALL_BLOCK`` elements."""
    check_rows(scores, mask)
    if scores.device.type == "cpu":
        x = scores.detach().to(torch.float64).contiguous().numpy()
        y = target.detach().to(torch.float64).contiguous().numpy()
        m = mask.contiguous().numpy()
        tau, ok = np.empty(x.shape[0], np.float64), np.empty(x.shape[0], np.bool_)
        _kendall_rows(x, y, m, tau, ok)
        return torch.from_numpy(tau), torch.from_numpy(ok)
    return _kendall_blocks(scores, target, mask)


def _kendall_blocks(
    scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectorised path (any device): ordered pairs of (rows, N, N) blocks."""
    b, n = scores.shape
    rows = max(1, _KENDALL_BLOCK // max(1, n * n))
    taus, defined = [], []
    for i in range(0, b, rows):  # blocks of requests; each block is fully vectorised
        x, y, m = scores[i : i + rows], target[i : i + rows], mask[i : i + rows]
        dx = torch.sign(x.unsqueeze(-1) - x.unsqueeze(-2)).to(torch.int8)  # (b, N, N)
        dy = torch.sign(y.unsqueeze(-1) - y.unsqueeze(-2)).to(torch.int8)
        pair = m.unsqueeze(-1) & m.unsqueeze(-2)
        pair &= ~torch.eye(n, dtype=torch.bool, device=m.device)
        # Ordered pairs count each unordered pair twice; the factor cancels in τ_b.
        s = (dx * dy).masked_fill(~pair, 0).sum((-1, -2), dtype=torch.float64)
        nv = m.sum(-1).to(torch.float64)
        n0 = nv * (nv - 1)
        nx = ((dx == 0) & pair).sum((-1, -2)).to(torch.float64)
        ny = ((dy == 0) & pair).sum((-1, -2)).to(torch.float64)
        den = (n0 - nx) * (n0 - ny)
        ok = den > 0
        taus.append(torch.where(ok, s / den.clamp_min(1.0).sqrt(), torch.zeros_like(s)))
        defined.append(ok)
    return torch.cat(taus), torch.cat(defined)


def _check_num_stages(num_stages: int) -> int:
    if (
        isinstance(num_stages, bool)
        or not isinstance(num_stages, int)
        or not 1 <= num_stages <= len(STAGE_NAMES)
    ):
        raise ValueError(
            f"'num_stages' should be an int in 1..{len(STAGE_NAMES)} but got {num_stages!r}"
        )
    return num_stages


def eval_cuts(num_stages: int) -> tuple[int, ...]:
    """Survivors kept by each stage at evaluation: retrieval 30, pre-rank 20 (docs/protocol.md
    §4.5); a third (rank) stage keeps 10, a fourth 5. A 1-stage model keeps 20, so its headline is
    Recall@10@20 like the 2-stage cascade's joint recall."""
    n = _check_num_stages(num_stages)
    return _EVAL_CUTS[:n] if n > 1 else (20,)


def stage_names(num_stages: int) -> tuple[str, ...]:
    """Names of the stages in the metric keys, first to last: retrieval, prerank, rank, rerank."""
    return STAGE_NAMES[: _check_num_stages(num_stages)]


def _keys(names: Sequence[str], cuts: Sequence[int], k: int) -> tuple[str, ...]:
    """joint_recall@{k}@{cuts[-1]}, then per stage in cascade order {name}_recall@{k}@{cut},
    {name}_ndcg@{k}, {name}_kendall_tau."""
    out = [f"joint_recall@{k}@{cuts[-1]}"]
    for name, cut in zip(names, cuts):
        out += [f"{name}_recall@{k}@{cut}", f"{name}_ndcg@{k}", f"{name}_kendall_tau"]
    return tuple(out)


def metric_keys(num_stages: int, k: int = K_TRUTH) -> tuple[str, ...]:
    """Every test-day metric ``CascadeMetrics(eval_cuts(num_stages), k).compute()`` returns,
    except num_requests, in this order: the headline (headline_key), then for each stage in
    cascade order its recall@k@cut, ndcg@k and kendall_tau. For 2 stages: joint_recall@10@20,
    retrieval_recall@10@30, retrieval_ndcg@10, retrieval_kendall_tau, prerank_recall@10@20,
    prerank_ndcg@10, prerank_kendall_tau."""
    return _keys(stage_names(num_stages), eval_cuts(num_stages), k)


def headline_key(num_stages: int, k: int = K_TRUTH) -> str:
    """The headline metric of a num_stages cascade: joint Recall@k at the last stage's cut,
    e.g. 'joint_recall@10@20' for 2 stages (and 1), 'joint_recall@10@10' for 3."""
    return metric_keys(num_stages, k)[0]


class CascadeMetrics:
    """Accumulates docs/protocol.md §4.5's metrics over evaluation batches; ``compute()``
    all-reduces.

    Args:
        cuts: per-stage survivors (30, 20) for retrieval -> pre-rank; one cut per stage.
        k: |G|, the ground-truth top set size.
        names: stage names used in the keys (default stage_names(len(cuts))).

    Keys (``self.keys``, in this order, as metric_keys builds them): joint_recall@{k}@{cuts[-1]},
    then per stage {name}_recall@{k}@{cut}, {name}_ndcg@{k}, {name}_kendall_tau; compute() adds
    num_requests (requests with >= 1 valid slot). With cuts = eval_cuts(S) and the default names
    they are exactly metric_keys(S, k).
    """

    def __init__(
        self,
        cuts: Sequence[int] = (30, 20),
        k: int = K_TRUTH,
        names: Sequence[str] | None = None,
    ) -> None:
        cuts = tuple(int(c) for c in cuts)
        if not cuts or any(c < 1 for c in cuts):
            raise ValueError(f"'cuts' should be positive stage cuts but got {cuts}")
        if any(a < b for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"'cuts' should be non-increasing (a funnel) but got {cuts}")
        if k < 1:
            raise ValueError(f"'k' should be >= 1 but got {k}")
        if names is None and len(cuts) > len(STAGE_NAMES):
            raise ValueError(
                f"'names' should name each of the {len(cuts)} stages (the default names cover "
                f"{len(STAGE_NAMES)}: {STAGE_NAMES})"
            )
        names = tuple(names) if names is not None else stage_names(len(cuts))
        if len(names) != len(cuts):
            raise ValueError(f"'names' {names} should name each of the {len(cuts)} stages")
        self.cuts, self.k, self.names = cuts, k, names
        self.keys = _keys(names, cuts, k)
        # Layout of the sums vector: per stage (recall, ndcg, tau_sum, tau_count), then joint,
        # then the request count.
        self._size = 4 * len(cuts) + 2
        self._sums: torch.Tensor | None = None

    def reset(self) -> None:
        self._sums = None

    @torch.no_grad()
    def update(self, scores: Sequence[torch.Tensor], batch: CascadeBatch) -> None:
        if len(scores) != len(self.cuts):
            raise ValueError(
                f"'scores' has {len(scores)} stages but cuts {self.cuts} name {len(self.cuts)}"
            )
        mask = batch.cand_mask
        prio = batch.priority
        scores = [s.detach() for s in scores]
        for name, s in zip(self.names, scores):
            check_rows(s, mask, f"{name} scores")
            if not bool(torch.isfinite(s[mask]).all()):
                raise ValueError(f"'{name}' scores are not finite at some valid slot")
        truth = ground_truth(prio, mask, self.k)
        has = mask.any(-1)  # requests with at least one valid slot
        hasf = has.to(torch.float64)
        parts = []
        for s, cut in zip(scores, self.cuts):
            tau, ok = kendall_tau_b(s, prio, mask)
            parts += [
                (recall_at(s, mask, truth, cut) * hasf).sum(),
                (ndcg_at(s, prio, mask, self.k) * hasf).sum(),
                tau.sum(),
                ok.sum().to(torch.float64),
            ]
        parts.append((joint_recall_at(scores, mask, truth, self.cuts) * hasf).sum())
        parts.append(hasf.sum())
        stats = torch.stack(parts)
        self._sums = stats if self._sums is None else self._sums + stats.to(self._sums.device)

    def compute(self) -> dict[str, float]:
        """Metrics over every request seen by every worker (collective when distributed: every
        rank must call it)."""
        sums = self._sums
        if sums is None:  # a rank that saw no batch still joins the all-reduce
            sums = torch.zeros(self._size, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            # NCCL reduces CUDA tensors only; gloo CPU tensors.
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend() == "nccl"
                else torch.device("cpu")
            )
            sums = sums.to(dev).clone()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        v = sums.cpu().tolist()
        count = v[-1]

        def div(a: float, c: float) -> float:
            return a / c if c > 0 else float("nan")

        values = [div(v[-2], count)]  # in the order of self.keys
        for i in range(len(self.cuts)):
            r, nd, ts, tc = v[4 * i : 4 * i + 4]
            values += [div(r, count), div(nd, count), div(ts, tc)]
        out = dict(zip(self.keys, values, strict=True))
        out["num_requests"] = float(count)
        return out
