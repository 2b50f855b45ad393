"""Which Ray cluster a driver was told to use, and whether it will take this driver: the address with where it
came from (the `ray_address` argument, RAY_ADDRESS, Ray's record of a `ray start` cluster), one probe of it
bounded by seconds, and the error that says what was tried and what to check.

Why a probe of our own: `ray.init(address=...)` retries an address that does not answer without end, waits 20 s
before a vague ConnectionError when the cluster refuses the token, and hangs on a port that is not a GCS (the
dashboard's). One gRPC call to the GCS (`CheckAlive`, what Ray's own health checks ask) with this process's token
and a deadline tells these apart in milliseconds (seconds for a host that never answers).
"""

from __future__ import annotations

import dataclasses
import os

PROBE_TIMEOUT_S = 2.0  # how long an address may take to answer the probe
RAY_CLIENT_REFUSAL = (
    "Ray Client addresses (ray://) are not supported: Ray deprecates Ray Client and documents that it may not "
    "work as expected for Ray Train and Ray Tune; every dataset and weight raytrainer sends would pass through "
    "the one client connection. Run the script on the cluster instead: `ray job submit --address "
    "http://<head>:8265 --working-dir . -- python train.py` (no ray_address needed there), or on a cluster node "
    "with ray_address='<head>:6379' (the GCS address).")


@dataclasses.dataclass(frozen=True)
class ClusterAddress:
    """The GCS address (`host:port`) of a cluster to join, or "local" (this driver's own Ray), or "auto" (an
    existing cluster, none found yet); `source` says who named it, for messages."""

    address: str
    source: str
    recorded: bool = False  # read from Ray's record of `ray start`: ray.init finds it (and its token) itself
    named: bool = True  # asked for by ray_address / RAY_ADDRESS; an unasked-for stale record is skipped


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What the probe found at an address: `answers` (a Ray GCS that accepts this driver), `silent` (nothing
    answers there), `not_ray` (something that is not a Ray GCS answers) or `refused` (a Ray GCS that will not
    take this driver); `detail` is what was seen, for the message."""

    outcome: str
    detail: str = ""


def named_cluster(argument: str | None) -> ClusterAddress | None:
    """The cluster `argument` (ray_address), else RAY_ADDRESS names; None when neither names one. Raises
    `ValueError` for an address a driver cannot use (Ray Client's ray://, the dashboard's http://, no port)."""
    env = os.environ.get("RAY_ADDRESS") or None
    if argument:
        given, source = argument, f"ray_address={argument!r}"
        if argument == "auto" and env and env != "auto":  # as ray.init: "auto" takes RAY_ADDRESS first
            given, source = env, f"ray_address='auto' with the environment variable RAY_ADDRESS={env!r}"
    elif env:
        given, source = env, f"the environment variable RAY_ADDRESS={env!r}"
    else:
        return None
    if given.startswith("ray://"):
        raise ValueError(f"{source}: {RAY_CLIENT_REFUSAL}")
    if "://" in given:
        raise ValueError(f"{source} is a URL; a driver joins a cluster by its GCS address, host:port (the port "
                         "`ray start --head --port` took, 6379 by default). An http:// address is the dashboard's, "
                         "for `ray job submit --address`.")
    if given in ("local", "auto"):
        recorded = recorded_cluster() if given == "auto" else None
        if recorded is not None:  # Not Ray's fallback of any Ray process `ps` finds: that may be another program's.
            return dataclasses.replace(recorded, source=f"{source}, which found {recorded.source}", named=True)
        return ClusterAddress(given, source)
    from ray._common.network_utils import parse_address

    if parse_address(given) is None:
        raise ValueError(f"{source} is not a Ray cluster address: use the head's GCS address as host:port, e.g. "
                         "'10.0.0.5:6379', or 'auto' for the cluster `ray start` runs on this machine.")
    return ClusterAddress(given, source)


def recorded_cluster() -> ClusterAddress | None:
    """The cluster `ray start` recorded on this machine (in Ray's temp dir), if any; it may be gone since."""
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if not address:
        return None
    return ClusterAddress(address, f"Ray's record of a `ray start` cluster ({get_ray_address_file(None)})",
                          recorded=True, named=False)


def probe(cluster: ClusterAddress, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Ask the GCS at `cluster.address` once, with this process's token, whether it is alive."""
    import grpc
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if cluster.recorded:  # what ray.init does for a cluster it finds: use the machine's token if there is one
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        with init_grpc_channel(cluster.address) as channel:
            reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).CheckAlive(
                gcs_service_pb2.CheckAliveRequest(), timeout=timeout_s)
    except grpc.RpcError as error:
        return classify_rpc_error(error.code().name, error.details() or "", timeout_s)
    return compare_ray_versions(reply.ray_version, ray.__version__)


def compare_ray_versions(cluster_version: str, driver_version: str) -> ProbeResult:
    """A cluster answers this driver only when both run the same Ray (ray.init refuses any other)."""
    if cluster_version and cluster_version != driver_version:
        return ProbeResult("refused", f"the cluster runs Ray {cluster_version} and this driver Ray "
                                      f"{driver_version}; a driver must run the cluster's Ray version "
                                      f"(pip install ray=={cluster_version})")
    return ProbeResult("answers")


def classify_rpc_error(code: str, details: str, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """The probe's outcome from the gRPC status `code` (its name) and `details` of a failed call."""
    if code == "UNAUTHENTICATED":
        return ProbeResult("refused", f"its token authentication rejected this driver's token ({details})")
    if code == "DEADLINE_EXCEEDED":
        return ProbeResult("silent", f"no answer within {timeout_s:g} s")
    http = "http1" in details or "HTTP/2" in details  # gRPC's words for an HTTP/1 server's answer
    if code == "UNAVAILABLE" and not http:
        return ProbeResult("silent", details)
    if http:
        details = "an HTTP server answers there (a dashboard's port?)"
    elif code == "UNIMPLEMENTED":
        details = "a gRPC server that is not a Ray GCS answers there (Ray Client's port, 10001 by default?)"
    return ProbeResult("not_ray", details)


def connection_error(cluster: ClusterAddress, result: ProbeResult) -> ConnectionError:
    """The error for a probe that did not answer: the address, who named it, what was tried, what to check."""
    address = cluster.address
    tried = f"asked its GCS whether the cluster is alive, allowing {PROBE_TIMEOUT_S:g} s"
    if result.outcome == "refused":
        return ConnectionError(
            f"{cluster.source}: the Ray cluster at {address} refused this driver: {result.detail}. "
            + (_TOKEN_HINT if "token" in result.detail else "")
            + f"Check with `ray status --address {address}` from this machine.")
    what = "nothing answers" if result.outcome == "silent" else "no Ray cluster answers"
    return ConnectionError(
        f"{cluster.source}: {what} at {address} ({tried}: {result.detail}). Check that the cluster runs and "
        f"that this machine reaches it: `ray status --address {address}`; that {address.rsplit(':', 1)[-1]} is "
        "the head's GCS port (the port `ray start --head --port` took, 6379 by default; not the dashboard's 8265 "
        "or Ray Client's 10001); and, for a cluster with token authentication, that this process has its token "
        "(RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).")


_TOKEN_HINT = ("Give this process the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> or "
               "RAY_AUTH_TOKEN_PATH=<file> (`ray get-auth-token` on the head prints it). ")
