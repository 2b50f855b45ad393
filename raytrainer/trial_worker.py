"""The worker side of a hyperparameter-search trial: the trial's training job, and its evaluations for Tune.

A trial (`raytrainer.trial`) sends the search's shared `TrialJob` and its own `TrialRun` to a warm worker group;
each worker builds the trial's job here (hyperparameters applied, a checkpoint at every evaluation), and rank 0
turns every evaluation into a Tune result (metrics plus `objective` and `checkpoint_path`) on the group's channel.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Callable

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from raytrainer import checkpoints
from raytrainer.job import Command, TrainingJob
from raytrainer.trial import TrialRun
from raytrainer.tuning import CHECKPOINT_PATH, OBJECTIVE, apply_hyperparameters


@dataclasses.dataclass
class TrialJob:
    """What every trial of one search shares; put in the object store once (datasets are references too)."""

    job: TrainingJob
    compute_objective: Callable[[dict[str, float]], float]
    output_dir: str
    hp_name: Callable[[dict], str] | None = None


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


def trial_arguments(trial_job: TrialJob, config: dict, trial_id: str) -> Any:
    name = trial_job.hp_name(config) if trial_job.hp_name is not None else trial_id
    return apply_hyperparameters(trial_job.job.args, config, output_dir=os.path.join(trial_job.output_dir,
                                                                                      f"run-{name}"))


def trial_command(trial_job: TrialJob, run: TrialRun, channel: Any, seq: int) -> tuple[TrainingJob, Command, dict]:
    """The trial's job and train command, and the reporting hooks that send its evaluations to the channel."""
    args = trial_arguments(trial_job, run.config, run.trial_id)
    job = dataclasses.replace(trial_job.job, args=args, trial=dict(run.config),
                              callbacks=[*trial_job.job.callbacks, SaveAtEachEvaluation()])
    resume_from = _transformers_checkpoint(run.restored_from) if run.restored_from else None
    command = Command("train", {"resume_from_checkpoint": resume_from, "trial": dict(run.config),
                                "ignore_keys_for_eval": None})

    def on_report(metrics: dict, checkpoint_path: str | None) -> None:
        if any(key.startswith("eval_") for key in metrics):  # a save without evaluation has nothing to score
            result = tune_result(trial_job.compute_objective, metrics, checkpoint_path)
            channel.push.remote(("trial_result", seq, result))

    # Trials share the group's Ray Train storage: the trial id keeps their persisted checkpoints apart.
    return job, command, {"on_report": on_report, "checkpoint_prefix": f"{run.trial_id}-"}


def tune_result(compute_objective: Callable, metrics: dict, checkpoint_path: str | None) -> dict:
    result = dict(metrics)
    # compute_objective sees what transformers' evaluate() returns: the eval metrics and the epoch.
    objective = compute_objective({k: v for k, v in metrics.items() if k != "step"})
    if isinstance(objective, bool) or not isinstance(objective, numbers.Real):
        raise TypeError(f"compute_objective returned {objective!r} ({type(objective).__name__}): it must return "
                        "one number computed from the evaluation metrics.")
    result[OBJECTIVE] = float(objective)
    result[CHECKPOINT_PATH] = checkpoint_path
    return result


def _transformers_checkpoint(folder: str) -> str:
    """The transformers-layout checkpoint inside a Tune checkpoint (Tune copies the folder's contents)."""
    if checkpoints.is_checkpoint(folder):
        return folder
    for name in sorted(os.listdir(folder)):
        candidate = os.path.join(folder, name)
        if os.path.isdir(candidate) and checkpoints.is_checkpoint(candidate):
            return candidate
    raise ValueError(f"The checkpoint Tune restored ({folder}) holds no transformers-layout checkpoint.")
