"""The private cluster requires Ray's token authentication: its GCS (on 127.0.0.1) refuses a call without the
cluster's token or with another one; every cluster gets a fresh token, and no token file is written."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from latent_relay.relay.runtime.cluster import start_local_cluster  # noqa: E402

pytestmark = pytest.mark.ray
TOKEN_ENV = "RAY_AUTH_TOKEN"  # where Ray looks first for the token, and where the private cluster's is kept


def _gcs_status(address: str, token: str | None) -> grpc.StatusCode:
    """The status of one read call (the cluster's nodes) to the GCS at ``address``, sent with ``token`` or none."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_private_cluster_requires_a_fresh_token(monkeypatch, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("HOME", str(tmp_path))  # where Ray would keep a token shared by every cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a user's setting does not open the private cluster
    tokens = []
    try:
        for _ in range(2):
            start_local_cluster(num_cpus=1, object_store_memory=80 * 1024**2, log_to_driver=False)
            address = ray.get_runtime_context().gcs_address
            assert address.rsplit(":", 1)[0] == "127.0.0.1"
            token = os.environ.get(TOKEN_ENV, "")
            tokens.append(token)
            assert _gcs_status(address, None) == grpc.StatusCode.UNAUTHENTICATED
            assert _gcs_status(address, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
            assert _gcs_status(address, token) == grpc.StatusCode.OK
            if len(tokens) == 2:  # the first cluster's token does not open the second
                assert _gcs_status(address, tokens[0]) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(RuntimeError, match="already initialised"):
                start_local_cluster()  # and the token in use stays
            assert os.environ.get(TOKEN_ENV) == token and _gcs_status(address, token) == grpc.StatusCode.OK
            ray.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert len(set(tokens)) == 2 and all(len(t) == 64 for t in tokens)  # 256 random bits, new for each cluster
    assert not (tmp_path / ".ray" / "auth_token").exists()
