"""Checkpoints in the transformers layout: atomic save, safe load, rotation.

A checkpoint is written to a temporary sibling folder and renamed into place only when complete, so a crash
never leaves a partial `checkpoint-<step>` that looks valid. Loading never unpickles arbitrary objects:
weights come from safetensors and the rest from `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, TrainerState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.bin"

__all__ = ["save_model", "load_model_weights", "save_checkpoint", "load_training_state", "load_rng_state",
           "get_last_checkpoint", "rotate_checkpoints", "checkpoint_dir", "PREFIX_CHECKPOINT_DIR"]


def checkpoint_dir(output_dir: str, global_step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def save_model(model: nn.Module, output_dir: str, processing_class: Any = None, args: Any = None) -> None:
    """Write a folder that `AutoModel*.from_pretrained` (or `load_model_weights`) loads."""
    os.makedirs(output_dir, exist_ok=True)
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(output_dir)
    else:
        safetensors.torch.save_model(model, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    if args is not None:  # transformers' layout; informational only, raytrainer never loads it
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def load_model_weights(model: nn.Module, folder: str) -> None:
    """Load weights saved by `save_model` (single or sharded safetensors) into `model`, strictly."""
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(single):
        missing, unexpected = safetensors.torch.load_model(model, single, strict=False)
    else:
        index_file = os.path.join(folder, "model.safetensors.index.json")
        if not os.path.isfile(index_file):
            raise FileNotFoundError(f"No {WEIGHTS_NAME} (or sharded index) in {folder}: not a model folder.")
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(model, folder, strict=True)
        return
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"Weights in {folder} do not match the model: missing {missing}, unexpected {unexpected}.")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def save_checkpoint(folder: str, *, model: nn.Module | None, optimizer: Any, scheduler: Any, scaler: Any,
                    state: TrainerState, args: Any, rank: int, world_size: int,
                    processing_class: Any = None) -> None:
    """Write this worker's part of a checkpoint into the temporary `folder` (see `publish_checkpoint`).

    Rank 0 writes the model, optimizer, scheduler and trainer state; every rank writes its RNG state.
    """
    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        save_model(model, folder, processing_class, args)
        if not args.save_only_model:
            torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_NAME))
            torch.save(scheduler.state_dict(), os.path.join(folder, SCHEDULER_NAME))
            if scaler is not None:
                torch.save(scaler.state_dict(), os.path.join(folder, SCALER_NAME))
        state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
    if not args.save_only_model:
        name = "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth"
        torch.save(rng_state(), os.path.join(folder, name))


def temporary_dir(final_dir: str) -> str:
    head, tail = os.path.split(final_dir)
    return os.path.join(head, f".tmp-{tail}")


def publish_checkpoint(tmp_dir: str, final_dir: str) -> None:
    """Atomically move a finished checkpoint into place (replacing an older one of the same step)."""
    with open(os.path.join(tmp_dir, ".complete"), "w") as marker:
        json.dump({"complete": True}, marker)
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def load_training_state(folder: str, optimizer: Any, scheduler: Any, scaler: Any, device: torch.device) -> None:
    """Restore optimizer, scheduler and grad-scaler states from a checkpoint (weights_only loads)."""
    with safe_globals():
        optimizer_file = os.path.join(folder, OPTIMIZER_NAME)
        if os.path.isfile(optimizer_file):
            optimizer.load_state_dict(torch.load(optimizer_file, map_location=device, weights_only=True))
        scheduler_file = os.path.join(folder, SCHEDULER_NAME)
        if os.path.isfile(scheduler_file):
            scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        scaler_file = os.path.join(folder, SCALER_NAME)
        if scaler is not None and os.path.isfile(scaler_file):
            scaler.load_state_dict(torch.load(scaler_file, weights_only=True))


def load_rng_state(folder: str, rank: int, world_size: int) -> bool:
    """Restore this worker's Python/NumPy/torch RNG states; False when the checkpoint has none."""
    path = os.path.join(folder, "rng_state.pth" if world_size == 1 else f"rng_state_{rank}.pth")
    if not os.path.isfile(path):
        return False
    with safe_globals():
        state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state(state["cuda"])
    return True


def load_trainer_state(folder: str) -> TrainerState:
    return TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE_NAME))


def is_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))
