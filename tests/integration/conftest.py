"""One local Ray instance shared by the whole test session (docs/ray.md §3: each init costs 6-8 s
here), started as the project starts one (``raytopk.ray_env.init_ray``: 127.0.0.1, no dashboard,
token authentication on). Sized num_cpus=4 so Ray Data always has CPUs left next to Train
workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    import ray

    if ray.is_initialized():  # a test that started its own instance must not leak it here
        ray.shutdown()
    from raytopk.ray_env import init_ray

    ctx = init_ray(
        num_cpus=4, log_to_driver=False, object_store_memory=512 * 1024**2, address="local"
    )
    try:
        yield ctx
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local(ray_cluster: Any) -> Any:
    """Alias used by tests/integration/test_train.py."""
    return ray_cluster
