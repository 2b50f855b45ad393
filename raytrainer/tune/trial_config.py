"""What a trial's results carry and how its hyperparameters become its TrainingArguments (driver, trial actor and
worker all use these; nothing here imports torch)."""

from __future__ import annotations

import copy
import dataclasses
import json
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


def finished_run(folder: str) -> bool:
    """Whether the transformers checkpoint in `folder` ends its run (`global_step >= max_steps` in its
    trainer_state.json). PBT pauses a trial at its last evaluation too, and may restore it from such a checkpoint
    (its own or a donor's): nothing is left to train then, and transformers, resumed there, would train a step past
    `max_steps` (and evaluate), so that PBT restores it again, one step at a time."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):  # not a local transformers checkpoint (a URI): the workers resume it as before
        return False
    with open(path) as file:
        state = json.load(file)
    max_steps = state.get("max_steps") or 0
    return max_steps > 0 and (state.get("global_step") or 0) >= max_steps
