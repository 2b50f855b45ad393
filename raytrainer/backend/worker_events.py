"""The callback raytrainer adds to the Trainer on each worker: what transformers' loop tells the outside world.

Logs and progress go to the driver (rank 0), every saved checkpoint is reported (fault tolerance, search trials),
and a call the driver gave up on (Ctrl-C, a search trial Tune stopped) ends at the next step on every rank at once.
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

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rank == 0:
            self.channel.push.remote(ProgressEvent(state.global_step, state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self.rank == 0 and (now - self.last_progress > PROGRESS_INTERVAL_S or state.global_step >= state.max_steps):
            self.last_progress = now
            self.channel.push.remote(ProgressEvent(state.global_step, state.max_steps))
        if self._cancelled():
            control.should_training_stop = True

    # ------------------------------------------------------------------ checkpoints
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.last_metrics = dict(metrics or {})

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        metrics = {**self.last_metrics, "step": state.global_step, "epoch": state.epoch}
        self.last_metrics = {}
        self.reporter.report(metrics, folder if os.path.isdir(folder) else None)

    # ------------------------------------------------------------------ cancellation
    def _cancelled(self) -> bool:
        """Whether to stop now, the same answer on every rank (a rank stopping alone would hang the others)."""
        if self.rank == 0 and not self.cancel_seen:
            self._poll_cancellation()
        if self.world_size == 1 or not dist.is_initialized():
            return self.cancel_seen
        flag = torch.tensor([1.0 if self.cancel_seen else 0.0], device=_collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

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
