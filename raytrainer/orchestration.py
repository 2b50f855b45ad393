"""The only place that wires Ray Train: Ray start-up, scaling, run/failure config, reporting, results.

`run_on_workers` runs one Command (train/evaluate/predict) of a TrainingJob on a Ray Train V2 `TorchTrainer`:
every worker runs `raytrainer.loop.WorkerTrainer`; rank 0 streams logs and progress to the driver through a small
event actor and hands back the result (weights as numpy arrays, trainer state, outputs) at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raytrainer.arguments import ray_settings
from raytrainer.data import ArrowPayload, from_arrow_payload
from raytrainer.job import Command, TrainingJob

logger = logging.getLogger(__name__)

_EMBEDDED = {"started": False}


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
    _EMBEDDED["started"] = starts_embedded


# ---------------------------------------------------------------------------------------------- events
@ray.remote(num_cpus=0)
class EventChannel:
    """Rank 0 pushes logs, progress and the final result; the driver drains them."""

    def __init__(self):
        self.events: list = []

    def push(self, event: tuple) -> None:
        self.events.append(event)

    def drain(self) -> list:
        events, self.events = self.events, []
        return events


class RayReporter:
    """The worker loop's Reporter, implemented with Ray Train reports and the event channel."""

    def __init__(self, channel, rank: int, persist_checkpoints: bool):
        self.channel, self.rank = channel, rank
        self.persist_checkpoints = persist_checkpoints
        self.last_progress = 0.0

    def log(self, entry: dict, state) -> None:
        self.channel.push.remote(("log", entry))

    def progress(self, global_step: int, max_steps: int) -> None:
        now = time.monotonic()
        if now - self.last_progress > 0.2 or global_step >= max_steps:
            self.last_progress = now
            self.channel.push.remote(("progress", global_step, max_steps))

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.rank == 0 else None
        if checkpoint is None or self.persist_checkpoints:
            name = os.path.basename(checkpoint_dir) if checkpoint is not None else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             delete_local_checkpoint_after_upload=False)
        else:  # no storage_path: the checkpoint in output_dir is the record; Ray stores a pointer to it
            ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False,
                             checkpoint_upload_fn=_store_pointer)

    def latest_checkpoint(self) -> str | None:
        """The checkpoint Ray Train restored after a worker-group restart (None on a first attempt)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            pointer = os.path.join(folder, POINTER_NAME)
            if os.path.isfile(pointer):
                with open(pointer) as file:
                    return json.load(file)["path"]
        return checkpoint.to_directory()


POINTER_NAME = "raytrainer_checkpoint_pointer.json"


def _store_pointer(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
    """Register a local checkpoint with Ray Train without copying it: store only its path."""
    storage = ray.train.get_context().get_storage()
    destination = os.path.join(storage.experiment_fs_path, dir_name)
    storage.storage_filesystem.create_dir(destination)
    with storage.storage_filesystem.open_output_stream(os.path.join(destination, POINTER_NAME)) as stream:
        stream.write(json.dumps({"path": os.path.abspath(checkpoint.path)}).encode())
    return Checkpoint(path=destination, filesystem=storage.storage_filesystem)


# ---------------------------------------------------------------------------------------------- workers
def _materialize(dataset: Any, name: str) -> Any:
    if isinstance(dataset, ArrowPayload):
        table = ray.get(dataset.table) if isinstance(dataset.table, ray.ObjectRef) else dataset.table
        return from_arrow_payload(dataset, table)
    if isinstance(dataset, RayDataMarker):
        return RayDataShard(ray.train.get_dataset_shard(dataset.name))
    if isinstance(dataset, dict):
        return {key: _materialize(value, f"{name}_{key}") for key, value in dataset.items()}
    return dataset


@dataclasses.dataclass
class RayDataMarker:
    """Stands for a `ray.data.Dataset` passed to TorchTrainer(datasets=...); each worker streams its shard."""

    name: str


class RayDataShard(torch.utils.data.IterableDataset):
    """A worker's shard of a Ray Data stream, read row by row (the collator batches it)."""

    is_presharded = True

    def __init__(self, shard):
        self.shard = shard

    def __iter__(self):
        yield from self.shard.iter_rows()


def _set_thread_share(context: Any, driver_threads: str | None) -> None:
    """Torch threads: the driver's OMP_NUM_THREADS when the user set one, else this worker's share of the
    node's cores (Ray leaves workers at 1 thread)."""
    if driver_threads and driver_threads.isdigit() and int(driver_threads) > 0:
        torch.set_num_threads(int(driver_threads))
        return
    cores = os.cpu_count() or 1
    local_world = max(1, context.get_local_world_size())
    torch.set_num_threads(max(1, cores // local_world))


def worker_main(config: dict) -> None:
    """The Ray Train worker function: run one Command of the job, send rank 0's result to the driver."""
    from raytrainer.distributed import WorkerContext
    from raytrainer.loop import WorkerTrainer
    from raytrainer.results import pack_result
    from raytrainer.worker_logs import tag_worker_output

    train_context = ray.train.get_context()
    rank = train_context.get_world_rank()
    tag_worker_output(rank)
    _set_thread_share(train_context, config.get("driver_threads"))
    job: TrainingJob = ray.get(config["job"])
    if job.working_dir and os.path.isdir(job.working_dir):
        os.chdir(job.working_dir)
    job.train_dataset = _materialize(job.train_dataset, "train")
    job.eval_dataset = _materialize(job.eval_dataset, "eval")
    command: Command = config["command"]
    command.kwargs = {k: _materialize(v, k) for k, v in command.kwargs.items()}
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (gather_object, barriers) use the current device
    context = WorkerContext(rank=rank, world_size=train_context.get_world_size(),
                            local_rank=train_context.get_local_rank(), device=device)
    if rank != 0:
        _quiet_replica(job.args)
    reporter = RayReporter(config["channel"], rank, config["persist_checkpoints"])
    worker = WorkerTrainer(job, context, reporter)
    output = getattr(worker, command.name)(**command.kwargs)
    if rank == 0:
        ray.get(config["channel"].push.remote(("result", pack_result(command.name, worker, output))))


def _quiet_replica(args: Any) -> None:
    import transformers

    level = args.get_process_log_level() if hasattr(args, "get_process_log_level") else logging.WARNING
    transformers.logging.set_verbosity(min(level, logging.WARNING) if args.log_level_replica != "passive"
                                       else logging.WARNING)


# ---------------------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class WorkerGroupSpec:
    """How many workers, on what, with which failure and storage settings."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict
    placement_strategy: str
    max_failures: int
    storage_path: str | None
    backend: str
    timeout_s: int

    @classmethod
    def of(cls, args: Any) -> "WorkerGroupSpec":
        ray_args = ray_settings(args)
        use_gpu = ray_args["use_gpu"]
        if args.use_cpu:
            use_gpu = False
        elif use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        resources = dict(ray_args["resources_per_worker"] or {"CPU": 1})
        if use_gpu:
            resources.setdefault("GPU", 1)
        backend = args.ddp_backend or ("nccl" if use_gpu else "gloo")
        return cls(num_workers=ray_args["num_workers"], use_gpu=bool(use_gpu), resources_per_worker=resources,
                   placement_strategy=ray_args["placement_strategy"], max_failures=ray_args["max_failures"],
                   storage_path=ray_args["storage_path"], backend=backend, timeout_s=int(args.ddp_timeout or 1800))

    def check_fits_cluster(self) -> None:
        """Raise when the cluster can never run this group (instead of waiting forever for resources)."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        for resource, amount in self.resources_per_worker.items():
            needed = amount * self.num_workers
            if needed > total.get(resource, 0) + 1e-9 and not _cluster_autoscales():
                raise ValueError(
                    f"{self.num_workers} workers x {amount} {resource} = {needed:g} {resource}, but the Ray cluster "
                    f"has {total.get(resource, 0):g}. Lower num_workers or resources_per_worker"
                    + (", or set use_gpu=False" if resource == "GPU" else "")
                    + " (or add nodes to the cluster).")
            if nodes and not any(node.get(resource, 0) >= amount for node in nodes) and not _cluster_autoscales():
                raise ValueError(f"No node of the Ray cluster has {amount:g} {resource} for one worker "
                                 f"(resources_per_worker={self.resources_per_worker}). Lower it.")


def _cluster_autoscales() -> bool:
    """Whether the cluster was started by the cluster launcher with an autoscaler (it may grow)."""
    return bool(os.environ.get("RAYTRAINER_CLUSTER_AUTOSCALES"))


def put_datasets(value: Any, cache: dict) -> Any:
    """Replace Arrow tables by object-store references, putting each table once per driver (cached)."""
    if isinstance(value, ArrowPayload):
        key = id(value.table)
        if key not in cache:
            cache[key] = (value.table, ray.put(value.table))
        return dataclasses.replace(value, table=cache[key][1])
    if isinstance(value, dict):
        return {k: put_datasets(v, cache) for k, v in value.items()}
    return value


def put_job(job: TrainingJob) -> ray.ObjectRef:
    """Put the job in the object store once; name the component that cannot be serialized, if any."""
    try:
        return ray.put(job)
    except Exception as error:  # noqa: BLE001 - diagnose below, then re-raise with the culprit's name
        from raytrainer.serialization import check_picklable

        check_picklable({f.name: getattr(job, f.name) for f in dataclasses.fields(job)})
        raise TypeError(f"The training job cannot be serialized to send it to the Ray workers: {error}") from error


def run_on_workers(job: TrainingJob, command: Command, ray_datasets: dict | None = None,
                   on_event: Callable[[tuple], None] = lambda event: None,
                   run_callbacks: list | None = None, run_name: str | None = None) -> Any:
    """Run `command` on a fresh Ray Train worker group; return rank 0's packed result."""
    args = job.args
    ensure_ray(ray_settings(args)["ray_address"])
    spec = WorkerGroupSpec.of(args)
    spec.check_fits_cluster()
    job_ref = put_job(job)
    channel = EventChannel.remote()
    config = {"job": job_ref, "command": command, "channel": channel,
              "persist_checkpoints": spec.storage_path is not None,
              "driver_threads": os.environ.get("OMP_NUM_THREADS")}
    run_config = RunConfig(
        name=run_name or f"raytrainer-{command.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        storage_path=spec.storage_path,
        failure_config=FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=(args.save_total_limit if spec.storage_path is not None else None)),
        callbacks=run_callbacks or None,
    )
    trainer = TorchTrainer(
        worker_main, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker=spec.resources_per_worker,
                                     placement_strategy=spec.placement_strategy),
        torch_config=TorchConfig(backend=spec.backend, timeout_s=spec.timeout_s),
        run_config=run_config, datasets=ray_datasets or None)
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised on the driver's main thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="raytrainer-fit", daemon=True)
    thread.start()
    packed = None
    try:
        while True:
            finished = not thread.is_alive()
            for event in ray.get(channel.drain.remote()):
                if event[0] == "result":
                    packed = event[1]
                else:
                    on_event(event)
            if finished:
                break
            thread.join(timeout=0.2)
    finally:
        ray.kill(channel)
    if "error" in outcome:
        raise WorkerError.from_ray(outcome["error"]) from outcome["error"]
    if packed is None:
        raise RuntimeError("The Ray Train workers finished without sending a result; see the worker logs above.")
    return packed


class WorkerError(RuntimeError):
    """A failure inside the Ray Train workers, with the worker's own error message first."""

    @classmethod
    def from_ray(cls, error: BaseException) -> BaseException:
        if isinstance(error, KeyboardInterrupt):
            return error
        cause = error
        for attribute in ("worker_failures", "errors"):
            failures = getattr(error, attribute, None)
            if failures:
                cause = next(iter(failures.values())) if isinstance(failures, dict) else failures[0]
                break
        text = str(cause).strip()
        return cls(f"Training failed on the Ray Train workers: {text}")


def is_embedded_ray() -> bool:
    return _EMBEDDED["started"]


def shutdown_embedded_ray() -> None:
    if _EMBEDDED["started"] and ray.is_initialized():
        ray.shutdown()
        _EMBEDDED["started"] = False


def _register_exit_hook() -> None:
    import atexit

    atexit.register(shutdown_embedded_ray)


_register_exit_hook()
del sys
