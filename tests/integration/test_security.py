"""Who may talk to the Ray the project starts (docs/ray.md §2: Ray 2.60 listens on every interface
whatever the node IP, so token authentication is the protection).

The session's local Ray (started like ``jobs/train.py`` starts one, through
``raytopk.ray_env.init_ray``) is asked for its node table over its GCS port: a client without the
token is refused with UNAUTHENTICATED, a wrong token likewise, and the same call with the
cluster's token is answered, so the refusal is the token's doing and not a closed port.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def _node_table(address: str, token: str | None) -> Any:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        return stub.GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=20
        )


def _cluster_token() -> str:
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    assert loader.has_token(ignore_auth_mode=True), "the local Ray started without a token"
    return loader.get_raw_token(ignore_auth_mode=True)


def test_token_auth_is_on_and_refuses_clients_without_it(ray_cluster: Any) -> None:
    import grpc

    assert os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
    gcs = ray_cluster.address_info["gcs_address"]
    for token in (None, "not-the-cluster-token"):
        with pytest.raises(grpc.RpcError) as refused:
            _node_table(gcs, token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
    reply = _node_table(gcs, _cluster_token())
    assert len(reply.node_info_list) >= 1  # the same port answers the token's holder


def test_init_ray_refuses_to_switch_authentication_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray.data

    from raytopk.ray_env import init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver
    with pytest.raises(RuntimeError, match="RAY_AUTH_MODE=disabled: raytopk keeps"):
        init_ray(address="local")


def test_workers_quiet_only_the_loggers_that_repeat_themselves(ray_cluster: Any) -> None:
    """init_ray's worker setup hook ran in the job's worker processes: the loggers of
    raytopk.ray_env.QUIET_LOGGERS are at their quiet level there, and others are untouched."""
    import logging

    import ray
    import ray.data

    from raytopk.ray_env import QUIET_LOGGERS, configure_data_context

    @ray.remote(num_cpus=0)
    def levels() -> dict:
        names = [*QUIET_LOGGERS, "ray.data._internal.execution.operators.map_operator"]
        return {n: logging.getLogger(n).getEffectiveLevel() for n in names}

    @ray.remote(num_cpus=0)
    def own_address() -> tuple[str | None, str]:
        import os

        return os.environ.get("RAY_ADDRESS"), ray.get_runtime_context().gcs_address

    # Workers name their own cluster: an address-less State API call in them (Train's
    # placement-group cleaner) cannot fail on a machine that runs another Ray instance.
    seen, own = ray.get(own_address.remote())
    assert seen == own
    got = ray.get(levels.remote())
    for name, level in QUIET_LOGGERS.items():
        assert got[name] == level, (name, got)
    assert got["ray.data._internal.execution.operators.map_operator"] < logging.WARNING
    ctx = configure_data_context(ray.data.DataContext())
    assert ctx.print_on_execution_start is False and ctx.enable_progress_bars is False
