"""In each Ray Train worker: take commands from the channel, build the user's Trainer, run transformers' own call.

For every command a worker constructs the user's Trainer class from the driver's constructor call, inside the
process group Ray Train set up and on this worker's device (as each process of a `torchrun` launch does), sets
what the driver changed on its Trainer since, puts in the driver's callbacks, and runs transformers' own
`train()` / `evaluate()` / `predict()`. Rank 0 then sends back what the call changed: weights, state, callbacks,
the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import types
from typing import Any, Iterator

import ray
import ray.cloudpickle as cloudpickle
import ray.train
import torch
from transformers.training_args import TrainingArguments

from raytrainer.backend import data_transport
from raytrainer.backend.channel import CommandRequest, Idle, PendingCommand
from raytrainer.backend.commands import (CallbackUpdate, CommandResult, KeptTrainerUpdate, OptimizerState,
                                         TrainerRecipe, WorkerCommand)
from raytrainer.backend.reporting import CheckpointReporter
from raytrainer.backend.role import mark_worker
from raytrainer.backend.user_code import make_importable
from raytrainer.backend.weights import pack_state_dict, state_dict_of
from raytrainer.backend.worker_events import WorkerEvents, transformers_logs_to_driver

IDLE_CLEANUP_AFTER_S = 1.0  # workers collect garbage once they have waited this long for the next command
_PLAIN = (type(None), bool, int, float, str)


def serve_commands(config: dict) -> None:
    """The Ray Train worker function: take commands from the channel until it says stop."""
    channel = config["channel"]
    rank = prepare_worker(config)
    done = 0
    while True:
        try:
            item = ray.get(channel.next_command.remote(done, IDLE_CLEANUP_AFTER_S))
            if isinstance(item, Idle):  # a full garbage collection takes a few tenths of a second: only when idle
                _free_memory(config)
                item = ray.get(channel.next_command.remote(done))
        except ray.exceptions.RayActorError:
            return  # the channel is gone (its driver ended): nothing more will come
        if item is None:
            return
        assert isinstance(item, PendingCommand)
        run_command(item.seq, item.request, channel, rank, config)
        done = item.seq


def prepare_worker(config: dict) -> int:
    """Once per worker process: the role, rank-tagged output, the torch thread share and the device."""
    from raytrainer.backend.worker_logs import tag_worker_output

    mark_worker()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    tag_worker_output(rank)
    _set_thread_share(context, config.get("driver_threads"))
    if not config.get("use_gpu"):
        # transformers puts a process on the CPU (and accelerate makes a multi-process run MULTI_CPU over gloo)
        # only when told so: a CPU worker group is that.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    _freeze_imported_objects()
    return rank


def _freeze_imported_objects() -> None:
    """Move what the imports created out of the garbage collector's sight, once per worker process.

    transformers runs a full collection at the start of every `train()` (accelerate's `free_memory`) and this worker
    collects when idle; each pass walks every object the process tracks, ~0.5 M after importing torch, transformers
    and Ray: 0.1-0.2 s on a quiet core and up to a second on a loaded one, per call. The imported modules' objects
    live as long as the process, so `gc.freeze()` puts them in the permanent generation and a collection walks only
    what the calls created (those are still collected: nothing created later is frozen)."""
    import transformers.trainer  # noqa: F401 - every command's Trainer is built on it

    gc.collect()
    gc.freeze()


def run_command(seq: int, request: CommandRequest, channel: Any, rank: int, config: dict) -> None:
    """Build the Trainer for one command (or take the kept one), run it, and (rank 0) hand its result to the
    channel."""
    global _kept
    recipe, callbacks, command = ray.get([request.recipe[0], request.callbacks[0], request.command[0]])
    world_size = ray.train.get_context().get_world_size()
    with _driver_environment(recipe), transformers_logs_to_driver(channel, rank):
        trainer, sent = trainer_for(command.recipe(recipe), callbacks, command)
        reporter = CheckpointReporter(channel, seq, rank, config["persist_checkpoints"],
                                      **command.reporter_options(channel, seq))
        command.prepare(trainer)
        events = WorkerEvents(channel, seq, rank, world_size, reporter)
        trainer.add_callback(events)
        before = _observe(trainer)
        output = command.run(trainer, reporter.latest_checkpoint())
        result = collect_result(trainer, output, command, before, sent, events, rank)
        trainer.remove_callback(events)
    if command.keeps_trainer and recipe.identity:
        _kept = KeptTrainer(recipe.identity, trainer)
    if rank == 0:  # by reference: the channel's process never unpickles (imports) what the result holds
        ray.get(channel.finish.remote(seq, [ray.put(result) if result is not None else None]))


@dataclasses.dataclass
class KeptTrainer:
    """The Trainer this worker built for one driver Trainer (`TrainerRecipe.identity`), kept for its next call.

    It lives in this worker process: a group that Ray Train restarted has new processes, which keep nothing, so a
    restarted group always builds the Trainer afresh."""

    identity: str
    trainer: Any


_kept: KeptTrainer | None = None


def trainer_for(recipe: TrainerRecipe, callbacks: list, command: WorkerCommand) -> tuple[Any, dict[int, int]]:
    """The kept Trainer where it was built for the same driver Trainer and the driver allows it, updated with what
    the driver changed since; else a Trainer built afresh. Every rank decides the same (same commands, same
    recipe). Returns it with the driver's index of each callback put into it (by id)."""
    global _kept
    kept, _kept = _kept, None  # a call that fails leaves no Trainer behind for the next one
    if kept is not None and command.keeps_trainer and recipe.kept is not None and kept.identity == recipe.identity:
        trainer = kept.trainer
        update_kept_trainer(trainer, recipe.kept, _receive(recipe, callbacks, command, place_arguments=False))
    else:
        kept = None  # the Trainer kept for another driver Trainer (or construction) goes before a new one is built
        trainer = build_trainer(recipe, _receive(recipe, callbacks, command, place_arguments=True))
    # The driver's callbacks, as they are now (a construction called on_init_end on fresh copies).
    trainer.callback_handler.callbacks = list(callbacks)
    return trainer, {id(callback): index for index, callback in enumerate(callbacks)}


def _receive(recipe: TrainerRecipe, callbacks: list, command: WorkerCommand, place_arguments: bool) -> dict[str, Any]:
    """Rebuild the datasets of the recipe and the command here, make the user's code importable and (for a Trainer
    built afresh) place every TrainingArguments on this worker: resolving their device resets accelerate's state,
    which a kept Trainer's accelerator holds. Returns the recipe's changed attributes."""
    recipe.init_args = tuple(data_transport.rebuild(value) for value in recipe.init_args)
    recipe.init_kwargs = {name: data_transport.rebuild(value) for name, value in recipe.init_kwargs.items()}
    changed = {name: data_transport.rebuild(value) for name, value in recipe.changed.items()}
    for field in dataclasses.fields(command):
        setattr(command, field.name, data_transport.rebuild(getattr(command, field.name)))
    values = [*recipe.init_args, *recipe.init_kwargs.values(), *changed.values()]
    if recipe.kept is not None:
        values.append(recipe.kept.args)
    make_importable([recipe.trainer_class, *values, *callbacks, command])
    placed = set()
    for value in values if place_arguments else ():
        if isinstance(value, TrainingArguments) and id(value) not in placed:
            place_on_this_worker(value)
            placed.add(id(value))
    return changed


def build_trainer(recipe: TrainerRecipe, changed: dict[str, Any]) -> Any:
    """The user's Trainer for this worker, constructed from the driver's constructor call."""
    trainer = recipe.trainer_class(*recipe.init_args, **recipe.init_kwargs)
    for name, value in changed.items():
        setattr(trainer, name, value)
    if recipe.model_weights is not None:  # the constructor built or wrapped the model: take the driver's weights
        trainer.model.load_state_dict(state_dict_of(recipe.model_weights))
    if recipe.model_prepared:
        # In-process, an earlier call would have prepared the model with the accelerator, and transformers' evaluation
        # then reports no model preparation time: the same here (transformers only counts `_models`).
        trainer.accelerator._models.append(trainer.model)
    return trainer


def update_kept_trainer(trainer: Any, update: KeptTrainerUpdate, changed: dict[str, Any]) -> None:
    """Apply to the kept Trainer what the driver's code changed on its own since the last call, as that code would
    have changed an in-process Trainer: the attributes it rebound, the fields of its arguments, the model's
    weights (copied into the kept model's tensors, which its optimizer refers to)."""
    for name in update.rebound:
        setattr(trainer, name, changed[name])
    for field in dataclasses.fields(update.args):
        value = getattr(update.args, field.name)
        if field.init and _differs(getattr(trainer.args, field.name, _MISSING), value):
            setattr(trainer.args, field.name, value)
    if update.weights is not None and trainer.model is not None:
        trainer.model.load_state_dict(state_dict_of(update.weights))


def place_on_this_worker(args: TrainingArguments) -> None:
    """Forget the device the driver resolved for `args` and resolve it here, inside Ray Train's process group
    (before the Trainer creates its Accelerator, which reads the same accelerate state)."""
    args.__dict__.pop("_setup_devices", None)
    args.distributed_state = None
    _ = args.device
    apply_process_settings(args)


def apply_process_settings(args: TrainingArguments) -> None:
    """What transformers' `TrainingArguments.__post_init__` does to the process that builds the arguments rather
    than to the arguments: check bf16 support and switch TF32 on or off. The arguments reach a worker unpickled,
    without `__post_init__`, so the same decisions are made here, on the worker's own device."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_tf32_available
    from transformers.utils.import_utils import enable_tf32

    on_gpu = args.device.type == "cuda"
    if on_gpu and (args.bf16 or args.bf16_full_eval) and not is_torch_bf16_gpu_available():
        raise ValueError(f"bf16=True, but this worker's GPU ({torch.cuda.get_device_name()}) does not support bf16 "
                         "(transformers needs an Ampere or newer GPU with CUDA >= 11). Use fp16=True instead.")
    if not on_gpu or not is_torch_tf32_available():
        if on_gpu and args.tf32:
            raise ValueError(f"tf32=True, but this worker's GPU ({torch.cuda.get_device_name()}) has no TF32 "
                             "(Ampere or newer, CUDA >= 11). Leave tf32 unset.")
        return
    # A warm worker serves many calls: what an earlier call's arguments switched on must not stay for this one.
    _process_defaults.setdefault("fp32_precision", getattr(torch.backends, "fp32_precision", None))
    if _process_defaults["fp32_precision"] is not None:
        torch.backends.fp32_precision = _process_defaults["fp32_precision"]
    if args.torch_compile and (args.tf32 is None and not args.fp16 or args.bf16):
        enable_tf32(True)  # transformers' default for torch.compile
    if args.tf32 is not None:
        enable_tf32(bool(args.tf32))


_process_defaults: dict[str, Any] = {}  # this worker process's settings before any call changed them


def collect_result(trainer: Any, output: Any, command: WorkerCommand, before: dict, sent: dict[int, int],
                   events: WorkerEvents, rank: int) -> CommandResult | None:
    """What the call changed, on rank 0 (every rank takes part in gathering sharded weights)."""
    weights = None
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if command.returns_weights:  # sharded (FSDP, DeepSpeed) weights are gathered by accelerate, on every rank
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else trainer.model.state_dict()
        weights = pack_state_dict(state_dict) if rank == 0 else None
    if rank != 0 or not command.sends_result:
        return None
    after = _observe(trainer)
    return CommandResult(
        output=output, state=trainer.state, control=trainer.control,
        model_prepared=len(trainer.accelerator._models) > 0,
        callbacks=[_callback_update(cb, sent) for cb in trainer.callback_handler.callbacks if cb is not events],
        weights=weights,
        args_changes={k: v for k, v in after["args"].items() if _differs(before["args"].get(k, _MISSING), v)},
        attribute_changes={k: v for k, v in after["attributes"].items()
                           if _differs(before["attributes"].get(k, _MISSING), v)},
        model_attribute_changes={k: v for k, v in after["model"].items()
                                 if _differs(before["model"].get(k, _MISSING), v)},
        optimizer=optimizer_state(trainer) if command.returns_weights and not sharded else None)


def optimizer_state(trainer: Any) -> OptimizerState | None:
    """The optimizer's and the scheduler's state after training, on the CPU (every rank holds the same under DDP)."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import send_to_device

    if trainer.optimizer is None:
        return None
    scheduler = trainer.lr_scheduler
    return OptimizerState(optimizer=send_to_device(trainer.optimizer.state_dict(), "cpu"),
                          prepared=isinstance(trainer.optimizer, AcceleratedOptimizer),
                          scheduler=send_to_device(scheduler.state_dict(), "cpu") if scheduler is not None else None,
                          scheduler_created=bool(getattr(trainer, "_created_lr_scheduler", False)))


# ---------------------------------------------------------------------------------------------- results
_MISSING = object()


def _differs(old: Any, new: Any) -> bool:
    try:
        return bool(old != new) or type(old) is not type(new)
    except Exception:  # noqa: BLE001 - values that do not compare (tensors): treat as changed
        return True


def _is_plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if depth < 2 and isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _observe(trainer: Any) -> dict:
    """The plain attributes of the Trainer and of its model and the fields of its arguments, to see what a call
    changes."""
    attributes = {k: _copy_plain(v) for k, v in vars(trainer).items() if not k.startswith("_raytrainer")
                  and k not in ("state", "control", "args") and _is_plain(v)}
    args = {f.name: _copy_plain(getattr(trainer.args, f.name)) for f in dataclasses.fields(trainer.args) if f.init}
    model = {k: _copy_plain(v) for k, v in vars(trainer.model).items()
             if k not in MODEL_ATTRIBUTES_OF_THE_PROCESS and _is_plain(v)} if trainer.model is not None else {}
    return {"attributes": attributes, "args": args, "model": model}


# Plain attributes of a model that describe this process's handling of it, not the model: accelerate marks the model
# it prepared (and would not prepare a model so marked again, e.g. with DDP on another worker).
MODEL_ATTRIBUTES_OF_THE_PROCESS = frozenset({"_is_accelerate_prepared"})


def _copy_plain(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _travels(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - open files, writers, locks, clients
        return False


def _integration_classes() -> tuple[type, ...]:
    """Reporting integrations (TensorBoard, MLflow, W&B, ...): their state belongs to the worker's process (a
    writer, a run), so it is not copied back; each call starts them afresh, as a new process does."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return tuple(cls for cls in INTEGRATION_TO_CALLBACK.values() if isinstance(cls, type))


def _callback_update(callback: Any, sent: dict[int, int]) -> CallbackUpdate:
    index = sent.get(id(callback))
    if index is None:
        return CallbackUpdate(index=None, callback=callback if _travels(callback) else None)
    if isinstance(callback, _integration_classes()):
        return CallbackUpdate(index=index)
    attributes = {k: v for k, v in vars(callback).items() if _travels(v)}
    return CallbackUpdate(index=index, attributes=attributes, closure=closure_values(callback))


def closure_values(obj: Any) -> dict[tuple[str, str], Any]:
    """The variables the methods of `obj`'s own class close over, by (method, variable), where they can travel."""
    values = {}
    for name, method in vars(type(obj)).items():
        if isinstance(method, types.FunctionType) and method.__closure__:
            for variable, cell in zip(method.__code__.co_freevars, method.__closure__):
                if variable == "__class__":
                    continue
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if not isinstance(value, (type, types.FunctionType, types.ModuleType)) and _travels(value):
                    values[(name, variable)] = value
    return values


# ---------------------------------------------------------------------------------------------- process set-up
@contextlib.contextmanager
def _driver_environment(recipe: TrainerRecipe) -> Iterator[None]:
    """The driver's working directory and integration settings for the duration of one command."""
    if recipe.working_dir and os.path.isdir(recipe.working_dir):
        os.chdir(recipe.working_dir)
    previous = {name: os.environ.get(name) for name in recipe.environment}
    os.environ.update(recipe.environment)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_thread_share(context: Any, driver_threads: str | None) -> None:
    """Torch threads: the driver's OMP_NUM_THREADS when the user set one, else this worker's share of the node's
    cores (Ray leaves workers at 1 thread)."""
    if driver_threads and driver_threads.isdigit() and int(driver_threads) > 0:
        torch.set_num_threads(int(driver_threads))
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, context.get_local_world_size())))


def _free_memory(config: dict) -> None:
    """Free what the last command left in reference cycles (models, optimizers, CUDA blocks)."""
    gc.collect()
    if config.get("use_gpu"):
        torch.cuda.empty_cache()
