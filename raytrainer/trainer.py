"""The driver API: `raytrainer.Trainer` is a `transformers.Trainer` whose `train()`, `evaluate()`, `predict()` and
`hyperparameter_search()` run on Ray Train workers.

On the driver it is constructed exactly as transformers constructs a Trainer (on the driver's CPU), so every method
and attribute works there. A call sends the workers the recipe of this Trainer: the user's own class and its
constructor call, plus what the driver's code changed on it since (`backend.commands.TrainerRecipe`). Every worker
builds that Trainer again inside the process group Ray Train set up and runs transformers' own call; rank 0 sends
back what the call changed (weights, state, callbacks, output), which lands here, so that `trainer.model`,
`trainer.state` and the callbacks are what an in-process `transformers.Trainer` would hold.

Inside a worker the same class is transformers' Trainer unchanged (`backend.role.in_worker()`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import types
import uuid
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import torch
from transformers.trainer import Trainer as TransformersTrainer
from transformers.trainer_utils import PredictionOutput, TrainOutput, enable_full_determinism, set_seed
from transformers.training_args import TrainingArguments as TransformersTrainingArguments

from raytrainer import checks
from raytrainer.backend.commands import (CallbackUpdate, CommandResult, EvaluateCommand, KeptTrainerUpdate,
                                         OptimizerState, PredictCommand, TrainCommand, TrainerRecipe, WorkerCommand)
from raytrainer.backend.role import in_worker
from raytrainer.backend.session import WorkerSession, is_display_callback, worker_callbacks

logger = logging.getLogger(__name__)

# Attributes of a Trainer that belong to the process holding it, never sent: each worker has its own.
_PROCESS_BOUND = frozenset({"accelerator", "gather_function", "callback_handler", "_memory_tracker"})
# Attributes a worker's kept Trainer cannot take rebound: the objects that refer to the model's parameters (a kept
# Trainer's model is not the one they refer to once unpickled there), and the arguments (the Trainer's accelerator
# was made from the ones it has). The worker builds the Trainer afresh instead.
_BUILT_WITH = frozenset({"model", "model_wrapped", "optimizer", "lr_scheduler", "args"})
# What belongs to this driver object, not to a copy of it: its workers, and the identity and last call under which
# they keep its Trainer.
_OF_THIS_OBJECT = frozenset({"_raytrainer_workers", "_raytrainer_identity", "_raytrainer_since_call"})


@dataclass
class ConstructorCall:
    """The arguments a Trainer was constructed with, as the user passed them."""

    args: tuple
    kwargs: dict


class Trainer(TransformersTrainer):
    """`transformers.Trainer`, with `train()`, `evaluate()`, `predict()` and `hyperparameter_search()` run by Ray Train
    workers (torch DDP: gloo on CPU, NCCL on GPU; FSDP and DeepSpeed through transformers' own paths).

    The constructor is transformers' own; the arguments are the same. `raytrainer.on_ray(cls)` gives the same for
    any other `transformers.Trainer` subclass (TRL's trainers, `Seq2SeqTrainer`, ...): a subclass of `cls` with this
    class first in its MRO, so the same code runs every Trainer on Ray. Subclass it as you would subclass
    `transformers.Trainer`: every worker runs an instance of your class, so your overrides (`compute_loss`,
    `training_step`, `create_optimizer`, `get_train_dataloader`, ...) run where the training runs. Where and how the
    workers run comes from the Ray fields of `raytrainer.TrainingArguments` (`num_workers`, `use_gpu`, ...); a plain
    `transformers.TrainingArguments` trains on one worker.

    After `train()` the driver holds the trained weights in `trainer.model`, rank 0's `trainer.state` and the
    callbacks as rank 0 left them. The worker group stays warm between calls; `close()` (or a `with` block, garbage
    collection, the driver's exit, `worker_idle_timeout`) releases it.
    """

    def __new__(cls, *args, **kwargs):
        trainer = super().__new__(cls)
        trainer.__dict__["_raytrainer_call"] = ConstructorCall(args, kwargs)
        return trainer

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if isinstance(init, types.FunctionType) and not getattr(init, "_raytrainer_observed", False):
            cls.__init__ = _observed_construction(init)

    def __init__(self, *args, **kwargs):
        # The constructor of the class this one puts on Ray (next in the MRO: transformers.Trainer, TRL's
        # SFTTrainer, ...), called as the user called it. Its signature is shown as this one's (below, `on_ray`).
        if in_worker():
            super().__init__(*args, **kwargs)
            return
        with _construction(self):
            with _driver_construction(args, kwargs) as (construction_args, construction_kwargs, restore):
                super().__init__(*construction_args, **construction_kwargs)
            restore(self)
            self.__dict__["_raytrainer_workers"] = WorkerSession()

    # transformers' constructor, shown as ours (`on_ray` shows the constructor of the class it puts on Ray)
    __new__.__signature__ = __init__.__signature__ = inspect.signature(TransformersTrainer.__init__)

    # ----------------------------------------------------------------------------------- calls on the workers
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: dict | None = None,
              ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        """transformers' `train()`, run by the Ray Train workers. Returns the same `TrainOutput`; afterwards
        `trainer.model` holds the trained weights and `trainer.state` rank 0's state."""
        if in_worker():
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval)
        with self._raytrainer_workers.stops_unused_start_on_error():
            resume = checks.resolve_resume(self.args, resume_from_checkpoint)
            checks.check_trainable(self)
            checks.check_dataset(self, self.train_dataset, "training", needs_labels=True)
            result = self._run_on_workers(TrainCommand(resume, trial, ignore_keys_for_eval), "train")
        if self.model_init is not None:  # as transformers' train() does: a fresh model, the trained weights in it
            enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
            self.model = self.model_wrapped = self.call_model_init(trial)
            self.optimizer, self.lr_scheduler = None, None
        from raytrainer.backend.weights import state_dict_of

        self.model.load_state_dict(state_dict_of(result.weights))  # the model's own loader: it may resize buffers
        self._finish_call(result)
        return result.output

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """transformers' `evaluate()`, run by the Ray Train workers on `self.model` as it is on the driver."""
        if in_worker():
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)
        with self._raytrainer_workers.stops_unused_start_on_error():
            if eval_dataset is None and self.eval_dataset is None:
                raise ValueError("Trainer: evaluation requires an eval_dataset. Pass one to the Trainer or to "
                                 "evaluate().")
            checks.check_dataset(self, eval_dataset if eval_dataset is not None else self.eval_dataset, "evaluation",
                                 needs_labels=False)
            result = self._run_on_workers(EvaluateCommand(eval_dataset, ignore_keys, metric_key_prefix), "evaluate")
        self._finish_call(result)
        return result.output

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """transformers' `predict()`, run by the Ray Train workers: one row per example, in dataset order."""
        if in_worker():
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        with self._raytrainer_workers.stops_unused_start_on_error():
            if test_dataset is None:
                raise ValueError("Trainer.predict() needs a test_dataset.")
            checks.check_dataset(self, test_dataset, "test", needs_labels=False)
            result = self._run_on_workers(PredictCommand(test_dataset, ignore_keys, metric_key_prefix), "predict")
        self._finish_call(result)
        return result.output

    def hyperparameter_search(self, hp_space: Callable | None = None, compute_objective: Callable | None = None,
                              n_trials: int = 20, direction: str = "minimize", backend: Any = None,
                              hp_name: Callable | None = None, **kwargs):
        """Search hyperparameters with Ray Tune, each trial on warm Ray Train workers (see
        `raytrainer.tune.search.hyperparameter_search`)."""
        if in_worker():
            return super().hyperparameter_search(hp_space, compute_objective, n_trials, direction, backend, hp_name,
                                                 **kwargs)
        from raytrainer.tune.search import hyperparameter_search

        with self._raytrainer_workers.stops_unused_start_on_error():
            return hyperparameter_search(self, hp_space, compute_objective, n_trials, direction, backend, hp_name,
                                         **kwargs)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        """A Ray Data shard already holds only this worker's rows: batch it without accelerate splitting it across
        ranks again (as Ray Train's own transformers recipe does); everything else is transformers' own."""
        if not getattr(dataset, "is_presharded", False):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn=sampler_fn,
                                           is_training=is_training, dataloader_key=dataloader_key)
        collator = self._get_collator_with_removed_columns(self.data_collator, description=description)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator,
                                           num_workers=self.args.dataloader_num_workers,
                                           pin_memory=self.args.dataloader_pin_memory)

    # ----------------------------------------------------------------------------------- warm workers
    def close(self) -> None:
        """Release the Ray Train workers this Trainer keeps warm between calls (also done by a `with` block, by
        garbage collection, at driver exit and after `args.worker_idle_timeout` idle seconds)."""
        session = self.__dict__.get("_raytrainer_workers")
        if session is not None:
            session.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """A pickled Trainer (a component that refers to it) leaves its workers behind, and the identity under which
        they keep its Trainer: a copy is another Trainer."""
        return {k: v for k, v in self.__dict__.items() if k not in _OF_THIS_OBJECT}

    # ----------------------------------------------------------------------------------- one call
    def _run_on_workers(self, command: WorkerCommand, description: str) -> CommandResult:
        from raytrainer.backend.session import show_progress
        from raytrainer.backend.user_code import send_by_value
        from raytrainer.progress import DriverProgress

        session = self._raytrainer_workers
        session.connect(self.args)
        ray_datasets: dict = {}
        recipe = self._recipe(ray_datasets)
        for field in fields(command):
            setattr(command, field.name, session.datasets.stand_in(getattr(command, field.name), ray_datasets,
                                                                  f"{description}_{field.name}"))
        callbacks = worker_callbacks(self.callback_handler.callbacks)
        send_by_value([type(self), *recipe.init_args, *recipe.init_kwargs.values(), *recipe.changed.values(),
                       *callbacks, command])
        progress = DriverProgress(self.args.disable_tqdm, description)
        try:
            result = session.call(self.args, recipe, callbacks, command, ray_datasets, show_progress(progress))
        finally:
            progress.close()
        self._apply(result, callbacks)
        return result

    def _recipe(self, ray_datasets: dict, keep: bool = True) -> TrainerRecipe:
        """How a worker builds this Trainer now: the constructor call, and the attributes rebound since; and
        (`keep`) how the Trainer a worker kept from this Trainer's last call takes this one."""
        from raytrainer.backend.session import driver_environment
        from raytrainer.backend.weights import pack_weights

        datasets = self._raytrainer_workers.datasets
        call = self._raytrainer_call
        changed = self._changed_since_construction()
        # The constructor built or wrapped the model (a model name, PEFT): the call does not hold the driver's weights.
        model_built = self.model is not None and self.model_init is None and "model" not in changed and \
            not any(value is self.model for value in (*call.args, *call.kwargs.values()))
        model_weights = pack_weights(self.model) if model_built else None
        kept = self._kept_trainer_update(model_weights) if keep else None
        if kept is not None:  # (one rebound back to what construction left is set again on a fresh Trainer: no harm)
            changed.update({name: getattr(self, name) for name in kept.rebound})
        return TrainerRecipe(
            trainer_class=type(self),
            init_args=tuple(datasets.stand_in(value, ray_datasets, f"argument_{i}") for i, value in enumerate(call.args)),
            init_kwargs={name: datasets.stand_in(value, ray_datasets, name) for name, value in call.kwargs.items()},
            changed={name: datasets.stand_in(value, ray_datasets, name) for name, value in changed.items()},
            environment=driver_environment(), working_dir=os.getcwd(),
            model_prepared=self.__dict__.get("_raytrainer_model_prepared", False), model_weights=model_weights,
            identity=self.__dict__.setdefault("_raytrainer_identity", uuid.uuid4().hex), kept=kept)

    def _changed_since_construction(self) -> dict[str, Any]:
        """The attributes rebound since construction, but for the optimizer and scheduler a call brought back
        (the worker that builds the Trainer afresh starts those as the workers' own call would)."""
        baseline = self.__dict__.get("_raytrainer_baseline", {})
        from_calls = self.__dict__.get("_raytrainer_from_call", {})
        return {name: value for name, value in _rebound(self, baseline).items()
                if not (name in from_calls and from_calls[name] is value)}

    def _kept_trainer_update(self, model_weights: Any) -> KeptTrainerUpdate | None:
        """What a worker's kept Trainer applies for this call; None where it must build the Trainer afresh: no call
        before, an attribute rebound that refers to the driver's model (or the arguments), one deleted, the model's
        own settings changed (its plain attributes, its config), sharded training (FSDP, DeepSpeed: the weights are
        the shards')."""
        from raytrainer.backend.weights import pack_weights

        since_call = self.__dict__.get("_raytrainer_since_call")
        if since_call is None or self.args.fsdp or self.args.deepspeed:
            return None
        rebound = _rebound(self, since_call)
        if any(name in _BUILT_WITH or _refers_to_a_model(value) for name, value in rebound.items()) or \
                any(name not in vars(self) for name in since_call) or \
                self.__dict__.get("_raytrainer_model_settings") != _model_settings(self.model):
            return None
        weights = model_weights if model_weights is not None or self.model is None else pack_weights(self.model)
        return KeptTrainerUpdate(rebound=tuple(rebound), args=self.args, weights=weights)

    def _finish_call(self, result: CommandResult) -> None:
        """After a call and the model it left: the attributes it set on the model, the optimizer and scheduler
        training left, and what the driver's Trainer holds now (to tell what its code changes before the next)."""
        if self.model is not None:
            for name, value in result.model_attribute_changes.items():
                if name == "training":  # the mode of every submodule, as model.train()/eval() set it
                    self.model.train(value)
                else:
                    setattr(self.model, name, value)
        if result.optimizer is not None:
            self._take_optimizer(result.optimizer)
        self.__dict__["_raytrainer_since_call"] = _snapshot(self)
        self.__dict__["_raytrainer_model_settings"] = _model_settings(self.model)

    def _take_optimizer(self, state: OptimizerState) -> None:
        """The driver's optimizer and scheduler made what rank 0's are after training: built by this Trainer's own
        `create_optimizer` / `create_scheduler` over the driver's model (or the ones it was given), with rank 0's
        state loaded, and accelerate's wrapper around the optimizer, as transformers leaves them in one process."""
        from accelerate.optimizer import AcceleratedOptimizer

        before = self.optimizer, self.lr_scheduler, self._created_lr_scheduler
        try:
            with _cpu_only():
                if self._created_lr_scheduler:  # transformers makes the scheduler again for each train()
                    self.lr_scheduler = None
                if self.optimizer is None:
                    self.create_optimizer()
                if state.prepared and not isinstance(self.optimizer, AcceleratedOptimizer):
                    # (not the driver's accelerator: arguments built after it may have reset its state)
                    self.optimizer = AcceleratedOptimizer(self.optimizer, device_placement=False)
                if state.scheduler is not None and self.lr_scheduler is None:
                    self.create_scheduler(num_training_steps=self.state.max_steps)
                prepared = isinstance(self.optimizer, AcceleratedOptimizer)
                inner = self.optimizer.optimizer if prepared else self.optimizer
                inner.load_state_dict(state.optimizer)
                if state.scheduler is not None:
                    self.lr_scheduler.load_state_dict(state.scheduler)
            self._created_lr_scheduler = state.scheduler_created
        except Exception as error:  # noqa: BLE001 - the training itself succeeded: keep its results
            self.optimizer, self.lr_scheduler, self._created_lr_scheduler = before
            logger.warning(f"The workers' optimizer state could not be loaded into the driver's trainer.optimizer "
                           f"({type(error).__name__}: {error}); trainer.optimizer and trainer.lr_scheduler are "
                           "left as the driver had them.")
            return
        self.__dict__["_raytrainer_from_call"] = {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler}

    def _apply(self, result: CommandResult, sent_callbacks: list) -> None:
        """Make this Trainer what the call made rank 0's: state, control, callbacks, changed fields."""
        self.state = result.state
        self.state.is_world_process_zero = self.state.is_local_process_zero = True
        self.__dict__["_raytrainer_model_prepared"] = result.model_prepared
        self.control = result.control
        for name, value in result.args_changes.items():
            setattr(self.args, name, value)
        for name, value in result.attribute_changes.items():
            setattr(self, name, value)
        display = [cb for cb in self.callback_handler.callbacks if is_display_callback(cb)]
        self.callback_handler.callbacks = [*apply_callback_updates(sent_callbacks, result.callbacks), *display]


# ---------------------------------------------------------------------------------------------- construction
@dataclass
class _Seen:
    """An attribute as construction left it: the object, and a copy of plain data (compared by value)."""

    value: Any
    plain_copy: Any = None
    is_plain: bool = False

    def differs(self, value: Any) -> bool:
        if value is not self.value:
            return True
        if not self.is_plain:
            return False
        try:
            return bool(value != self.plain_copy)
        except Exception:  # noqa: BLE001
            return True


def _snapshot(trainer: Trainer) -> dict[str, _Seen]:
    """Each attribute of `trainer` as it is now, to tell what is rebound (or changed, for plain data) later."""
    return {name: _Seen(value, copy.deepcopy(value), True) if _is_plain(value) else _Seen(value)
            for name, value in vars(trainer).items() if not name.startswith("_raytrainer")}


def _rebound(trainer: Trainer, seen: dict[str, _Seen]) -> dict[str, Any]:
    """The attributes of `trainer` rebound (or, plain data, changed) since `seen`."""
    return {name: value for name, value in vars(trainer).items()
            if not name.startswith("_raytrainer") and name not in _PROCESS_BOUND
            and (name not in seen or seen[name].differs(value))}


def _model_settings(model: Any) -> Any:
    """A model's plain attributes and its config, as data (a change between calls is not applied to a kept model:
    the workers build the Trainer afresh)."""
    if model is None:
        return None
    config = getattr(model, "config", None)
    return ({k: copy.deepcopy(v) for k, v in vars(model).items() if _is_plain(v)},
            config.to_dict() if hasattr(config, "to_dict") else None)


def _refers_to_a_model(value: Any) -> bool:
    """A module, optimizer or scheduler, or a list, tuple or dict holding one."""
    if isinstance(value, (list, tuple)):
        return any(_refers_to_a_model(v) for v in value)
    if isinstance(value, dict):
        return any(_refers_to_a_model(v) for v in value.values())
    return isinstance(value, (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                              torch.optim.lr_scheduler.ReduceLROnPlateau))


def _is_plain(value: Any) -> bool:
    if isinstance(value, (type(None), bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


@contextlib.contextmanager
def _construction(trainer: Trainer) -> Iterator[None]:
    """Count nested constructors (the user's subclasses call ours); the outermost one records what construction
    left, to tell later changes from it."""
    depth = trainer.__dict__.get("_raytrainer_depth", 0)
    trainer.__dict__["_raytrainer_depth"] = depth + 1
    try:
        yield
    finally:
        trainer.__dict__["_raytrainer_depth"] = depth
    if depth == 0 and not in_worker():
        trainer.__dict__["_raytrainer_baseline"] = _snapshot(trainer)
        # Each construction is another Trainer for the workers: none keeps a Trainer built for an earlier one.
        trainer.__dict__["_raytrainer_identity"] = uuid.uuid4().hex
        trainer.__dict__.pop("_raytrainer_since_call", None)
        _check_cluster_address(trainer)
        _start_early(trainer)


def _check_cluster_address(trainer: Trainer) -> None:
    """A cluster address that cannot work (not answering, refusing this driver, Ray Client, another cluster than
    the connected one) fails the construction, in seconds, before Ray or a worker starts."""
    from raytrainer.arguments import ray_settings
    from raytrainer.backend.cluster import check_cluster_address

    args = trainer.__dict__.get("args")
    if args is not None:  # (a subclass that never called our constructor has none)
        check_cluster_address(ray_settings(args)["ray_address"])


def _start_early(trainer: Trainer) -> None:
    """The first Trainer of a script that can train starts Ray and its workers now, in the background
    (`backend.early_start`); a Ray Data dataset needs its group started with the data, at the call."""
    from raytrainer.backend.data_transport import is_ray_dataset

    session = trainer.__dict__.get("_raytrainer_workers")
    if session is None:  # a subclass that never called our constructor
        return
    datasets = [trainer.train_dataset, *(trainer.eval_dataset.values() if isinstance(trainer.eval_dataset, dict)
                                         else [trainer.eval_dataset])]
    session.start_early(trainer.args, can_train=any(d is not None for d in datasets),
                        with_group=not any(is_ray_dataset(d) for d in datasets))


def _observed_construction(init: Callable) -> Callable:
    """Wrap a subclass's `__init__` so that construction ends when the outermost constructor returns."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _construction(self):
            init(self, *args, **kwargs)

    __init__._raytrainer_observed = True
    return __init__


@contextlib.contextmanager
def _cpu_only() -> Iterator[None]:
    """accelerate and transformers place this process on the CPU while inside (ACCELERATE_USE_CPU)."""
    previous = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


@contextlib.contextmanager
def _driver_construction(args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict, Callable[[Any], None]]]:
    """The constructor call as the driver makes it: on its CPU (the GPUs are the workers'), and each
    TrainingArguments in it without FSDP/DeepSpeed, which need the workers' process group (transformers refuses FSDP
    outside distributed training). Yields the call and a `restore(trainer)` that puts the user's arguments back in
    `trainer.args`. The workers construct with the user's call as it is."""
    substitutes: dict[int, tuple[Any, Any]] = {}  # id(construction copy) -> (copy, the user's arguments)

    def for_driver(value: Any) -> Any:
        if not isinstance(value, TransformersTrainingArguments):
            return value
        construction_args = _on_driver_cpu(value)
        if construction_args is not value:
            substitutes[id(construction_args)] = (construction_args, value)
        return construction_args

    def restore(trainer: Any) -> None:
        held = trainer.__dict__.get("args")
        if held is not None and id(held) in substitutes and substitutes[id(held)][0] is held:
            trainer.args = substitutes[id(held)][1]

    with _cpu_only():
        yield tuple(for_driver(v) for v in args), {k: for_driver(v) for k, v in kwargs.items()}, restore


def _on_driver_cpu(args: TransformersTrainingArguments) -> TransformersTrainingArguments:
    """`args` as the driver's construction uses them (inside `_cpu_only`): a copy without FSDP/DeepSpeed where they
    are set, resolved on the CPU."""
    construction_args = args
    if args.fsdp or args.deepspeed or getattr(args, "deepspeed_plugin", None) is not None:
        construction_args = copy.copy(args)
        construction_args.fsdp, construction_args.fsdp_plugin_args = False, None
        construction_args.deepspeed, construction_args.deepspeed_plugin = None, None
        construction_args.hf_deepspeed_config = None
    if construction_args.device.type != "cpu":
        construction_args.__dict__.pop("_setup_devices", None)
        _ = construction_args.device
    return construction_args


# ---------------------------------------------------------------------------------------------- callbacks
def apply_callback_updates(sent: list, updates: list[CallbackUpdate]) -> list:
    """The driver's callbacks made what rank 0's became, in rank 0's final order."""
    result = []
    for update in updates:
        if update.index is None:
            if update.callback is not None:
                result.append(update.callback)
            continue
        callback = sent[update.index]
        callback.__dict__.update(update.attributes)
        _set_closure(callback, update.closure)
        result.append(callback)
    return result


def _set_closure(callback: Any, closure: dict) -> None:
    """Set the variables a callback's methods close over to rank 0's values. Each method came with its own copy of
    a shared variable, so only a value that differs from the driver's before the call (one the call changed) is
    taken."""
    cells = {}
    for (method_name, variable), value in closure.items():
        method = vars(type(callback)).get(method_name)
        if isinstance(method, types.FunctionType) and method.__closure__ and variable in method.__code__.co_freevars:
            cell = method.__closure__[method.__code__.co_freevars.index(variable)]
            cells.setdefault(id(cell), (cell, _cell_value(cell), []))[2].append(value)
    for cell, before, values in cells.values():
        for value in values:
            try:
                changed = not bool(value == before)
            except Exception:  # noqa: BLE001 - values that do not compare
                changed = True
            if changed:
                cell.cell_contents = value


def _cell_value(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return object()


__all__ = ["Trainer"]
