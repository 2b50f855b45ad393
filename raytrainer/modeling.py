"""How a model's loss and predictions are computed — transformers.Trainer's compute_loss/prediction_step."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import LabelSmoother, nested_detach
from transformers.utils.generic import can_return_loss, find_labels


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


@dataclass(frozen=True)
class ModelTraits:
    """What transformers.Trainer infers from the model class and arguments to compute the loss."""

    accepts_loss_kwargs: bool
    label_names: tuple[str, ...]
    can_return_loss: bool
    loss_shifts_labels: bool
    is_causal_lm: bool
    label_smoothing: float

    @classmethod
    def of(cls, model: nn.Module, args: Any) -> "ModelTraits":
        model = unwrap(model)
        if hasattr(model, "accepts_loss_kwargs"):
            accepts = bool(model.accepts_loss_kwargs)
        else:
            params = inspect.signature(model.forward).parameters.values()
            accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        label_names = args.label_names if args.label_names is not None else find_labels(model.__class__)
        config = getattr(model, "config", None)
        shifts = (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
                  and not getattr(config, "is_encoder_decoder", False))
        smoothing = args.label_smoothing_factor
        if smoothing and getattr(config, "problem_type", None) == "multi_label_classification":
            smoothing = 0.0
        return cls(accepts_loss_kwargs=accepts, label_names=tuple(label_names),
                   can_return_loss=can_return_loss(model.__class__), loss_shifts_labels=shifts,
                   is_causal_lm=model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
                   label_smoothing=smoothing)


class LossComputer:
    """Computes a batch's loss exactly as transformers.Trainer.compute_loss does."""

    def __init__(self, traits: ModelTraits, compute_loss_func: Callable | None, world_size: int,
                 average_tokens_across_devices: bool, autocast: Callable[[], contextlib.AbstractContextManager]):
        self.traits = traits
        self.compute_loss_func = compute_loss_func
        self.world_size = world_size
        self.average_tokens_across_devices = average_tokens_across_devices
        self.autocast = autocast
        self.label_smoother = LabelSmoother(epsilon=traits.label_smoothing) if traits.label_smoothing else None

    @property
    def counts_items(self) -> bool:
        """Whether the loss is normalised by the number of label items of the whole accumulated batch."""
        return self.traits.accepts_loss_kwargs or self.compute_loss_func is not None

    def num_items(self, batches: list[dict]) -> torch.Tensor | None:
        """Label tokens (not -100) in these micro-batches of this worker (transformers' num_items_in_batch)."""
        if not batches or not self.counts_items or "labels" not in batches[0]:
            return None
        try:
            labels = [b["shift_labels"] if "shift_labels" in b
                      else b["labels"][..., 1:] if self.traits.loss_shifts_labels else b["labels"]
                      for b in batches]
            return sum(label.ne(-100).sum() for label in labels)
        except (TypeError, AttributeError):
            return None

    def __call__(self, model: nn.Module, inputs: dict, num_items_in_batch=None, return_outputs: bool = False):
        if (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
        else:
            labels = None
        if self.traits.accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        with self.autocast():
            outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            loss = self.label_smoother(outputs, labels, shift_labels=self.traits.is_causal_lm,
                                       num_items_in_batch=num_items_in_batch)
        else:
            if isinstance(outputs, dict) and "loss" not in outputs:
                raise ValueError(
                    f"The model did not return a loss from the inputs, only the keys {','.join(outputs.keys())}. "
                    f"Its inputs were {','.join(inputs.keys())}: pass labels (see label_names) or a compute_loss_func."
                )
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if self.average_tokens_across_devices and self.counts_items and num_items_in_batch is not None:
            loss = loss * self.world_size  # DDP averages gradients over workers; the loss was divided globally
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool,
                        ignore_keys: list[str] | None, sum_over_workers: Callable = lambda count: count):
        """(loss, logits, labels) of one evaluation batch, as transformers.Trainer.prediction_step.

        `sum_over_workers` turns this worker's label count into the group's (all workers evaluate in step).
        """
        names = list(self.traits.label_names)
        has_labels = bool(names) and all(inputs.get(k) is not None for k in names)
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = self.traits.can_return_loss
        loss_without_labels = not names and return_loss
        if ignore_keys is None:
            config = getattr(unwrap(model), "config", None)
            ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config is not None else []
        labels = None
        if has_labels or loss_without_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in names))
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad():
            if has_labels or loss_without_labels:
                num_items = self.num_items([inputs])
                if num_items is not None and self.average_tokens_across_devices:
                    num_items = sum_over_workers(num_items)
                loss, outputs = self(model, inputs, num_items_in_batch=num_items, return_outputs=True)
                loss = loss.detach().mean()
                logits = (tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"])
                          if isinstance(outputs, dict) else outputs[1:])
            else:
                loss = None
                with self.autocast():
                    outputs = model(**inputs)
                logits = (tuple(v for k, v in outputs.items() if k not in ignore_keys)
                          if isinstance(outputs, dict) else outputs)
        if prediction_loss_only:
            return loss, None, None
        logits = nested_detach(logits)
        if len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels
