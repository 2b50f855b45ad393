"""TrainingArguments: transformers' arguments plus the Ray side (workers, resources, failures, storage)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import transformers

# transformers.TrainingArguments fields whose meaning raytrainer implements. Any other field set to a
# non-default value is rejected by `check_supported_arguments`, so nothing is silently ignored.
HONOURED_FIELDS = frozenset(
    """
    output_dir per_device_train_batch_size per_device_eval_batch_size num_train_epochs max_steps
    learning_rate lr_scheduler_type lr_scheduler_kwargs warmup_steps optim optim_args weight_decay
    adam_beta1 adam_beta2 adam_epsilon gradient_accumulation_steps average_tokens_across_devices
    max_grad_norm label_smoothing_factor bf16 fp16 tf32 activation_checkpointing
    activation_checkpointing_kwargs gradient_checkpointing gradient_checkpointing_kwargs torch_compile
    torch_compile_backend torch_compile_mode torch_empty_cache_steps logging_strategy logging_steps
    logging_first_step log_on_each_node logging_nan_inf_filter include_num_input_tokens_seen log_level
    log_level_replica disable_tqdm report_to run_name project eval_strategy eval_steps eval_delay
    prediction_loss_only eval_on_start eval_do_concat_batches eval_accumulation_steps include_for_metrics
    save_only_model save_strategy save_steps save_total_limit load_best_model_at_end
    metric_for_best_model greater_is_better ignore_data_skip restore_callback_states_from_checkpoint
    full_determinism seed data_seed use_cpu dataloader_drop_last dataloader_num_workers
    dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor
    dataloader_multiprocessing_context remove_unused_columns label_names train_sampling_strategy
    length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph
    ddp_backend ddp_timeout skip_memory_metrics do_train do_eval do_predict resume_from_checkpoint
    local_rank hub_token hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision
    trackio_space_id trackio_bucket_id trackio_static_space_id accelerator_config eval_use_gather_object
    """.split()
)

SUPPORTED_REPORT_TO = frozenset({"tensorboard"})
SUPPORTED_SAMPLING = frozenset({"random", "sequential"})
SUPPORTED_DDP_BACKENDS = frozenset({None, "gloo", "nccl"})
RAY_FIELDS = ("num_workers", "use_gpu", "resources_per_worker", "placement_strategy", "max_failures",
              "storage_path", "ray_address", "worker_idle_timeout")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
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
            only a pointer to them (in `~/ray_results`).
        ray_address: the Ray cluster to use. `None`: `RAY_ADDRESS`, the job's cluster, or an embedded local Ray.
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
        super().__post_init__()
        check_ray_fields(self)


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


def ray_settings(args: transformers.TrainingArguments) -> dict[str, Any]:
    """The Ray fields of `args`, with defaults when a plain transformers.TrainingArguments is given."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in RAY_FIELDS}
    return {name: getattr(args, name, default) for name, default in defaults.items()}


def _is_default(value: Any, default: Any) -> bool:
    """Compare with a dataclass default the way __post_init__ normalises it ("" -> [], str -> enum)."""
    if value == default or (not value and not default):
        return True
    return getattr(value, "value", value) == getattr(default, "value", default)


def check_supported_arguments(args: transformers.TrainingArguments) -> None:
    """Raise ValueError for any argument set to a value raytrainer does not implement."""
    unsupported = []
    for f in dataclasses.fields(transformers.TrainingArguments):
        if not f.init or f.name in HONOURED_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        if not _is_default(value, default):
            unsupported.append(f"{f.name}={value!r}")
    if unsupported:
        raise ValueError(
            "raytrainer does not implement these TrainingArguments, and will not silently ignore them: "
            + ", ".join(unsupported) + ". Remove them (leave them at their defaults) or use transformers.Trainer."
        )
    unknown_reports = [r for r in (args.report_to or []) if r not in SUPPORTED_REPORT_TO]
    if unknown_reports:
        raise ValueError(f"report_to={args.report_to!r}: raytrainer supports {sorted(SUPPORTED_REPORT_TO)} "
                         "(or 'none'). Remove the others.")
    if str(args.train_sampling_strategy) not in SUPPORTED_SAMPLING:
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} is not implemented: use "
                         f"one of {sorted(SUPPORTED_SAMPLING)}.")
    if args.ddp_backend not in SUPPORTED_DDP_BACKENDS:
        raise ValueError(f"ddp_backend={args.ddp_backend!r}: raytrainer runs DDP on 'gloo' (CPU) or 'nccl' (GPU).")
    if args.include_num_input_tokens_seen not in (False, "no", True, "all", "non_padding"):
        raise ValueError(f"include_num_input_tokens_seen={args.include_num_input_tokens_seen!r} is not supported.")
    check_ray_fields(args) if hasattr(args, "num_workers") else None
