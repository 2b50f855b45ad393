"""The callback raytrainer adds to the Trainer on each worker: what transformers' loop tells the outside world.

Logs and progress go to the driver (rank 0), every saved checkpoint is reported (fault tolerance, search trials),
and a call the driver gave up on (Ctrl-C, a search trial Tune stopped) ends at the next step on every rank at once.

Every rank also takes the same `TrainerControl` decisions. transformers' Trainer reads `control` on each process
and never compares them, so a user callback that sets a flag on one rank only (a rank-local metric, a file only one
node sees) makes that rank stop, save, evaluate or log -- each but stopping runs collectives -- while the other ranks
do something else, and all of them wait for each other until the process-group timeout (30 minutes). Here the flags
are combined across ranks with a logical OR after the hooks transformers calls on every rank at the same point of
its loop (`on_step_end`, `on_substep_end`, `on_epoch_end`, `on_evaluate`, `on_save`): a decision any rank makes there
is made by every rank, at the same step (accelerate's `set_trigger`/`check_trigger` make the same choice for early
stopping). This callback is the last one on the Trainer, so it sees what the user's callbacks decided. `on_log` is
left out: a Trainer may log on one rank only, and a collective there would hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator

import ray
import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from raytrainer.backend.channel import LogEvent, LogRecordEvent, ProgressEvent
from raytrainer.backend.reporting import CheckpointReporter

PROGRESS_INTERVAL_S = 0.2
CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


class WorkerEvents(TrainerCallback):
    """Relays one command's events; runs on every rank (transformers calls callbacks on every process)."""

    def __init__(self, channel: Any, seq: int, rank: int, world_size: int, reporter: CheckpointReporter):
        self.channel, self.seq, self.rank, self.world_size = channel, seq, rank, world_size
        self.reporter = reporter
        self.last_progress = 0.0
        self.cancel_answer = None  # the channel's answer to "was this command cancelled?", asked without waiting
        self.cancel_seen = False
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ driver display
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.rank == 0 and logs is not None:
            self.channel.push.remote(LogEvent({**logs, "step": state.global_step}))
        # No `_agree` here: a Trainer subclass may call `self.log(...)` on rank 0 only (transformers allows it), and
        # a collective in on_log would then wait forever. A flag set in on_log is combined at the next agreeing hook.

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rank == 0:
            self.channel.push.remote(ProgressEvent(state.global_step, state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self.rank == 0 and (now - self.last_progress > PROGRESS_INTERVAL_S or state.global_step >= state.max_steps):
            self.last_progress = now
            self.channel.push.remote(ProgressEvent(state.global_step, state.max_steps))
        if self.rank == 0 and not self.cancel_seen:
            self._poll_cancellation()
        if self._agree(control, cancel=self.cancel_seen):
            control.should_training_stop = True

    def on_substep_end(self, args, state, control, **kwargs):  # a stop between accumulation steps
        self._agree(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._agree(control)

    # ------------------------------------------------------------------ checkpoints
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_metrics = dict(metrics or {})
        self._agree(control)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        metrics = {**self.last_metrics, "step": state.global_step, "epoch": state.epoch}
        self.last_metrics = {}
        self.reporter.report(metrics, folder if os.path.isdir(folder) else None)
        self._agree(control)

    # ------------------------------------------------------------------ one decision on every rank
    def _agree(self, control, cancel: bool = False) -> bool:
        """OR each of `control`'s flags (and `cancel`) across ranks, in place; returns the combined `cancel`.
        One all-reduce of a few numbers; every rank calls the same hooks in the same order, so they pair up."""
        if self.world_size == 1 or not dist.is_initialized():
            return cancel
        flags = torch.tensor([float(cancel)] + [float(getattr(control, name)) for name in CONTROL_FLAGS],
                             device=_collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        combined = [bool(value) for value in flags.tolist()]
        for name, value in zip(CONTROL_FLAGS, combined[1:]):
            setattr(control, name, value)
        return combined[0]

    # ------------------------------------------------------------------ cancellation
    def _poll_cancellation(self) -> None:
        """Ask the channel without waiting; the previous question's answer is read now, if it came."""
        if self.cancel_answer is not None:
            ready, _ = ray.wait([self.cancel_answer], timeout=0)
            if not ready:
                return
            self.cancel_seen = ray.get(self.cancel_answer)
        self.cancel_answer = self.channel.is_cancelled.remote(self.seq)


def _collective_device() -> torch.device:
    """Where the default process group's tensors live: the current GPU with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _ToDriver(logging.Handler):
    """Sends transformers' log records to the driver, which logs them with the same logger."""

    def __init__(self, channel: Any):
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.push.remote(LogRecordEvent(record.name, record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - never let logging break training
            self.handleError(record)


@contextlib.contextmanager
def transformers_logs_to_driver(channel: Any, rank: int) -> Iterator[None]:
    """For one command, rank 0's transformers log records go to the driver (where an in-process Trainer would log
    them, so the user's logging set-up and log captures see them) instead of this worker's stderr."""
    if rank != 0:
        yield
        return
    from transformers.utils import logging as transformers_logging

    library_logger = transformers_logging.get_logger("transformers")
    own = list(library_logger.handlers)
    handler = _ToDriver(channel)
    for existing in own:
        library_logger.removeHandler(existing)
    library_logger.addHandler(handler)
    try:
        yield
    finally:
        library_logger.removeHandler(handler)
        for existing in own:
            library_logger.addHandler(existing)
