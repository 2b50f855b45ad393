"""Which Ray to use, and what a worker group asks of it: connect (or start the embedded Ray), size the workers,
and refuse on the driver what the cluster can never run."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from typing import Any

import ray

from raytrainer.arguments import ray_settings
from raytrainer.backend.cluster_address import (RAY_CLIENT_REFUSAL, ClusterAddress, connection_error,
                                                  named_cluster, probe, recorded_cluster)

logger = logging.getLogger(__name__)

_embedded = {"started": False}
_connecting = threading.Lock()


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray once per driver: `address`, RAY_ADDRESS / the job's cluster, the `ray start` cluster recorded
    on this machine, or else an embedded local Ray for this driver. Never starts a second local Ray.

    Raises `ConnectionError` within seconds when the cluster named does not answer or refuses this driver, and
    `ValueError` for a Ray Client address or one that names another cluster than the one this process is
    already connected to. One thread at a time: a background start (`backend.early_start`) may be inside
    `ray.init()` when another Trainer's call connects; that call waits for it and then finds Ray connected."""
    with _connecting:
        _ensure_ray(address)


def _ensure_ray(address: str | None) -> None:
    if ray.is_initialized():
        check_connected_cluster(address)
        return
    options = {"ignore_reinit_error": True, "logging_level": logging.WARNING, "log_to_driver": True}
    cluster = named_cluster(address) or recorded_cluster()
    if cluster is None or cluster.address == "local" or not joinable(cluster):
        start_embedded_ray(options)
        return
    try:
        # A recorded cluster: ray.init finds it (and, as for any cluster it finds, the machine's token) itself.
        ray.init(address=None if cluster.recorded else cluster.address, **options)
    except Exception as error:  # noqa: BLE001 - the probe passed: say which cluster ray.init failed to join
        raise ConnectionError(f"{cluster.source}: the Ray cluster at {cluster.address} answered, but joining it "
                              f"failed: {error}") from error


def check_cluster_address(address: str | None) -> None:
    """On the driver, at a Trainer's construction: raise now what connecting would raise for `address` (the
    argument), RAY_ADDRESS or `address='auto'`'s recorded cluster: a Ray Client or malformed address, one that
    does not answer or refuses this driver, or another cluster than the connected one. A cluster nobody named
    (the `ray start` record) is probed when the call connects: a stale record only means the embedded Ray."""
    if ray.is_initialized():
        check_connected_cluster(address)
        return
    cluster = named_cluster(address)
    if cluster is not None and cluster.address != "local":
        joinable(cluster)


def joinable(cluster: ClusterAddress) -> bool:
    """Probe `cluster`: True when it takes this driver; False for a stale record nobody asked for (warned:
    the driver starts its embedded Ray); raises `ConnectionError` naming what was tried and what to check for
    one that was asked for, or that refuses this driver."""
    if cluster.address == "auto":
        raise ConnectionError(
            f"{cluster.source}: found no running Ray cluster to join: RAY_ADDRESS is not set and no `ray start` "
            "cluster is recorded on this machine. Start one with `ray start --head`, give its address "
            "(host:port), or leave ray_address unset for an embedded Ray.")
    result = probe(cluster)
    if result.outcome in ("silent", "not_ray") and not cluster.named:
        logger.warning(
            "%s names %s, which does not answer (%s): the `ray start` that wrote it ended without `ray stop`. "
            "Starting an embedded Ray for this driver instead; run `ray stop` to clear the record (or `ray start "
            "--head` to start that cluster again).", cluster.source, cluster.address, result.detail)
        return False
    if result.outcome != "answers":
        raise connection_error(cluster, result)
    return True


def check_connected_cluster(address: str | None) -> None:
    """Raise when `address` (the argument, else RAY_ADDRESS) names another Ray cluster than the one this driver
    process is connected to, or when it is connected through Ray Client. Only on a driver: Ray's own processes
    (a Tune trial's actor) may carry an environment that was never the user's choice of cluster."""
    from ray._private import worker as ray_worker
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():
        raise ValueError(f"This process is connected to Ray through Ray Client (ray://). {RAY_CLIENT_REFUSAL}")
    if ray_worker.global_worker.mode != ray.SCRIPT_MODE:
        return
    cluster = named_cluster(address)
    if cluster is None or cluster.address in ("auto", "local"):
        return  # any cluster (none recorded) / this driver's own: nothing to compare the connection with
    current = ray.get_runtime_context().gcs_address
    if cluster.recorded and probe(cluster).outcome != "answers":
        return  # `auto` found only a stale record: the connected cluster is the one running
    if _same_cluster(cluster.address, current):
        return
    raise ValueError(
        f"{cluster.source} names another Ray cluster than the one this process is already connected to "
        f"({current}); a process uses one Ray cluster. Remove ray_address (and RAY_ADDRESS) to train on {current}, "
        "or call ray.shutdown() before building the Trainer to use the other one.")


def _same_cluster(address: str, current: str) -> bool:
    from ray._common.network_utils import parse_address

    wanted, connected = parse_address(address), parse_address(current)
    if wanted is None or connected is None:
        return False
    return str(wanted[1]) == str(connected[1]) and (
        _host_ip(wanted[0]) == _host_ip(connected[0])
        or (_is_this_machine(wanted[0]) and _is_this_machine(connected[0])))


def start_embedded_ray(options: dict) -> None:
    """A Ray for this driver alone: no dashboard (a `ray start` cluster keeps its own), and listening on loopback
    only. Ray's local-only mode (the default on macOS and Windows: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`) resolves
    the node address to 127.0.0.1 instead of this machine's network address; the processes then bind there."""
    from ray._private import ray_constants

    # Ray Train's state actor asks the State API (the dashboard's) every 30 s whether each run's controller lives.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    # Ray Train's preemption watcher polls the nodes for a cloud's preemption notice: the embedded Ray's one node
    # is the driver's own machine (see backend/embedded_train_run.py for the other actors left out).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # Ray prestarts one idle worker process per CPU for a first driver; Ray Train's actors each want a runtime
        # environment of their own and cannot use them, so on a small machine they only compete with the run's start.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 _system_config={"prestart_worker_first_driver": False}, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    _embedded["started"] = True


def _host_ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _is_this_machine(host: str) -> bool:
    from ray._private.services import get_node_ip_address

    ip = _host_ip(host)
    return ip.startswith("127.") or ip in ("::1", "0.0.0.0") or ip == get_node_ip_address()


def is_embedded_ray() -> bool:
    return _embedded["started"]


def shutdown_embedded_ray() -> None:
    if _embedded["started"] and ray.is_initialized():
        ray.shutdown()
        _embedded["started"] = False


def on_driver_node() -> Any:
    """The scheduling strategy of raytrainer's own actors (a worker group's command channel, a search's lender):
    the driver's node, strictly. They hold what the driver and the workers share (the command in flight, the
    checkpoint a restart resumes from, the search's groups); on a worker's node, losing that node would cut the
    driver off from every worker. Ray Train places its controller there too; these actors need no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def driver_node_resource() -> str | None:
    """A resource only the driver's node has, for what must run there but is placed by resources alone (Tune's
    trial actors): `node:__internal_head__` when the driver runs on the head (`ray job submit`, a script on the
    head), else the node's `node:<ip>` when no other node has the same IP. None when no resource singles it out
    (several raylets of one machine, the driver on a non-head one): then Ray places those actors anywhere."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME, NODE_ID_PREFIX

    node_id = ray.get_runtime_context().get_node_id()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    mine = next((node for node in nodes if node["NodeID"] == node_id), None)
    if mine is None:
        return None
    names = sorted((name for name in mine["Resources"] if name.startswith(NODE_ID_PREFIX)),
                   key=lambda name: name != HEAD_NODE_RESOURCE_NAME)  # the head's own name first
    for name in names:
        if sum(1 for node in nodes if name in node["Resources"]) == 1:
            return name
    return None


def cluster_autoscales() -> bool:
    """Whether the cluster was started by the cluster launcher with an autoscaler (it may grow)."""
    return bool(os.environ.get("RAYTRAINER_CLUSTER_AUTOSCALES"))


def resolve_use_gpu(args: Any, cluster: dict[str, float] | None = None) -> bool:
    """Whether workers train on GPUs: `use_cpu=True` never, `use_gpu=None` when the cluster has GPUs."""
    use_gpu = ray_settings(args)["use_gpu"]
    if args.use_cpu:
        return False
    if use_gpu is None:
        cluster = ray.cluster_resources() if cluster is None else cluster
        return cluster.get("GPU", 0) >= 1
    return bool(use_gpu)


@dataclasses.dataclass(frozen=True)
class WorkerGroupSpec:
    """How many workers, on what, with which failure and storage settings. Two calls whose specs are equal can
    share one warm group."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: tuple[tuple[str, float], ...]
    placement_strategy: str
    max_failures: int
    storage_path: str | None
    backend: str
    timeout_s: int

    @classmethod
    def of(cls, args: Any, cluster: dict[str, float] | None = None) -> "WorkerGroupSpec":
        settings = ray_settings(args)
        use_gpu = resolve_use_gpu(args, cluster)
        resources = dict(settings["resources_per_worker"] or {"CPU": 1})
        if use_gpu:
            resources.setdefault("GPU", 1)
        return cls(num_workers=settings["num_workers"], use_gpu=use_gpu,
                   resources_per_worker=tuple(sorted(resources.items())),
                   placement_strategy=settings["placement_strategy"], max_failures=settings["max_failures"],
                   storage_path=settings["storage_path"], backend=args.ddp_backend or ("nccl" if use_gpu else "gloo"),
                   timeout_s=int(args.ddp_timeout or 1800))

    @property
    def resources(self) -> dict[str, float]:
        """Ray resources of one worker."""
        return dict(self.resources_per_worker)

    def total(self) -> dict[str, float]:
        """What all the workers of the group need together."""
        return {name: amount * self.num_workers for name, amount in self.resources_per_worker if amount}

    def check_fits_cluster(self) -> None:
        """Raise when the cluster can never run this group (instead of waiting forever for resources)."""
        if cluster_autoscales():
            return
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        total = ray.cluster_resources()
        for resource, amount in self.resources_per_worker:
            needed = amount * self.num_workers
            if needed > total.get(resource, 0) + 1e-9:
                raise ValueError(
                    f"{self.num_workers} workers x {amount:g} {resource} = {needed:g} {resource}, but the Ray cluster "
                    f"has {total.get(resource, 0):g}. Lower num_workers or resources_per_worker"
                    + (", or set use_gpu=False" if resource == "GPU" else "") + " (or add nodes to the cluster).")
            if nodes and not any(node.get(resource, 0) >= amount for node in nodes):
                raise ValueError(f"No node of the Ray cluster has {amount:g} {resource} for one worker "
                                 f"(resources_per_worker={self.resources}). Lower it.")


def _register_exit_hook() -> None:
    import atexit

    atexit.register(shutdown_embedded_ray)


_register_exit_hook()
