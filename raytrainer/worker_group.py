"""A warm Ray Train worker group: one long-lived `TorchTrainer.fit()` whose workers serve commands.

Starting a Ray Train run costs seconds (controller, placement group, worker processes, imports, process group);
a training step costs milliseconds. So a Trainer starts its worker group once and keeps it: every worker loops
on `CommandChannel.next_command`, runs the command (train, evaluate, predict) with `orchestration.run_command`,
and waits for the next one. Ray Train's failure handling stays in charge: when a worker dies mid-command, Ray
Train restarts the group and the new workers take the same command again, resuming from the latest checkpoint
that command reported.

The group is released by `close()`, by the Trainer's garbage collection, at driver exit, when another group
needs its resources while it is idle, and after `worker_idle_timeout` seconds without a command.
"""

from __future__ import annotations

import asyncio
import gc
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

from raytrainer.job import Command, TrainingJob
from raytrainer.orchestration import WorkerError, WorkerGroupSpec, put_job, run_command

logger = logging.getLogger(__name__)

REPORT_POLL_INTERVAL_S = 0.05
IDLE_CLEANUP_AFTER_S = 1.0  # workers collect garbage once they have waited this long for the next command


@ray.remote(num_cpus=0)
class CommandChannel:
    """The driver submits one command at a time; every worker takes it; rank 0 streams events and the result."""

    def __init__(self, idle_timeout_s: float | None):
        self.idle_timeout_s = idle_timeout_s
        self.pending: tuple[int, dict] | None = None
        self.last_seq = 0
        self.closed = False
        self.events: list = []
        self.checkpointed: dict[int, str] = {}
        self.cancelled: set[int] = set()
        self.last_active = time.monotonic()
        self.ready = False  # rank 0 asked for its first command: the workers are up
        self.failure: str | None = None  # why the Ray Train run failed (no command runs any more)
        self.changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:  # created inside the actor's event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def submit(self, payload: dict) -> int | None:
        """Queue a command for the workers; None when the group has stopped (closed, idle too long, failed)."""
        if self.closed or self.failure is not None:
            return None
        self.last_seq += 1
        self.pending, self.last_active = (self.last_seq, payload), time.monotonic()
        await self._notify()
        return self.last_seq

    async def next_command(self, after: int, wait_s: float | None = None) -> tuple[int, dict] | str | None:
        """The pending command newer than `after` (a restarted worker passes 0 and gets the one in flight);
        None tells the worker to exit: the group was closed or stayed idle for `idle_timeout_s`; "idle" when
        nothing came within `wait_s` seconds."""
        condition = self._condition()
        deadline = None if wait_s is None else time.monotonic() + wait_s
        async with condition:
            if not self.ready:
                self.ready = True
                condition.notify_all()
            while True:
                if self.closed:
                    return None
                if self.pending is not None and self.pending[0] > after:
                    return self.pending
                waits = []
                if deadline is not None:
                    waits.append(deadline - time.monotonic())
                if self.pending is None and self.idle_timeout_s is not None:
                    idle_left = self.idle_timeout_s - (time.monotonic() - self.last_active)
                    if idle_left <= 0:
                        self.closed = True
                        condition.notify_all()
                        return None
                    waits.append(idle_left)
                if deadline is not None and waits[0] <= 0:
                    return "idle"
                try:
                    await asyncio.wait_for(condition.wait(), timeout=min(waits) if waits else None)
                except asyncio.TimeoutError:
                    pass

    async def wait_ready(self) -> bool:
        """Wait until the workers are up (True), or the channel closed first (False)."""
        condition = self._condition()
        async with condition:
            await condition.wait_for(lambda: self.ready or self.closed)
            return self.ready

    async def push(self, event: tuple) -> None:
        self.events.append(event)
        await self._notify()

    async def finish(self, seq: int, packed: list) -> None:
        """Rank 0's result of command `seq` (`[ObjectRef]`, which the channel never unpickles): the command is done."""
        self.events.append(("result", seq, packed))
        if self.pending is not None and self.pending[0] == seq:
            self.pending = None
        self.last_active = time.monotonic()
        await self._notify()

    async def drain(self, wait_s: float) -> list:
        """The events so far, waiting up to `wait_s` for the first one."""
        condition = self._condition()
        async with condition:
            if not self.events:
                try:
                    await asyncio.wait_for(condition.wait_for(lambda: bool(self.events)), timeout=wait_s)
                except asyncio.TimeoutError:
                    pass
            events, self.events = self.events, []
            return events

    async def drain_for(self, seq: int, wait_s: float) -> list:
        """The events of command `seq` ("trial_result", "result"), waiting up to `wait_s` for one. Events of older
        commands and the Trainer's log/progress events are dropped; a newer command's stay. [("superseded",)]
        when a newer command was submitted (command `seq` was cancelled and handed over); [("stopped", why)]
        when the group failed."""
        def mine(event) -> bool:
            return event[0] in ("trial_result", "result") and event[1] == seq

        def take() -> list:
            kept = [e for e in self.events if e[0] in ("trial_result", "result") and e[1] > seq]
            taken = [e for e in self.events if mine(e)]
            self.events = kept
            return taken

        condition = self._condition()
        async with condition:
            if self.last_seq > seq:
                return [("superseded",)]
            if not any(mine(e) for e in self.events):
                try:
                    await asyncio.wait_for(condition.wait_for(
                        lambda: any(mine(e) for e in self.events) or self.last_seq > seq or self.failure is not None),
                        timeout=wait_s)
                except asyncio.TimeoutError:
                    pass
            taken = take()
            return taken if taken or self.failure is None else [("stopped", self.failure)]

    async def fail(self, why: str) -> None:
        self.failure = why
        await self._notify()

    async def close(self) -> None:
        self.closed = True
        await self._notify()

    async def set_idle_timeout(self, idle_timeout_s: float | None) -> None:
        self.idle_timeout_s, self.last_active = idle_timeout_s, time.monotonic()
        await self._notify()  # a worker waiting for a command recomputes its deadline

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)

    def is_cancelled(self, seq: int) -> bool:
        return seq in self.cancelled

    def note_checkpoint(self, seq: int, path: str | None = None) -> None:
        """Command `seq` saved a checkpoint: at `path`, or (None) the one it reported to Ray Train."""
        self.checkpointed[seq] = path or ""

    def checkpoint_of(self, seq: int) -> str | None:
        """None when command `seq` saved no checkpoint yet; else its path, or "" for Ray Train's latest."""
        return self.checkpointed.get(seq)


def serve_commands(config: dict) -> None:
    """The Ray Train worker function: take commands from the channel until it says stop."""
    from raytrainer.orchestration import prepare_worker

    channel = config["channel"]
    rank = prepare_worker(config)
    done = 0
    while True:
        try:
            item = ray.get(channel.next_command.remote(done, IDLE_CLEANUP_AFTER_S))
            if item == "idle":  # a full garbage collection takes a few tenths of a second: only when idle
                _free_memory(config)
                item = ray.get(channel.next_command.remote(done))
        except ray.exceptions.RayActorError:
            return  # the channel is gone (its driver ended): nothing more will come
        if item is None:
            return
        seq, payload = item
        if "trial" in payload:  # a hyperparameter-search trial (see raytrainer.trial_worker)
            from raytrainer.trial_worker import trial_command

            job, command, reporting = trial_command(ray.get(payload["job"]), ray.get(payload["trial"]), channel, seq)
        else:
            job, command, reporting = ray.get(payload["job"]), ray.get(payload["command"]), None
        run_command(job, command, seq, channel, rank, config, reporting)
        done = seq


def _free_memory(config: dict) -> None:
    """Free what the last command left in reference cycles (models, optimizers, CUDA blocks)."""
    gc.collect()
    if config.get("use_gpu"):
        import torch

        torch.cuda.empty_cache()


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
        # The Train controller collects worker reports when it polls them (default every 2 s) and a worker's next
        # report waits for the previous one to be collected: poll often, so evaluations and checkpoints cost no
        # idle seconds. Ray Train passes the setting on to the controller it starts.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(REPORT_POLL_INTERVAL_S))
        self.channel = CommandChannel.options(max_concurrency=1000).remote(self.idle_timeout_s)
        config = {"channel": self.channel, "persist_checkpoints": spec.storage_path is not None,
                  "driver_threads": os.environ.get("OMP_NUM_THREADS"), "use_gpu": spec.use_gpu}
        run_config = RunConfig(
            name=self.run_name or f"raytrainer-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=spec.storage_path, failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=self.save_total_limit if spec.storage_path is not None else None))
        trainer = TorchTrainer(
            serve_commands, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                         resources_per_worker=spec.resources_per_worker,
                                         placement_strategy=spec.placement_strategy),
            torch_config=TorchConfig(backend=spec.backend, timeout_s=spec.timeout_s),
            run_config=run_config, datasets=self.ray_datasets)

        channel = self.channel

        def fit():
            try:
                self.outcome["result"] = trainer.fit()
            except BaseException as error:  # reported by run() on the driver's main thread
                self.outcome["error"] = error
                try:  # and to whoever else waits on the channel (search trials)
                    channel.fail.remote(str(WorkerError.from_ray(error)))
                except Exception:  # noqa: BLE001 - Ray is shutting down
                    pass

        self.thread = threading.Thread(target=fit, name="raytrainer-workers", daemon=True)
        self.thread.start()
        _LIVE_GROUPS.add(self)

    def set_idle_timeout(self, idle_timeout_s: float | None) -> None:
        self.idle_timeout_s = idle_timeout_s
        if self.channel is not None:
            ray.get(self.channel.set_idle_timeout.remote(idle_timeout_s))

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def close(self, timeout_s: float = 60.0) -> None:
        """Let the workers exit and wait for Ray Train to release them."""
        _LIVE_GROUPS.discard(self)
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
    def run(self, job: TrainingJob, command: Command, on_event: Callable[[tuple], None]) -> dict:
        """Run `command` on the workers; return rank 0's packed result. Raises `WorkerStopped` when the group
        stopped before taking the command (idle timeout), so that the caller starts a fresh one."""
        if self.channel is None or not self.alive:
            raise WorkerStopped("The worker group is not running.")
        self.busy, self.last_used = True, time.monotonic()
        try:
            # The channel passes the command on without unpickling it (that would import torch and transformers
            # into the channel's process): an object reference inside a list stays a reference.
            payload = {"job": put_job(job), "command": ray.put(command)}
            seq = ray.get(self.channel.submit.remote(payload))
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

    def _wait_for_result(self, seq: int, on_event: Callable[[tuple], None]) -> dict:
        while True:
            finished = not self.alive
            for event in ray.get(self.channel.drain.remote(0.0 if finished else 0.5)):
                if event[0] == "result":
                    if event[1] == seq:
                        return ray.get(event[2][0])
                else:
                    on_event(event)
            if finished:
                break
        if "error" in self.outcome:
            raise WorkerError.from_ray(self.outcome["error"]) from self.outcome["error"]
        raise RuntimeError("The Ray Train workers exited without sending a result; see the worker logs above.")


class WorkerStopped(RuntimeError):
    """The warm worker group had already stopped (closed or idle timeout)."""


# ---------------------------------------------------------------------------------------------- registry
_LIVE_GROUPS: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


def _make_room(spec: WorkerGroupSpec, exclude: WorkerGroup | None = None) -> None:
    """Close idle warm groups of this driver, least recently used first, while the cluster lacks the
    resources for `spec` (other Trainers' idle workers must not block a new group)."""
    idle = sorted((g for g in list(_LIVE_GROUPS) if g is not exclude and not g.busy), key=lambda g: g.last_used)
    for group in idle:
        if _fits_now(spec):
            return
        logger.info("Releasing an idle worker group to make room for a new one.")
        group.close()
        _wait_for_release(spec)


def _fits_now(spec: WorkerGroupSpec) -> bool:
    available = ray.available_resources()
    return all(available.get(name, 0) + 1e-9 >= amount * spec.num_workers
               for name, amount in spec.resources_per_worker.items())


def _wait_for_release(spec: WorkerGroupSpec, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _fits_now(spec):
        time.sleep(0.1)


def close_all_worker_groups(idle_only: bool = False, keep: WorkerGroup | None = None) -> None:
    """Release every warm worker group of this driver (at exit, for tests), or every idle one but `keep`."""
    for group in list(_LIVE_GROUPS):
        if not (idle_only and group.busy) and group is not keep:
            group.close()


def _register_exit_hook() -> None:
    import atexit

    atexit.register(close_all_worker_groups)  # registered after orchestration's: runs before Ray shuts down


_register_exit_hook()
