"""The job a driver hands to its workers: every component of a Trainer, in one picklable record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class TrainingJob:
    """The Trainer's components as the workers need them (no Ray, no driver-only state)."""

    args: Any
    model: Any = None
    model_init: Callable | None = None
    data_collator: Callable | None = None
    train_dataset: Any = None
    eval_dataset: Any = None
    processing_class: Any = None
    compute_loss_func: Callable | None = None
    compute_metrics: Callable | None = None
    callbacks: list = field(default_factory=list)
    optimizers: tuple = (None, None)
    optimizer_cls_and_kwargs: tuple | None = None
    preprocess_logits_for_metrics: Callable | None = None
    input_columns: list[str] | None = None  # None: keep every column (remove_unused_columns=False)
    trial: dict | None = None
    state: Any = None  # TrainerState of the driver (epoch, global step, log history) for evaluate/predict
    working_dir: str | None = None  # the driver's cwd, so relative output_dir means the same on workers


@dataclass
class Command:
    """One call the driver makes on the workers: train, evaluate or predict."""

    name: str  # "train" | "evaluate" | "predict"
    kwargs: dict = field(default_factory=dict)
