"""One hyperparameter-search trial: a Ray Tune function trainable whose training runs on Ray Train workers.

The trial's thread starts the Ray Train run (`worker_group.run_once`) in a helper thread and turns each
report of the workers into a Tune result: the Train controller hands rank 0's metrics and checkpoint to the trial
through a small queue (`ForwardReports`), and the trial calls `ray.tune.report` with the metrics plus `objective`.
Tune can then stop the trial (ASHA, ...) at any evaluation, or, for PBT, restart it from another trial's
checkpoint, which the trial passes to the workers as `resume_from_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from typing import Any, Callable

import ray
from ray import tune
from ray.train import Checkpoint
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from raytrainer import checkpoints, orchestration, worker_group
from raytrainer.job import Command, TrainingJob
from raytrainer.tuning import CHECKPOINT_PATH, OBJECTIVE, apply_hyperparameters

_FINISHED = "__raytrainer_trial_finished__"


@dataclasses.dataclass
class TrialJob:
    """What every trial of one search shares; sent to the trials once (datasets are object-store references)."""

    job: TrainingJob
    ray_datasets: dict
    compute_objective: Callable[[dict[str, float]], float]
    output_dir: str
    hp_name: Callable[[dict], str] | None = None
    report_checkpoints: bool = False  # give Tune the checkpoints too (PBT restores trials from them)


class SaveAtEachEvaluation(TrainerCallback):
    """Save a checkpoint at every evaluation (and evaluate at the end when eval_strategy='no'), so that each Tune
    result has the checkpoint of exactly the model it scores."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == IntervalStrategy.NO and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step > 0:
            control.should_save = True
        return control


class ForwardReports(UserCallback):
    """Runs in the Ray Train controller: passes rank 0's metrics and the checkpoint of every report to the trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put((dict(metrics[0]), checkpoint_location(checkpoint)))


def checkpoint_location(checkpoint: Checkpoint | None) -> str | None:
    """Where a reported checkpoint's transformers-layout folder is: the `output_dir/checkpoint-<step>` folder that
    Ray Train's pointer names (runs without storage_path), or the copy Ray Train persisted (a path or a URI)."""
    if checkpoint is None:
        return None
    filesystem = checkpoint.filesystem
    if filesystem is None or filesystem.type_name == "local":
        pointer = os.path.join(checkpoint.path, orchestration.POINTER_NAME)
        if os.path.isfile(pointer):
            with open(pointer) as file:
                return json.load(file)["path"]
        return checkpoint.path
    return f"{filesystem.type_name}://{checkpoint.path}"


def trial_arguments(trial_job: TrialJob, config: dict, trial_id: str) -> Any:
    name = trial_job.hp_name(config) if trial_job.hp_name is not None else trial_id
    return apply_hyperparameters(trial_job.job.args, config, output_dir=os.path.join(trial_job.output_dir,
                                                                                      f"run-{name}"))


def run_trial(config: dict, trial_job: TrialJob) -> None:
    """The Tune function trainable: train with the trial's hyperparameters and report every evaluation."""
    context = tune.get_context()
    args = trial_arguments(trial_job, config, context.get_trial_id())
    restored = tune.get_checkpoint()  # set when PBT restarts this trial from another trial's checkpoint
    resume_from = _transformers_checkpoint(restored.path) if restored is not None else None
    job = dataclasses.replace(trial_job.job, args=args, trial=dict(config),
                              callbacks=[*trial_job.job.callbacks, SaveAtEachEvaluation()])
    command = Command("train", {"resume_from_checkpoint": resume_from, "trial": dict(config),
                                "ignore_keys_for_eval": None})
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, BaseException] = {}

    def train() -> None:
        try:
            worker_group.run_once(
                job, command, trial_job.ray_datasets, run_callbacks=[ForwardReports(reports)],
                run_name=f"trial-{context.get_trial_id()}-{uuid.uuid4().hex[:6]}")
        except BaseException as error:  # re-raised in the trial's thread below
            outcome["error"] = error
        finally:
            try:
                reports.put((_FINISHED, None))
            except ray.exceptions.RayActorError:
                pass  # Tune is stopping or pausing this trial: its placement group and queue are already gone

    thread = threading.Thread(target=train, name="raytrainer-trial", daemon=True)
    thread.start()
    try:
        while True:
            metrics, checkpoint_path = reports.get()
            if metrics == _FINISHED:
                break
            if not any(key.startswith("eval_") for key in metrics):
                continue  # a save without evaluation: nothing to score
            result, checkpoint = _tune_result(trial_job, metrics, checkpoint_path)
            tune.report(result, checkpoint=checkpoint)
    finally:
        if not thread.is_alive():
            reports.shutdown()
    if "error" in outcome:
        raise outcome["error"]


def _tune_result(trial_job: TrialJob, metrics: dict, checkpoint_path: str | None) -> tuple[dict, Any]:
    result = dict(metrics)
    # compute_objective sees what transformers' evaluate() returns: the eval metrics and the epoch.
    objective = trial_job.compute_objective({k: v for k, v in metrics.items() if k != "step"})
    if not isinstance(objective, (int, float)):
        raise TypeError(f"compute_objective returned {objective!r} ({type(objective).__name__}): it must return "
                        "one number computed from the evaluation metrics.")
    result[OBJECTIVE] = float(objective)
    result[CHECKPOINT_PATH] = checkpoint_path
    checkpoint = None
    if trial_job.report_checkpoints and checkpoint_path is not None:
        checkpoint = tune.Checkpoint(checkpoint_path)  # a local folder or a URI (s3://, gs://, ...)
    return result, checkpoint


def _transformers_checkpoint(folder: str) -> str:
    """The transformers-layout checkpoint inside a Tune checkpoint (Tune copies the folder's contents)."""
    if checkpoints.is_checkpoint(folder):
        return folder
    for name in sorted(os.listdir(folder)):
        candidate = os.path.join(folder, name)
        if os.path.isdir(candidate) and checkpoints.is_checkpoint(candidate):
            return candidate
    raise ValueError(f"The checkpoint Tune restored ({folder}) holds no transformers-layout checkpoint.")
