"""A hyperparameter-search trial on the workers: the user's Trainer built with the trial's arguments, and its
evaluations sent to Tune.

The trial actor (`tune.trial`) sends a `TrialCommand`; each worker builds the search's Trainer recipe with the
trial's hyperparameters in its TrainingArguments (as if the user had constructed it with them), saves a checkpoint
at every evaluation, and rank 0 turns each evaluation into a Tune result (metrics plus `objective` and
`checkpoint_path`) on the group's channel. This module imports no torch at import time: the trial actor pickles
the command.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Callable

import ray

from raytrainer.backend.channel import TrialReport
from raytrainer.backend.commands import TrainerRecipe, WorkerCommand
from raytrainer.tune.trial_config import CHECKPOINT_PATH, OBJECTIVE, apply_hyperparameters


# What the driver's earlier calls left on its Trainer: a trial is a run of its own and starts without them.
RESULTS_OF_EARLIER_CALLS = frozenset({"state", "control", "model_preparation_time"})


@dataclasses.dataclass
class SearchSettings:
    """What every trial of one search shares on the workers; put in the object store once."""

    compute_objective: Callable[[dict[str, float]], float]
    output_dir: str
    hp_name: Callable[[dict], str] | None = None


@dataclasses.dataclass
class TrialCommand(WorkerCommand):
    trial_id: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    settings: list = dataclasses.field(default_factory=list)  # [ObjectRef] of the search's SearchSettings
    restored_from: str | None = None  # the checkpoint Tune restored (PBT exploit), resumed by the workers

    returns_weights = False
    sends_result = False  # the trial's results went to Tune; its model stays on the workers
    keeps_trainer = False  # each trial builds its Trainer with its own hyperparameters

    def _settings(self) -> SearchSettings:
        if not isinstance(self.settings[0], SearchSettings):
            self.settings = [ray.get(self.settings[0])]
        return self.settings[0]

    def output_dir(self) -> str:
        settings = self._settings()
        name = settings.hp_name(self.config) if settings.hp_name is not None else self.trial_id
        return os.path.join(settings.output_dir, f"run-{name}")

    def recipe(self, recipe: TrainerRecipe) -> TrainerRecipe:
        """The search's recipe with the trial's hyperparameters in every TrainingArguments it holds."""
        from transformers.training_args import TrainingArguments

        def with_trial(value: Any) -> Any:
            if isinstance(value, TrainingArguments):
                return apply_hyperparameters(value, self.config, output_dir=self.output_dir())
            return value

        return dataclasses.replace(recipe, init_args=tuple(with_trial(v) for v in recipe.init_args),
                                   init_kwargs={k: with_trial(v) for k, v in recipe.init_kwargs.items()},
                                   changed={k: with_trial(v) for k, v in recipe.changed.items()
                                            if k not in RESULTS_OF_EARLIER_CALLS},
                                   model_prepared=False)

    def reporter_options(self, channel: Any, seq: int) -> dict:
        compute_objective = self._settings().compute_objective

        def on_report(metrics: dict, checkpoint_path: str | None) -> None:
            if any(key.startswith("eval_") for key in metrics):  # a save without evaluation has nothing to score
                channel.push.remote(TrialReport(seq, tune_result(compute_objective, metrics, checkpoint_path)))

        # Trials share the group's Ray Train storage: the trial id keeps their persisted checkpoints apart.
        return {"on_report": on_report, "checkpoint_prefix": f"{self.trial_id}-", "to_ray_train": False}

    def prepare(self, trainer: Any) -> None:
        from raytrainer.tune.exploit import ResumeWithTrialHyperparameters

        if os.path.abspath(trainer.args.output_dir) != self.output_dir():  # the recipe held no arguments
            trainer.args = apply_hyperparameters(trainer.args, self.config, output_dir=self.output_dir())
        trainer.add_callback(save_at_each_evaluation())
        # After a PBT exploit the trial goes on from the donor's checkpoint with its own (perturbed) values.
        trainer.add_callback(ResumeWithTrialHyperparameters(trainer))

    def run(self, trainer: Any, restart_point: str | None) -> Any:
        from raytrainer.backend.reporting import transformers_checkpoint

        resume = restart_point or (transformers_checkpoint(self.restored_from) if self.restored_from else None)
        return trainer.train(resume_from_checkpoint=resume, trial=dict(self.config))


def save_at_each_evaluation() -> Any:
    """A callback that saves a checkpoint at every evaluation (and evaluates at the end when eval_strategy='no'),
    so that each Tune result has the checkpoint of exactly the model it scores."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import IntervalStrategy

    class SaveAtEachEvaluation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if args.eval_strategy == IntervalStrategy.NO and state.global_step >= state.max_steps:
                control.should_evaluate = True
            return control

        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step > 0:
                control.should_save = True
            return control

    return SaveAtEachEvaluation()


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
