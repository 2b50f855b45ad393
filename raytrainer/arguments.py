"""TrainingArguments: transformers' arguments, every one meaning what it means there, plus the Ray side (workers,
resources, failures, storage)."""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from transformers import training_args

RAY_FIELDS = ("num_workers", "use_gpu", "resources_per_worker", "placement_strategy", "max_failures",
              "storage_path", "ray_address", "worker_idle_timeout")


@dataclass
class TrainingArguments(training_args.TrainingArguments):
    """`transformers.TrainingArguments` plus where and how the Ray Train workers run.

    Args:
        num_workers: number of Ray Train workers (DDP processes). `per_device_train_batch_size` is per worker,
            so the global batch is `num_workers * per_device_train_batch_size * gradient_accumulation_steps`.
        use_gpu: one GPU per worker. `None` uses GPUs when the cluster has them; `use_cpu=True` forces CPU.
        resources_per_worker: Ray resources for each worker, e.g. `{"CPU": 2}`; defaults to 1 CPU (+1 GPU).
        placement_strategy: Ray placement-group strategy for the workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD.
        max_failures: how many times Ray Train restarts the worker group after a failure; the run resumes
            from the latest checkpoint. -1 retries forever.
        storage_path: where Ray Train persists copies of the checkpoints (a shared filesystem or `s3://...`);
            set it for multi-node runs. By default the checkpoints stay in `output_dir` and Ray Train keeps
            only a pointer to them (in `~/ray_results`): a group restarted on other nodes after a lost node then
            resumes only where `output_dir` is shared by the nodes (else the restart fails, naming the checkpoint).
        ray_address: the Ray cluster to use: its head's GCS address (`host:port`, port 6379 by default), or
            `"auto"` (the `ray start` cluster of this machine). `None`: `RAY_ADDRESS`, the job's cluster, the
            `ray start` cluster of this machine, or an embedded local Ray. An address that does not answer or
            refuses this driver fails the Trainer's construction within seconds; Ray Client (`ray://`) is refused.
        worker_idle_timeout: seconds the Trainer keeps its worker group alive between calls (train, evaluate,
            predict reuse it). 0 releases the workers after every call. `trainer.close()`, a `with` block or the
            driver's exit release them at once.
    """

    num_workers: int = field(default=1, metadata={"help": "Number of Ray Train workers (DDP processes)."})
    use_gpu: bool | None = field(default=None, metadata={"help": "One GPU per worker; None: when available."})
    resources_per_worker: dict[str, float] | None = field(default=None, metadata={"help": "Ray resources per worker."})
    placement_strategy: str = field(default="PACK", metadata={"help": "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."})
    max_failures: int = field(default=0, metadata={"help": "Worker-group restarts after failures (-1: forever)."})
    storage_path: str | None = field(default=None, metadata={"help": "Ray Train checkpoint storage (path or s3://)."})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (else RAY_ADDRESS/local)."})
    worker_idle_timeout: float = field(default=300.0, metadata={"help": "Seconds idle workers stay warm (0: none)."})

    def __post_init__(self):
        with _device_checks_left_to_gpu_workers(self):
            try:
                super().__post_init__()
            except ValueError as error:
                if "support bf16/gpu" in str(error) and self.use_gpu is None:
                    raise ValueError(f"{error} (raytrainer: this driver has no GPU; to train bf16 on the Ray "
                                     "cluster's GPUs, set use_gpu=True: each GPU worker then checks bf16 itself.)") from error
                raise
        check_ray_fields(self)

    @property
    def world_size(self) -> int:
        """transformers' number of processes; while an `on_ray` arguments class is built on the driver (its
        `__post_init__`, `workers_world_size`), the number of workers that will run it."""
        return self.__dict__.get("_raytrainer_building_for") or super().world_size

    def __reduce_ex__(self, protocol):
        """An instance of a class `raytrainer.on_ray` made (not importable by its name) pickles as an instance of
        `on_ray(original class)`, so that plain pickle (`torch.save(args)`) writes and reads it."""
        reduced = super().__reduce_ex__(protocol)
        from raytrainer.subclasses import new_instance, original_of

        cls, original = type(self), original_of(type(self))
        if original is None or not isinstance(reduced, tuple) or reduced[0] is not copyreg.__newobj__ \
                or reduced[1] != (cls,):
            return reduced
        return (new_instance, (original,), *reduced[2:])


# transformers checks bf16 and TF32 support against the device of the process that builds the arguments. With
# use_gpu=True that device is not the driver's: a CPU head node (cluster.yaml's) drives GPU workers. The check is
# then left to each worker (backend/worker.py apply_process_settings checks and applies TF32 there).
_DEVICE_CHECKS = ("is_torch_bf16_gpu_available", "is_torch_tf32_available")


@contextlib.contextmanager
def _device_checks_left_to_gpu_workers(args: Any) -> Iterator[None]:
    import torch

    if args.use_gpu is not True or torch.cuda.is_available():
        yield
        return
    saved = {name: getattr(training_args, name) for name in _DEVICE_CHECKS}
    for name in _DEVICE_CHECKS:
        setattr(training_args, name, lambda: True)
    try:
        yield
    finally:
        for name, check in saved.items():
            setattr(training_args, name, check)


@contextlib.contextmanager
def workers_world_size(args: Any) -> Iterator[None]:
    """`args.world_size` is `args.num_workers` inside this block: for a `__post_init__` that derives fields from the
    world size. TRL's GRPOConfig and RLOOConfig derive `generation_batch_size` / `steps_per_generation` from it and
    check them against `num_generations`; built on the driver (one process, no process group) they would see 1,
    refuse valid settings and send the workers the batch sizes of a one-process run. The workers get the
    arguments unpickled, without `__post_init__`, so what is derived here is what they use."""
    workers = args.__dict__.get("num_workers")
    if not isinstance(workers, int) or workers < 1:  # check_ray_fields names it
        yield
        return
    args.__dict__["_raytrainer_building_for"] = workers
    try:
        yield
    finally:
        args.__dict__.pop("_raytrainer_building_for", None)


def check_ray_fields(args: Any) -> None:
    """Validate the Ray-side fields; raise ValueError naming the bad value and the fix."""
    if not isinstance(args.num_workers, int) or args.num_workers < 1:
        raise ValueError(f"num_workers={args.num_workers!r} is invalid: use a whole number >= 1.")
    if args.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"placement_strategy={args.placement_strategy!r} is invalid: use PACK, SPREAD, "
                         "STRICT_PACK or STRICT_SPREAD.")
    if not isinstance(args.max_failures, int) or args.max_failures < -1:
        raise ValueError(f"max_failures={args.max_failures!r} is invalid: use -1 (forever), 0 or a positive int.")
    if args.resources_per_worker is not None:
        if not isinstance(args.resources_per_worker, dict) or not all(
            isinstance(v, (int, float)) and v >= 0 for v in args.resources_per_worker.values()
        ):
            raise ValueError(f"resources_per_worker={args.resources_per_worker!r} is invalid: use a dict of "
                             "non-negative numbers such as {'CPU': 2, 'GPU': 1}.")
    timeout = args.worker_idle_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"worker_idle_timeout={timeout!r} is invalid: use seconds >= 0 (0 releases the workers "
                         "after every call).")
    if args.use_gpu and args.use_cpu:
        raise ValueError("use_gpu=True contradicts use_cpu=True: set only one of them.")


def ray_settings(args: training_args.TrainingArguments) -> dict[str, Any]:
    """The Ray fields of `args`, with defaults when a plain transformers.TrainingArguments is given."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in RAY_FIELDS}
    return {name: getattr(args, name, default) for name, default in defaults.items()}
