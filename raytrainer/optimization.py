"""Optimizer and learning-rate scheduler construction, exactly as transformers.Trainer builds them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer as _HFTrainer
from transformers import TrainingArguments
from transformers.optimization import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

# transformers.Trainer.get_decay_parameter_names: no weight decay on biases and norm layers.
_NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay (all but biases and normalisation weights)."""
    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_NAME_PATTERNS)


def create_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer transformers.Trainer would build for `model` and `args`.

    Args:
        model: the (unwrapped) model whose parameters are optimised.
        args: training arguments (`optim`, `learning_rate`, `weight_decay`, `adam_*`, `optim_args`).
        optimizer_cls_and_kwargs: an explicit `(optimizer_class, kwargs)` pair that replaces `args.optim`.
    """
    decay = set(decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
         "weight_decay": 0.0},
    ]
    if optimizer_cls_and_kwargs is not None:
        optimizer_cls, kwargs = optimizer_cls_and_kwargs
    else:
        optimizer_cls, kwargs = _HFTrainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    for key in ("params", "model", "optimizer_dict"):  # optimizers that bring their own parameter groups
        if key in kwargs:
            groups = kwargs.pop(key)
    return optimizer_cls(groups, **kwargs)


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Build `args.lr_scheduler_type` with warmup (steps or ratio) and `args.lr_scheduler_kwargs`."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def current_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    """The learning rate of the first parameter group, as transformers logs it."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return optimizer.param_groups[0]["lr"]
    last = scheduler.get_last_lr()[0]
    return last.item() if torch.is_tensor(last) else last
