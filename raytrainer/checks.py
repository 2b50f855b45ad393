"""Checks on the driver before any worker starts: what transformers would only find inside the workers, a
minute later and in a worker's log, is found here with the same cause and a fix.

Every check uses transformers' own code where there is some (the Trainer's column removal and collator), so it
refuses exactly what the workers would refuse.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

import torch
from transformers.trainer import Trainer as TransformersTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from raytrainer.arguments import ray_settings
from raytrainer.backend.data_transport import is_ray_dataset


def resolve_resume(args: Any, resume_from_checkpoint: str | bool | None) -> str | None:
    """transformers' meaning of `resume_from_checkpoint`, checked here: True is the last complete checkpoint in
    output_dir, a path must be a checkpoint folder whose files load without running code. Returns an absolute path
    (the workers share it), or None."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(args.output_dir)
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({args.output_dir}): train without "
                             "resume_from_checkpoint, or pass a checkpoint folder.")
        path = found
    else:
        path = str(resume_from_checkpoint)
        if not os.path.isdir(path):
            raise ValueError(f"Can't find a valid checkpoint at {path}: resume_from_checkpoint must be a "
                             "checkpoint-<step> folder (on storage the driver and the workers share), or True for the "
                             "last one in output_dir.")
    check_loads_without_code(path)
    return os.path.abspath(path)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` folder in `output_dir` that holds trainer_state.json: transformers'
    `_save_checkpoint` writes that file last, so a folder without it was cut off mid-write (a killed worker, a
    stopped job). transformers' `get_last_checkpoint` would take such a folder, and the resume would then fail on the
    workers (No such file: .../trainer_state.json) although an earlier complete checkpoint is there."""
    if not os.path.isdir(output_dir):
        return None
    steps = {int(match.group(1)): name for name in os.listdir(output_dir)
             if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))}
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, steps[step])
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            return folder
    return None


def check_loads_without_code(folder: str) -> None:
    """Refuse a checkpoint a `torch.load(weights_only=True)` file of which holds pickled objects other than tensors
    and plain data (a pickled object's `__reduce__` runs code when it is loaded). transformers loads these files with
    weights_only=True and would fail on every worker with torch's message, which names neither the file nor the
    checkpoint. The pickles are read statically (torch's `get_unsafe_globals_in_checkpoint`): nothing in them runs.
    training_args.bin is a full pickle by design and transformers never loads it on resume: it is not read."""
    from transformers.trainer_pt_utils import safe_globals  # the numpy types transformers allows in RNG states

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith((".pt", ".pth", ".bin")) or name == "training_args.bin" or not os.path.isfile(path):
            continue
        try:
            with safe_globals():
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError):  # not a torch.save zip file (a legacy format): torch.load judges it
            continue
        if unsafe:
            raise ValueError(
                f"{path} holds pickled objects that are not tensors ({', '.join(sorted(unsafe))}): loading it could "
                "run code, and transformers' torch.load(weights_only=True) would refuse it on the workers. Resume "
                "only from checkpoints you trust; if this one is your own, save plain tensors and Python values in "
                "it (e.g. the state_dict of your optimizer or scheduler), or resume from another checkpoint.")


def check_trainable(trainer: Any) -> None:
    """What `train()` needs that no worker can provide."""
    args = trainer.args
    if trainer.train_dataset is None:
        raise ValueError("Trainer: training requires a train_dataset. Pass train_dataset=... to the Trainer.")
    if args.enable_jit_checkpoint:
        raise ValueError("enable_jit_checkpoint=True installs a SIGTERM handler, which a Ray Train worker cannot "
                         "have (its training function runs in a thread, not the main thread). On Ray, preemption is "
                         "survived by restarts: set max_failures (and save_steps), and the group resumes from the "
                         "latest checkpoint. Remove enable_jit_checkpoint.")
    settings = ray_settings(args)
    if args.fp16 and (args.use_cpu or settings["use_gpu"] is False):
        raise ValueError("fp16=True needs GPUs (CUDA), but the workers run on CPU. Use bf16=True on CPU, or set "
                         "use_gpu=True on a cluster with GPUs.")


def check_dataset(trainer: Any, dataset: Any, description: str, needs_labels: bool) -> None:
    """Collate the first examples of a map-style dataset as the workers will (the Trainer's own column removal
    and collator), and check a training batch can give the model its loss."""
    if dataset is None or isinstance(dataset, (str, torch.utils.data.IterableDataset)) or is_ray_dataset(dataset):
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_dataset(trainer, part, f"{description} ({key})", needs_labels)
        return
    try:
        count = min(2, len(dataset))
    except (TypeError, NotImplementedError):
        return
    if count == 0:
        raise ValueError(f"The {description} dataset is empty.")
    import datasets

    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description=description)
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description=description)
    try:
        batch = collator([dataset[i] for i in range(count)])
    except Exception as error:
        raise ValueError(f"The data_collator ({type(trainer.data_collator).__name__}) failed on the first examples "
                         f"of the {description} dataset: {error}. Check the dataset's columns and the collator (a "
                         "tokenizer as processing_class pads token columns).") from error
    keys = set(batch.keys()) if hasattr(batch, "keys") else set()
    if keys and not _overrides_the_step(trainer):
        missing = [name for name in _required_inputs(trainer.model) if name not in keys]
        if missing:
            raise ValueError(f"The {description} batches have no {missing}, which the model's forward requires (they "
                             f"have {sorted(keys)}). Add or rename the dataset column(s), e.g. with "
                             "dataset.rename_column(...), or tokenize the text into them.")
    if needs_labels and keys and not _computes_its_own_loss(trainer):
        if trainer.label_names and not any(name in keys for name in trainer.label_names):
            raise ValueError(f"The {description} batches have no label {trainer.label_names} (they have "
                             f"{sorted(keys)}), so the model cannot compute a loss. Add a labels column, use a "
                             "collator that creates labels (e.g. DataCollatorForLanguageModeling(mlm=False)), or "
                             "pass compute_loss_func.")


def _overrides_the_step(trainer: Any) -> bool:
    """Whether the user's class feeds the model itself (it may build inputs the batches do not have)."""
    cls = type(trainer)
    return cls.compute_loss is not TransformersTrainer.compute_loss or \
        cls.training_step is not TransformersTrainer.training_step or \
        cls.prediction_step is not TransformersTrainer.prediction_step


def _computes_its_own_loss(trainer: Any) -> bool:
    """Whether something other than the model's labels gives the loss."""
    return trainer.compute_loss_func is not None or trainer.can_return_loss or _overrides_the_step(trainer)


def _required_inputs(model: Any) -> list[str]:
    """The arguments of the model's forward that have no default."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return []
    return [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
