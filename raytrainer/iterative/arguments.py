"""Which TrainingArguments IterativeSFTTrainer takes: its trainer actor runs TRL's step API in plain torch, not
transformers' training loop, so it accepts the fields below (the set the previous raytrainer loop implemented,
kept unchanged here) and refuses every other one set away from its default, so that nothing is silently ignored.
`raytrainer.Trainer` takes all of them (it runs transformers' own loop)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.training_args import TrainingArguments

# The fields the iterative trainer accepts.
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
SUPPORTED_REPORT_TO = frozenset({"tensorboard"})
SUPPORTED_SAMPLING = frozenset({"random", "sequential"})
SUPPORTED_DDP_BACKENDS = frozenset({None, "gloo", "nccl"})


def _is_default(value: Any, default: Any) -> bool:
    """Compare with a dataclass default the way __post_init__ normalises it ("" -> [], str -> enum)."""
    if value == default or (not value and not default):
        return True
    return getattr(value, "value", value) == getattr(default, "value", default)


def check_iterative_arguments(args: Any) -> None:
    """Raise ValueError for any argument set to a value the iterative SFT trainer does not implement."""
    unsupported = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name in HONOURED_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        if not _is_default(value, default):
            unsupported.append(f"{f.name}={value!r}")
    if unsupported:
        raise ValueError(
            "IterativeSFTTrainer does not implement these TrainingArguments, and will not silently ignore them: "
            + ", ".join(unsupported) + ". Remove them (leave them at their defaults), or train with raytrainer.Trainer."
        )
    unknown_reports = [r for r in (args.report_to or []) if r not in SUPPORTED_REPORT_TO]
    if unknown_reports:
        raise ValueError(f"report_to={args.report_to!r}: IterativeSFTTrainer supports {sorted(SUPPORTED_REPORT_TO)} "
                         "(or 'none'). Remove the others.")
    if str(args.train_sampling_strategy) not in SUPPORTED_SAMPLING:
        raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} is not implemented: use "
                         f"one of {sorted(SUPPORTED_SAMPLING)}.")
    if args.ddp_backend not in SUPPORTED_DDP_BACKENDS:
        raise ValueError(f"ddp_backend={args.ddp_backend!r}: raytrainer runs DDP on 'gloo' (CPU) or 'nccl' (GPU).")
    if args.include_num_input_tokens_seen not in (False, "no", True, "all", "non_padding"):
        raise ValueError(f"include_num_input_tokens_seen={args.include_num_input_tokens_seen!r} is not supported.")
