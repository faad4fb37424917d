"""Fixtures shared by unit tests (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted synthetic dataset of 3 days x 120 requests (2024-01-13..15), made once per
    session for the local-backend training tests (they read it, never write to it)."""
    from raytopk.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("tiny_local_data")
    return Path(prepare_synthetic(root, days=3, requests_per_day=120, seed=1))
