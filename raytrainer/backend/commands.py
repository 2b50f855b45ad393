"""What one driver call sends to the workers and gets back: the recipe of the user's Trainer, the command, the
result. Typed messages; the workers build and run them in `backend.worker`.

A worker does not receive the driver's Trainer object (its accelerator and device placement belong to the driver):
it constructs the user's own Trainer class again, as every process of a `torchrun` launch does, from the same
constructor call (`TrainerRecipe`), then sets what the driver's code changed on its Trainer since (`changed`),
so that overrides, arguments and integrations behave as transformers makes them behave. The worker keeps that
Trainer for the next call of the same driver Trainer (`TrainerRecipe.identity`), which then only applies what the
driver changed since its last call (`TrainerRecipe.kept`), as an in-process Trainer would see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainerRecipe:
    """How a worker builds the driver's Trainer.

    Args:
        trainer_class: the user's Trainer class (a subclass of `raytrainer.Trainer`), by value when it comes from
            the user's own code.
        init_args / init_kwargs: the constructor call as the user made it; datasets replaced by their stand-ins
            (`backend.data_transport`), the model and every other argument as they are now on the driver.
        changed: attributes the driver rebound on its Trainer after construction (`trainer.model_accepts_loss_kwargs
            = False`, a new `train_dataset`, the state a previous call left), set after the worker's construction.
        environment: the driver's environment variables that integrations read (WANDB_*, MLFLOW_*, HF_*, ...).
        working_dir: the driver's working directory, so relative paths mean the same on the workers.
        model_prepared: an earlier call prepared the model with the accelerator, as it would have in-process.
        model_weights: the weights of the driver's `trainer.model` where the constructor built or wrapped the model
            itself (TRL from a model name, PEFT from `peft_config`): the model in the constructor call is then not
            the one trained, and these are loaded into the worker's after its construction.
    """

    trainer_class: type
    init_args: tuple
    init_kwargs: dict
    changed: dict
    environment: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    model_prepared: bool = False  # an earlier call prepared the model with the accelerator (in-process it would)
    model_weights: Any = None  # a `backend.weights.WeightVersion`, or None where the call holds trainer.model
    identity: str = ""
    kept: "KeptTrainerUpdate | None" = None


@dataclass
class KeptTrainerUpdate:
    """What the driver's code changed on its Trainer since its last call, for the worker's kept Trainer.

    Args:
        rebound: names of the attributes rebound since the last call (their values are in `TrainerRecipe.changed`).
        args: the driver's `trainer.args` as it is now: its fields are copied into the kept Trainer's arguments
            (in one process, code that sets `trainer.args.max_steps` changes the Trainer's own arguments).
        weights: the driver's `trainer.model` weights now (a `backend.weights.WeightVersion`), loaded into the kept
            model in place (its optimizer keeps referring to the same tensors); None without a model.
    """

    rebound: tuple[str, ...]
    args: Any
    weights: Any = None


class WorkerCommand:
    """One call run on every worker with the Trainer built for it. Subclasses: train, evaluate, predict, and a
    search trial (`raytrainer.tune.trial_command`)."""

    returns_weights = False  # rank 0 sends the model's weights back (after training)
    keeps_trainer = True  # the worker keeps the Trainer for the driver Trainer's next call
    sends_result = True  # rank 0 sends a `CommandResult` (a search trial's results go to Tune instead)

    def recipe(self, recipe: TrainerRecipe) -> TrainerRecipe:
        """The recipe this command builds its Trainer from (a trial puts its hyperparameters in the arguments)."""
        return recipe

    def reporter_options(self, channel: Any, seq: int) -> dict:
        """Keyword arguments of this command's `CheckpointReporter`."""
        return {}

    def prepare(self, trainer: Any) -> None:
        """Adjust the freshly built Trainer before `run` (a trial applies its hyperparameters)."""

    def run(self, trainer: Any, restart_point: str | None) -> Any:
        """The call itself; `restart_point` is the checkpoint to resume from after a worker-group restart."""
        raise NotImplementedError


@dataclass
class TrainCommand(WorkerCommand):
    resume_from_checkpoint: str | bool | None = None
    trial: dict | None = None
    ignore_keys_for_eval: list[str] | None = None

    returns_weights = True

    def run(self, trainer: Any, restart_point: str | None) -> Any:
        return trainer.train(resume_from_checkpoint=restart_point or self.resume_from_checkpoint, trial=self.trial,
                             ignore_keys_for_eval=self.ignore_keys_for_eval)


@dataclass
class EvaluateCommand(WorkerCommand):
    eval_dataset: Any = None
    ignore_keys: list[str] | None = None
    metric_key_prefix: str = "eval"

    def run(self, trainer: Any, restart_point: str | None) -> Any:
        return trainer.evaluate(eval_dataset=self.eval_dataset, ignore_keys=self.ignore_keys,
                                metric_key_prefix=self.metric_key_prefix)


@dataclass
class PredictCommand(WorkerCommand):
    test_dataset: Any = None
    ignore_keys: list[str] | None = None
    metric_key_prefix: str = "test"

    def run(self, trainer: Any, restart_point: str | None) -> Any:
        return trainer.predict(self.test_dataset, ignore_keys=self.ignore_keys,
                               metric_key_prefix=self.metric_key_prefix)


@dataclass
class CallbackUpdate:
    """One callback of rank 0's Trainer after the call, in its final order.

    Args:
        index: its position in the list the driver sent, or None for a callback the call created (transformers
            restores callbacks from a checkpoint as new instances).
        attributes: its attributes that could travel back.
        closure: values of the variables its methods close over (a callback defined in a function that counts
            into a variable of that function), by (method name, variable name).
        callback: a new callback itself (None when it could not travel).
    """

    index: int | None
    attributes: dict = field(default_factory=dict)
    closure: dict = field(default_factory=dict)
    callback: Any = None


@dataclass
class CommandResult:
    """What rank 0 sends back after a command: everything a call changes on an in-process Trainer."""

    output: Any
    state: Any
    control: Any
    callbacks: list[CallbackUpdate]
    model_prepared: bool = False  # the accelerator holds the model after the call
    weights: Any = None  # a `backend.weights.WeightVersion` after training
    args_changes: dict = field(default_factory=dict)  # TrainingArguments fields the call changed
    attribute_changes: dict = field(default_factory=dict)  # plain Trainer attributes the call changed
    model_attribute_changes: dict = field(default_factory=dict)  # plain attributes the call set on the model
    optimizer: "OptimizerState | None" = None  # after training (None where it is sharded: FSDP, DeepSpeed)


@dataclass
class OptimizerState:
    """Rank 0's optimizer and learning-rate scheduler after training, for the driver's own (on its CPU).

    Args:
        optimizer: the optimizer's `state_dict()` (tensors on the CPU).
        prepared: the optimizer was accelerate's wrapper (`AcceleratedOptimizer`), as transformers leaves it.
        scheduler: the scheduler's `state_dict()`, or None without one.
        scheduler_created: transformers created the scheduler (it creates it again at the next `train()`).
    """

    optimizer: dict
    prepared: bool
    scheduler: dict | None = None
    scheduler_created: bool = False
