"""Fixtures shared by unit tests (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit tests' one converted synthetic dataset: 4 days x 120 requests (2024-01-13..16),
    made once per session (tests read it, never write to it). Local-backend runs train on
    01-13..14 and test on 01-15 (tests/unit/local_runs.py); the study's and the anytime tests
    hold 01-15 out for validation and test on 01-16."""
    from raytopk.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("tiny_local_data")
    return Path(prepare_synthetic(root, days=4, requests_per_day=120, seed=1))
