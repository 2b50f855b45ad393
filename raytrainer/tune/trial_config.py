"""What a trial's results carry and how its hyperparameters become its TrainingArguments (driver, trial actor and
worker all use these; nothing here imports torch)."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

OBJECTIVE = "objective"
CHECKPOINT_PATH = "checkpoint_path"  # the result key Ray's own Tune+Train integration uses


def apply_hyperparameters(args: Any, hyperparameters: dict[str, Any],
                          output_dir: str | None = None) -> Any:
    """A copy of `args` with the trial's values set, cast to each field's type as transformers does."""
    args = copy.deepcopy(args)
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    for key, value in hyperparameters.items():
        if key not in fields:
            raise ValueError(f"Hyperparameter {key!r} is not a {type(args).__name__} field; every key of the search "
                             "space must be one.")
        old = getattr(args, key)
        if old is not None and not isinstance(old, (list, dict)) and not isinstance(value, type(old)):
            value = type(old)(value)  # e.g. the default space's float seed -> int, as transformers does
        setattr(args, key, value)
    if output_dir is not None:
        args.output_dir = output_dir
        if hasattr(args, "logging_dir"):
            args.logging_dir = os.path.join(output_dir, "runs")
    return args
