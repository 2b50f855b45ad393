"""Ray Train on the worker side and the shared driver helpers: Ray start-up, scaling, reporting, data.

`run_command` runs one Command (train/evaluate/predict) of a TrainingJob inside a Ray Train worker with
`raytrainer.loop.WorkerTrainer`; rank 0 streams logs and progress to the driver through the group's command
channel and hands back the result (weights as numpy arrays, trainer state, outputs) at the end. The worker
group itself (one long-lived `TorchTrainer.fit()`) lives in `raytrainer.worker_group`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import Checkpoint

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


# ---------------------------------------------------------------------------------------------- reporting
class RayReporter:
    """The worker loop's Reporter, implemented with Ray Train reports and the group's command channel."""

    def __init__(self, channel, rank: int, persist_checkpoints: bool, command_seq: int,
                 on_report: Callable[[dict, str | None], None] | None = None, checkpoint_prefix: str = ""):
        self.channel, self.rank, self.command_seq = channel, rank, command_seq
        self.persist_checkpoints = persist_checkpoints
        self.on_report, self.checkpoint_prefix = on_report, checkpoint_prefix  # set for search trials
        self.last_progress = 0.0
        self.was_cancelled = False
        self.cancellation_answer = None

    def log(self, entry: dict, state) -> None:
        self.channel.push.remote(("log", entry))

    def progress(self, global_step: int, max_steps: int) -> None:
        now = time.monotonic()
        if now - self.last_progress > 0.2 or global_step >= max_steps:
            self.last_progress = now
            self.channel.push.remote(("progress", global_step, max_steps))
            self._poll_cancellation()

    def _poll_cancellation(self) -> None:
        """Ask the channel without waiting: the answer to the previous question is read at the next tick."""
        asked = self.cancellation_answer
        if asked is not None:
            ready, _ = ray.wait([asked], timeout=0)
            if not ready:
                return
            self.was_cancelled = ray.get(asked)
        self.cancellation_answer = self.channel.is_cancelled.remote(self.command_seq)

    def cancelled(self) -> bool:
        return self.was_cancelled

    @property
    def reports_to_ray_train(self) -> bool:
        """A search trial whose checkpoints stay in its own output_dir reports to Tune only (through `on_report`):
        a Ray Train report would record nothing new and costs an actor barrier plus a wait for the controller's
        next poll at every evaluation. Its restart point is kept by the channel instead (`latest_checkpoint`)."""
        return self.on_report is None or self.persist_checkpoints

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.rank == 0 else None
        location = os.path.abspath(checkpoint_dir) if checkpoint is not None else None
        if self.reports_to_ray_train:
            location = self._report_to_ray_train(metrics, checkpoint, checkpoint_dir) or location
        if checkpoint is not None:  # from now on a restart of this command resumes from this checkpoint
            ray.get(self.channel.note_checkpoint.remote(
                self.command_seq, None if self.reports_to_ray_train else location))
        if self.on_report is not None and self.rank == 0:
            self.on_report(metrics, location)

    def _report_to_ray_train(self, metrics: dict, checkpoint: Checkpoint | None, checkpoint_dir: str | None
                             ) -> str | None:
        """Report to Ray Train (every rank); the checkpoint's persisted location when storage_path copied it."""
        if checkpoint is None or self.persist_checkpoints:
            name = self.checkpoint_prefix + os.path.basename(checkpoint_dir) if checkpoint is not None else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             delete_local_checkpoint_after_upload=False)
            return _persisted_location(name) if checkpoint is not None else None
        # no storage_path: the checkpoint in output_dir is the record; Ray stores a pointer to it
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=_store_pointer)
        return None

    def latest_checkpoint(self) -> str | None:
        """After a worker-group restart, the checkpoint this command saved last: the one Ray Train restored (a
        warm group also holds the checkpoints of earlier commands), or a search trial's own; None on a first
        attempt."""
        noted = ray.get(self.channel.checkpoint_of.remote(self.command_seq))
        if noted is None:
            return None
        if not self.reports_to_ray_train:  # the same path on every rank, as Ray Train's pointer would give
            return noted
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


def _persisted_location(dir_name: str) -> str:
    """Where Ray Train persisted a reported checkpoint: a local path, or a URI (s3://, gs://, ...)."""
    storage = ray.train.get_context().get_storage()
    path = os.path.join(storage.experiment_fs_path, dir_name)
    kind = storage.storage_filesystem.type_name
    return path if kind == "local" else f"{kind}://{path}"


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


def prepare_worker(config: dict) -> int:
    """Once per worker process: rank-tagged output and the torch thread share. Returns the world rank."""
    from raytrainer.worker_logs import tag_worker_output

    train_context = ray.train.get_context()
    rank = train_context.get_world_rank()
    tag_worker_output(rank)
    _set_thread_share(train_context, config.get("driver_threads"))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (gather_object, barriers) use the current device
    return rank


def run_command(job: TrainingJob, command: Command, seq: int, channel: Any, rank: int, config: dict,
                reporting: dict | None = None) -> None:
    """Run one Command of a job on this worker; rank 0 hands the result to the channel. `reporting` (search
    trials) holds the RayReporter's `on_report` and `checkpoint_prefix`; a trial's result stays on the worker."""
    from raytrainer.distributed import WorkerContext
    from raytrainer.loop import WorkerTrainer
    from raytrainer.results import pack_result

    train_context = ray.train.get_context()
    if job.working_dir and os.path.isdir(job.working_dir):
        os.chdir(job.working_dir)
    job.train_dataset = _materialize(job.train_dataset, "train")
    job.eval_dataset = _materialize(job.eval_dataset, "eval")
    kwargs = {k: _materialize(v, k) for k, v in command.kwargs.items()}
    context = WorkerContext(rank=rank, world_size=train_context.get_world_size(),
                            local_rank=train_context.get_local_rank(), device=ray.train.torch.get_device())
    if rank != 0:
        _quiet_replica(job.args)
    reporter = RayReporter(channel, rank, config["persist_checkpoints"], seq, **(reporting or {}))
    worker = WorkerTrainer(job, context, reporter)
    output = getattr(worker, command.name)(**kwargs)
    if rank == 0:  # by reference: the channel's process never unpickles (imports) what the result holds
        packed = pack_result(command.name, worker, output) if reporting is None else None
        ray.get(channel.finish.remote(seq, [ray.put(packed)]))


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
