"""What rank 0 sends back to the driver after a command, and how the driver applies it."""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

from transformers import TrainerState

from raytrainer.tensors import load_numpy_state_dict, state_dict_to_numpy


def state_to_dict(state: TrainerState) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(state), default=str))


def state_from_dict(values: dict) -> TrainerState:
    names = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in values.items() if k in names})


def pack_result(command: str, worker: Any, output: Any) -> dict:
    """Rank 0's result: the command's output, the trainer state and, after training, the weights."""
    result = {"command": command, "output": output, "state": state_to_dict(worker.state),
              "callbacks": _callback_states(worker.callback_handler.callbacks)}
    if command == "train":
        result["weights"] = state_dict_to_numpy(worker.model)
    return result


def _callback_states(callbacks: list) -> list:
    """Each callback's attributes (so the driver's callback objects see what happened on rank 0)."""
    states = []
    for callback in callbacks:
        try:
            pickle.dumps(callback.__dict__)
            states.append((type(callback).__name__, dict(callback.__dict__)))
        except Exception:  # an attribute that cannot travel: leave the driver's copy as it is
            states.append((type(callback).__name__, None))
    return states


def apply_callback_states(callbacks: list, states: list) -> None:
    """Copy rank 0's callback attributes onto the driver's callbacks of the same class, in order."""
    remaining = list(states)
    for callback in callbacks:
        for index, (name, attributes) in enumerate(remaining):
            if name == type(callback).__name__:
                if attributes is not None:
                    callback.__dict__.update(attributes)
                del remaining[index]
                break


def apply_weights(model: Any, result: dict) -> None:
    if "weights" in result:
        load_numpy_state_dict(model, result["weights"])
