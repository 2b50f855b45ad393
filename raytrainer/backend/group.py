"""A warm Ray Train worker group: one long-lived `TorchTrainer.fit()` whose workers serve commands.

Starting a Ray Train run costs seconds (controller, placement group, worker processes, imports, process group);
a training step costs milliseconds. So a Trainer starts its worker group once and keeps it: every worker loops on
the group's `CommandChannel` (`backend.worker.serve_commands`), builds the user's Trainer for each command, runs
it, and waits for the next one. Ray Train's failure handling stays in charge: when a worker dies mid-command, Ray
Train restarts the group and the new workers take the same command again, resuming from the latest checkpoint that
command reported.

The group is released by `close()`, by its Trainer's garbage collection, at driver exit, when another group needs
its resources while it is idle, and after `worker_idle_timeout` seconds without a command.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any, Callable

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raytrainer.backend.channel import CommandChannel, CommandFinished, CommandRequest
from raytrainer.backend.cluster import WorkerGroupSpec, is_embedded_ray, on_driver_node
from raytrainer.backend.embedded_train_run import TorchTrainerInEmbeddedRay
from raytrainer.backend.worker import serve_commands

logger = logging.getLogger(__name__)

# The Train controller collects worker reports when it polls them (default every 2 s) and a worker's next report
# waits for the previous one to be collected: poll often, so checkpoints cost no idle seconds.
REPORT_POLL_INTERVAL_S = 0.05
PRINT_PATCH_SETTING = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # Ray Train's switch for its workers' `print` (see `start`)


class WorkerError(RuntimeError):
    """A failure inside the Ray Train workers, with the worker's own error message first."""

    @classmethod
    def from_ray(cls, error: BaseException) -> BaseException:
        if isinstance(error, KeyboardInterrupt):
            return error
        cause = error
        for attribute in ("worker_failures", "errors"):
            failures = getattr(error, attribute, None)
            if failures:
                cause = next(iter(failures.values())) if isinstance(failures, dict) else failures[0]
                break
        return cls(f"Training failed on the Ray Train workers: {str(cause).strip()}")


class WorkerStopped(RuntimeError):
    """The warm worker group had already stopped (closed or idle timeout)."""


class WorkerGroup:
    """The driver's handle on one warm worker group (a `TorchTrainer.fit()` running in a driver thread)."""

    def __init__(self, spec: WorkerGroupSpec, *, idle_timeout_s: float | None, save_total_limit: int | None = None,
                 ray_datasets: dict | None = None, run_name: str | None = None):
        self.spec, self.idle_timeout_s = spec, idle_timeout_s
        self.save_total_limit, self.ray_datasets = save_total_limit, ray_datasets or None
        self.run_name = run_name
        self.channel = None
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}
        self.busy = False
        self.current_seq: int | None = None
        self.last_used = time.monotonic()

    # ------------------------------------------------------------------ life cycle
    def start(self, make_room: bool = True) -> None:
        spec = self.spec
        if make_room:
            _make_room(spec, exclude=self)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_INTERVAL_S))
        # Ray Train replaces `print` in its workers with one that also logs every line to the root logger, even a
        # line printed into a stream a library swapped in to capture it (dill's `detect.nestedglobals`, which
        # datasets' fingerprinting runs while TRL prepares a dataset, captures `dis.dis` output that way: ~1,200
        # lines of bytecode on the driver's console). raytrainer tags the workers' output itself
        # (`backend.worker_logs`): `print` stays Python's own. Ray Train passes this setting on to its workers.
        os.environ.setdefault(PRINT_PATCH_SETTING, "0")
        self.channel = CommandChannel.options(max_concurrency=1000, scheduling_strategy=on_driver_node()).remote(
            self.idle_timeout_s)
        config = {"channel": self.channel, "persist_checkpoints": spec.storage_path is not None,
                  "driver_threads": os.environ.get("OMP_NUM_THREADS"), "use_gpu": spec.use_gpu}
        run_config = RunConfig(
            name=self.run_name or f"raytrainer-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=spec.storage_path, failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=self.save_total_limit if spec.storage_path is not None else None))
        trainer_class = TorchTrainerInEmbeddedRay if is_embedded_ray() else TorchTrainer
        trainer = trainer_class(
            serve_commands, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                         resources_per_worker=spec.resources,
                                         placement_strategy=spec.placement_strategy),
            torch_config=TorchConfig(backend=spec.backend, timeout_s=spec.timeout_s),
            run_config=run_config, datasets=self.ray_datasets)
        channel = self.channel

        def fit():
            try:
                self.outcome["result"] = trainer.fit()
            except BaseException as error:  # reported by run() on the driver's main thread
                self.outcome["error"] = error
                try:  # and to whoever else waits on the channel (search trials); not once Ray shut down, where
                    if ray.is_initialized():  # a call would start a new local Ray
                        channel.fail.remote(str(WorkerError.from_ray(error)))
                except Exception:  # noqa: BLE001 - Ray is shutting down
                    pass

        self.thread = threading.Thread(target=fit, name="raytrainer-workers", daemon=True)
        self.thread.start()
        _live_groups.add(self)

    def set_idle_timeout(self, idle_timeout_s: float | None) -> None:
        self.idle_timeout_s = idle_timeout_s
        if self.channel is not None:
            ray.get(self.channel.set_idle_timeout.remote(idle_timeout_s))

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def close(self, timeout_s: float = 60.0) -> None:
        """Let the workers exit and wait for Ray Train to release them."""
        _live_groups.discard(self)
        channel, self.channel = self.channel, None
        if channel is None:
            return
        try:
            ray.get(channel.close.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - Ray already shut down or the channel died with its owner
            pass
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout_s)
        if self.thread is not None and self.thread.is_alive():
            return  # workers still finish a command: they exit when they next ask the (closed) channel
        try:
            ray.kill(channel)
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ commands
    def run(self, request: CommandRequest, on_event: Callable[[Any], None]) -> Any:
        """Run one command on the workers; return rank 0's `CommandResult`. Raises `WorkerStopped` when the group
        stopped before taking the command (idle timeout), so that the caller starts a fresh one."""
        if self.channel is None or not self.alive:
            raise WorkerStopped("The worker group is not running.")
        self.busy, self.last_used = True, time.monotonic()
        try:
            seq = ray.get(self.channel.submit.remote(request))
            if seq is None:
                raise WorkerStopped("The worker group stopped after its idle timeout.")
            self.current_seq = seq
            return self._wait_for_result(seq, on_event)
        except WorkerStopped:
            raise
        except BaseException:
            try:  # interrupted (Ctrl-C): training stops at its next step instead of running on unseen
                self.cancel()
            except Exception:  # noqa: BLE001 - the group already failed
                pass
            self.close(timeout_s=0)  # a failed or interrupted command leaves no half-used group behind
            raise
        finally:
            self.busy, self.last_used = False, time.monotonic()

    def cancel(self) -> None:
        """Ask the workers to end the command in flight early (training stops at its next step)."""
        channel, seq = self.channel, self.current_seq
        if channel is not None and seq is not None:
            ray.get(channel.cancel.remote(seq))

    def _wait_for_result(self, seq: int, on_event: Callable[[Any], None]) -> Any:
        while True:
            finished = not self.alive
            for event in ray.get(self.channel.drain.remote(0.0 if finished else 0.5)):
                if isinstance(event, CommandFinished):
                    if event.seq == seq:
                        return ray.get(event.result[0])
                else:
                    on_event(event)
            if finished:
                break
        if "error" in self.outcome:
            raise WorkerError.from_ray(self.outcome["error"]) from self.outcome["error"]
        raise RuntimeError("The Ray Train workers exited without sending a result; see the worker logs above.")


# ---------------------------------------------------------------------------------------------- registry
_live_groups: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


def _make_room(spec: WorkerGroupSpec, exclude: WorkerGroup | None = None) -> None:
    """Close idle warm groups of this driver, least recently used first, while the cluster lacks the resources
    for `spec` (other Trainers' idle workers must not block a new group)."""
    idle = sorted((g for g in list(_live_groups) if g is not exclude and not g.busy), key=lambda g: g.last_used)
    available, held = ray.available_resources(), {}
    for group in idle:
        for name, amount in group.spec.total().items():
            held[name] = held.get(name, 0) + amount
    if any(available.get(name, 0) + held.get(name, 0) + 1e-9 < amount for name, amount in spec.total().items()):
        return  # what is missing is not held by idle groups (it waits for the cluster to grow): keep them warm
    for group in idle:
        if _fits_now(spec):
            return
        logger.info("Releasing an idle worker group to make room for a new one.")
        group.close()
        _wait_for_release(spec)


def _fits_now(spec: WorkerGroupSpec) -> bool:
    available = ray.available_resources()
    return all(available.get(name, 0) + 1e-9 >= amount for name, amount in spec.total().items())


def _wait_for_release(spec: WorkerGroupSpec, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _fits_now(spec):
        time.sleep(0.1)


def close_all_worker_groups(idle_only: bool = False, keep: WorkerGroup | None = None) -> None:
    """Release every warm worker group of this driver (at exit, for tests), or every idle one but `keep`."""
    for group in list(_live_groups):
        if not (idle_only and group.busy) and group is not keep:
            group.close()


def _register_exit_hook() -> None:
    import atexit

    atexit.register(close_all_worker_groups)  # registered after cluster's: runs before Ray shuts down


_register_exit_hook()
