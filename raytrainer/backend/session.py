"""The driver side of one Trainer's workers: its warm group, its datasets in the object store, one call at a time,
and which of its callbacks go to the workers.

`WorkerSession.call` sends a command with the recipe of the Trainer to the warm group (started when there is none,
or when the arguments need another one), shows the workers' progress, and returns rank 0's `CommandResult`. A
hyperparameter search borrows the warm group (`lend`) and hands one back (`take`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import weakref
from typing import Any, Iterator

import ray
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from raytrainer.arguments import ray_settings
from raytrainer.backend.channel import CommandRequest, LogEvent, LogRecordEvent, ProgressEvent
from raytrainer.backend.cluster import WorkerGroupSpec, ensure_ray
from raytrainer.backend.commands import CommandResult, TrainerRecipe, WorkerCommand
from raytrainer.backend.data_transport import DatasetSender
from raytrainer.backend.early_start import EarlyStart, take_first_start
from raytrainer.backend.group import WorkerGroup, WorkerStopped
from raytrainer.backend.user_code import check_picklable

# Environment variables the reporting integrations and the Hub client read; a driver script often sets them
# (os.environ["WANDB_PROJECT"] = ...) after Ray started, so they travel with each command.
FORWARDED_ENVIRONMENT_PREFIXES = ("WANDB_", "MLFLOW_", "COMET_", "NEPTUNE_", "CLEARML_", "DVCLIVE_", "AIM_",
                                  "SWANLAB_", "TRACKIO_", "CODECARBON_", "DAGSHUB_", "HF_", "TRANSFORMERS_",
                                  "TOKENIZERS_", "TENSORBOARD_", "AZURE_ML", "FLYTE_", "KUBEFLOW_")


def driver_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENVIRONMENT_PREFIXES)}


class WorkerSession:
    """One Trainer's warm worker group and the datasets it already put in the object store."""

    def __init__(self):
        self.datasets = DatasetSender()
        self.group: WorkerGroup | None = None
        self.group_key: tuple | None = None
        self._release: weakref.finalize | None = None
        self._early: EarlyStart | None = None  # Ray and a group starting in the background (the first Trainer)
        self._early_group: WorkerGroup | None = None  # the group it started, not used by a call yet
        self._early_release: weakref.finalize | None = None

    def connect(self, args: Any) -> None:
        """Make sure this process is connected to Ray (after a background start, once it finished)."""
        self._finish_early_start()
        _connect(args)

    # ------------------------------------------------------------------ the background start
    def start_early(self, args: Any, can_train: bool, with_group: bool) -> None:
        """At construction: start Ray and (`with_group`) the workers for `args` in the background, when this is
        the process's first Trainer that can train (`backend.early_start`)."""
        if take_first_start(can_train):
            self._early = EarlyStart(args, _connect, _start_group if with_group else _no_group)
            self._early_release = weakref.finalize(self, _close_later, self._early)

    def _finish_early_start(self) -> None:
        """Wait for the background start; keep the group it started for the first call. Raises its error."""
        early, self._early = self._early, None
        if early is None:
            return
        self._early_release.detach()
        self._early_release = None
        group = early.wait()
        if group is not None:
            self._early_group = group
            self._early_release = weakref.finalize(self, _close_later, group)

    def _take_early_group(self) -> WorkerGroup | None:
        group, self._early_group = self._early_group, None
        if self._early_release is not None:
            self._early_release.detach()
            self._early_release = None
        return group

    def stop_early_start(self) -> None:
        """Stop what the background start started, unless a call used it already."""
        early, self._early = self._early, None
        if early is not None:
            self._early_release.detach()
            self._early_release = None
            early.cancel()
        group = self._take_early_group()
        if group is not None:
            group.close()

    @contextlib.contextmanager
    def stops_unused_start_on_error(self) -> Iterator[None]:
        """An error on the driver before the workers were used stops what the background start started."""
        try:
            yield
        except BaseException:
            self.stop_early_start()
            raise

    def call(self, args: Any, recipe: TrainerRecipe, callbacks: list, command: WorkerCommand, ray_datasets: dict,
             on_event: Any) -> CommandResult:
        """Run `command` on the workers (started or reused for `args`) and return rank 0's result."""
        self.connect(args)
        spec = WorkerGroupSpec.of(args)
        spec.check_fits_cluster()
        request = CommandRequest(recipe=[_put("Trainer", recipe)], callbacks=[_put("callbacks", callbacks)],
                                 command=[_put("command", command)])
        keep_warm = ray_settings(args)["worker_idle_timeout"] > 0 and not ray_datasets
        try:
            try:
                return self._group(args, spec, ray_datasets).run(request, on_event)
            except WorkerStopped:  # the warm group timed out while idle: start a fresh one
                self.close()
                return self._group(args, spec, ray_datasets).run(request, on_event)
        finally:
            if not keep_warm:
                self.close()

    @staticmethod
    def _key(args: Any, spec: WorkerGroupSpec) -> tuple:
        """What a warm group must match to serve a call with `args` (Ray Train rotates the checkpoints it copies to
        storage_path by save_total_limit)."""
        return spec, args.save_total_limit if spec.storage_path is not None else None

    def _group(self, args: Any, spec: WorkerGroupSpec, ray_datasets: dict) -> WorkerGroup:
        key = self._key(args, spec)
        if self.group is not None and (self.group_key != key or not self.group.alive or ray_datasets):
            self.close()
        idle_timeout = ray_settings(args)["worker_idle_timeout"] or None
        if self.group is not None and self.group.idle_timeout_s != idle_timeout:
            self.group.set_idle_timeout(idle_timeout)
        if self.group is None:
            group = self._take_early_group()
            if group is not None and (ray_datasets or not group.alive or _key_of(group) != key):
                group.close()  # started for arguments (or data) this call no longer has
                group = None
            if group is None and not ray_datasets:
                group = _take_idle_group(key)
            if group is not None:
                group.set_idle_timeout(idle_timeout)
            else:
                group = WorkerGroup(spec, idle_timeout_s=idle_timeout, save_total_limit=args.save_total_limit,
                                    ray_datasets=ray_datasets)
                group.start()
            self._adopt(group, key)
        return self.group

    def _adopt(self, group: WorkerGroup, key: tuple) -> None:
        self.group, self.group_key = group, key
        self._release = weakref.finalize(self, _close_later, group)
        _owners[group] = (weakref.ref(self), key)

    def _give_up(self, group: WorkerGroup) -> None:
        """Another Trainer took over this session's idle group: forget it without closing it."""
        if self.group is group:
            self._release.detach()
            self.group = self._release = None

    def close(self) -> None:
        """Release the warm workers (also done by garbage collection, at driver exit and after the idle timeout)."""
        self.stop_early_start()
        if self.group is not None:
            _owners.pop(self.group, None)
        if self._release is not None:
            self._release.detach()
            self.group.close()
        self.group = self._release = None

    def lend(self, args: Any, usable: bool) -> WorkerGroup | None:
        """Hand the warm group over to a hyperparameter search (None when there is none it can use: other
        arguments, Ray Data, or Ray Train rotating checkpoints that trials need). Without one of its own, the
        Trainer lends another Trainer's idle group of the same layout, as its own calls would take it over."""
        self._finish_early_start()
        group = self.group
        if group is None:
            group = self._take_early_group()
            if group is None and usable:
                spec = WorkerGroupSpec.of(args)
                if spec.storage_path is None or args.save_total_limit is None:
                    group = _take_idle_group(self._key(args, spec))
                    if group is not None:
                        group.set_idle_timeout(ray_settings(args)["worker_idle_timeout"] or None)
            if group is None:
                return None
        else:
            _owners.pop(group, None)
            self._release.detach()
            self.group = self._release = None
        spec = WorkerGroupSpec.of(args)
        if not (usable and group.alive and group.spec == spec
                and (spec.storage_path is None or group.save_total_limit is None)):
            group.close()
            return None
        return group

    def take(self, args: Any, group: WorkerGroup | None) -> None:
        """Keep a running group of a hyperparameter search warm for the Trainer's next calls."""
        if group is None:
            return
        idle_timeout = ray_settings(args)["worker_idle_timeout"]
        if idle_timeout <= 0 or (group.spec.storage_path is not None and args.save_total_limit):
            group.close()  # released after each call, or Ray Train should rotate checkpoints this group keeps
            return
        self.close()
        group.set_idle_timeout(idle_timeout)
        self._adopt(group, self._key(args, group.spec))


def _connect(args: Any) -> None:
    ensure_ray(ray_settings(args)["ray_address"])


def _start_group(args: Any) -> WorkerGroup:
    """The worker group a first call with `args` would start (run by the background start)."""
    spec = WorkerGroupSpec.of(args)
    spec.check_fits_cluster()
    group = WorkerGroup(spec, idle_timeout_s=ray_settings(args)["worker_idle_timeout"] or None,
                        save_total_limit=args.save_total_limit)
    group.start()
    return group


def _no_group(args: Any) -> None:
    return None


def _key_of(group: WorkerGroup) -> tuple:
    """`WorkerSession._key` of the arguments `group` was started for."""
    return group.spec, group.save_total_limit if group.spec.storage_path is not None else None


def is_display_callback(callback: Any) -> bool:
    """Progress bars and printers: they show the run on the driver, fed by the workers' events."""
    return isinstance(callback, (ProgressCallback, PrinterCallback)) or \
        type(callback).__name__ == "NotebookProgressCallback"


def worker_callbacks(callbacks: list) -> list:
    """The callbacks that run on the workers: all but the display ones, and transformers' JIT checkpoint callback
    (a SIGTERM handler bound to this process's Trainer)."""
    return [cb for cb in callbacks if not is_display_callback(cb) and type(cb).__name__ != "JITCheckpointCallback"]


def _close_later(group: WorkerGroup | EarlyStart) -> None:
    """A garbage-collected Trainer's group (or background start) is closed by a thread of its own: garbage
    collection can run inside any thread, Ray's own included, where calling Ray again may crash the process."""
    _closing.put(group)


def _close_queued_groups() -> None:
    while True:
        group = _closing.get()
        try:
            group.close()
        except Exception:  # noqa: BLE001 - Ray shut down meanwhile: nothing left to release
            pass


_closing: "queue.SimpleQueue[WorkerGroup]" = queue.SimpleQueue()
threading.Thread(target=_close_queued_groups, name="raytrainer-close-groups", daemon=True).start()

# Each warm group of this driver, with the session holding it and what it serves.
_owners: "weakref.WeakKeyDictionary[WorkerGroup, tuple[weakref.ref, tuple]]" = weakref.WeakKeyDictionary()


def _take_idle_group(key: tuple) -> WorkerGroup | None:
    """An idle running group of another Trainer of this driver that serves `key`, taken over: its workers know no
    Trainer (every command brings its recipe), so a second Trainer starts at once instead of after a Ray Train
    start-up, and the first one starts a new group if it is called again."""
    for group, (owner, group_key) in list(_owners.items()):
        if group_key == key and not group.busy and group.alive:
            session = owner()
            if session is not None:
                session._give_up(group)
            _owners.pop(group, None)
            return group
    return None


def _put(what: str, value: Any) -> ray.ObjectRef:
    """Put one part of a command in the object store; name the component that cannot be serialized, if any."""
    try:
        return ray.put(value)
    except Exception as error:  # noqa: BLE001 - diagnose below, then re-raise with the culprit's name
        parts = value.__dict__ if hasattr(value, "__dict__") else {what: value}
        if isinstance(value, TrainerRecipe):
            names = list(inspect.signature(value.trainer_class.__init__).parameters)[1:]  # without self
            positional = {names[i] if i < len(names) else f"argument {i}": v for i, v in enumerate(value.init_args)}
            parts = {**positional, **value.init_kwargs, **value.changed}
        elif isinstance(value, list):
            parts = {f"{what}[{i}] ({type(v).__name__})": v for i, v in enumerate(value)}
        check_picklable(parts)
        raise TypeError(f"The {what} cannot be serialized to send it to the Ray workers: {error}") from error


def show_progress(progress: Any):
    """An `on_event` for `WorkerSession.call` that feeds the driver's display."""
    def on_event(event: Any) -> None:
        if isinstance(event, ProgressEvent):
            progress.on_progress(event.step, event.max_steps)
        elif isinstance(event, LogEvent):
            progress.on_log(event.entry)
        elif isinstance(event, LogRecordEvent):
            log_on_driver(event)

    return on_event


def log_on_driver(event: LogRecordEvent) -> None:
    """The driver's side: the same logger, the same level (its `warning`, `info`, ... method is what is called)."""
    logger = logging.getLogger(event.name)
    method = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
              logging.CRITICAL: "critical"}.get(event.level)
    if method is None:
        logger.log(event.level, event.message)
    else:
        getattr(logger, method)(event.message)
