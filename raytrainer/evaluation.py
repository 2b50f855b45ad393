"""Distributed evaluate/predict on the workers, gathered back in dataset order (transformers' evaluation_loop).

Each worker evaluates its dealt batches; rank 0 gathers them, interleaves them back into dataset order and drops
the samples that were repeated to even out the last round, so results have exactly one row per example.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from transformers.trainer_pt_utils import nested_concat, nested_numpify, nested_truncate
from transformers.trainer_utils import EvalPrediction, denumpify_detensorize, speed_metrics

from raytrainer.data import batch_size_of, eval_dataloader, has_length, move_to_device
from raytrainer.distributed import WorkerContext, all_reduce_sum, broadcast_from_main, gather_to_main
from raytrainer.modeling import LossComputer


@dataclass
class EvaluationOutput:
    """What one evaluation/prediction pass produced (predictions only on rank 0)."""

    metrics: dict[str, float]
    predictions: Any = None
    label_ids: Any = None
    num_samples: int = 0


@dataclass
class EvaluationSetup:
    """Everything evaluation needs besides the model and the data."""

    args: Any
    context: WorkerContext
    loss_computer: LossComputer
    collator: Callable
    compute_metrics: Callable | None
    preprocess_logits_for_metrics: Callable | None
    main_input_name: str = "input_ids"


def _concat(parts: list, do_concat: bool):
    """Concatenate per-batch arrays (padding ragged sequence dims with -100), or keep them as a list."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if not do_concat:
        return parts
    result = parts[0]
    for part in parts[1:]:
        result = nested_concat(result, part, padding_index=-100)
    return result


def _in_dataset_order(per_rank: list[list], world_size: int) -> list:
    """Interleave each rank's list of batches back into the order the batches were dealt."""
    ordered = []
    for step in range(max(len(batches) for batches in per_rank)):
        for rank in range(world_size):
            if step < len(per_rank[rank]):
                ordered.append(per_rank[rank][step])
    return ordered


def evaluation_loop(model: torch.nn.Module, dataset: Any, setup: EvaluationSetup, prediction_loss_only: bool,
                    ignore_keys: list[str] | None, metric_key_prefix: str,
                    on_prediction_step: Callable[[], None] = lambda: None) -> EvaluationOutput:
    """Evaluate `model` on `dataset` on every worker; metrics on every worker, predictions on rank 0."""
    args, context = setup.args, setup.context
    start_time = time.time()
    loader = eval_dataloader(dataset, setup.collator, args, context)
    model.eval()
    batch_size = args.per_device_eval_batch_size
    include_inputs = "inputs" in (args.include_for_metrics or [])
    rows = []  # per batch: (losses, logits, labels, inputs) as numpy
    observed = 0
    for inputs in loader:
        observed += batch_size_of(inputs) or 0
        inputs = move_to_device(inputs, context.device)
        loss, logits, labels = setup.loss_computer.prediction_step(
            model, inputs, prediction_loss_only, ignore_keys, lambda n: all_reduce_sum(n, context))
        if logits is not None and setup.preprocess_logits_for_metrics is not None:
            logits = setup.preprocess_logits_for_metrics(logits, labels)
        rows.append(tuple(nested_numpify(x) if x is not None else None for x in (
            loss.repeat(batch_size) if loss is not None else None,
            logits, labels,
            inputs[setup.main_input_name] if include_inputs else None,
        )))
        on_prediction_step()
    gathered = gather_to_main(rows, context)
    output = EvaluationOutput(metrics={})
    if context.is_main:
        output = _assemble(gathered, setup, dataset, observed * context.world_size, metric_key_prefix)
    metrics = broadcast_from_main(output.metrics, context)
    num_samples = broadcast_from_main(output.num_samples, context)
    total_batch_size = args.per_device_eval_batch_size * context.world_size
    metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=num_samples,
                                 num_steps=math.ceil(num_samples / total_batch_size)))
    output.metrics, output.num_samples = metrics, num_samples
    return output


def _assemble(gathered: list[list], setup: EvaluationSetup, dataset: Any, observed: int,
              prefix: str) -> EvaluationOutput:
    """On rank 0: order, truncate and score the gathered batches."""
    args = setup.args
    num_samples = len(dataset) if has_length(dataset) else observed
    ordered = _in_dataset_order(gathered, setup.context.world_size)
    do_concat = args.eval_do_concat_batches
    losses, preds, labels, inputs = (_concat([row[i] for row in ordered], True if i == 0 else do_concat)
                                     for i in range(4))
    if do_concat:
        preds, labels, inputs = (nested_truncate(x, num_samples) if x is not None else None
                                 for x in (preds, labels, inputs))
    metrics: dict[str, Any] = {}
    if setup.compute_metrics is not None and preds is not None and labels is not None:
        include = args.include_for_metrics or []
        extra = {"losses": losses[:num_samples] if "loss" in include and losses is not None else None,
                 "inputs": inputs if "inputs" in include else None}
        metrics = setup.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels, **extra))
    metrics = denumpify_detensorize(metrics or {})
    if losses is not None:
        losses = losses[:num_samples]
        finite = np.isfinite(losses)
        if args.logging_nan_inf_filter and finite.any():
            losses = losses[finite]
        metrics[f"{prefix}_loss"] = losses.mean().item()
    metrics = {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}
    return EvaluationOutput(metrics=metrics, predictions=preds, label_ids=labels, num_samples=num_samples)
