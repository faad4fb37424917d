"""Evaluation metrics (docs/protocol.md §4.5): cascade recall, NDCG, Kendall τ (``cascade``) and
full-corpus faiss retrieval (``raytopk.metrics.corpus``, imported on demand: faiss is an extra).
"""

from raytopk.metrics.cascade import (
    STAGE_NAMES,
    CascadeMetrics,
    eval_cuts,
    headline_key,
    joint_recall_at,
    kendall_tau_b,
    metric_keys,
    ndcg_at,
    recall_at,
    stage_names,
)

__all__ = [
    "STAGE_NAMES",
    "CascadeMetrics",
    "eval_cuts",
    "headline_key",
    "joint_recall_at",
    "kendall_tau_b",
    "metric_keys",
    "ndcg_at",
    "recall_at",
    "stage_names",
]
