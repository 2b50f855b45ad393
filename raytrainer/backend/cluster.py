"""Which Ray to use, and what a worker group asks of it: connect (or start the embedded Ray), size the workers,
and refuse on the driver what the cluster can never run."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ray

from raytrainer.arguments import ray_settings

_embedded = {"started": False}


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray once per driver: `address`, RAY_ADDRESS / the job's cluster, a running local cluster,
    or else an embedded local Ray sized to this machine. Never starts a second local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    options = {"ignore_reinit_error": True, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **options)
        return
    # No address: ray.init() joins the cluster `ray start` recorded on this machine, else starts an embedded one.
    # Not address="auto": that also attaches to any other program's embedded Ray that `ps` finds.
    from ray._private.services import canonicalize_bootstrap_address

    starts_embedded = canonicalize_bootstrap_address(None) is None
    ray.init(**options)
    _embedded["started"] = starts_embedded


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
