"""Driver <-> workers: the command channel actor of one warm worker group, and the typed messages it carries.

The driver submits one command at a time; every worker takes it; rank 0 streams events (logs, progress, search
results) and finally the command's result. A worker restarted by Ray Train asks again and gets the command still
in flight, with the checkpoint that command reported last. The channel never unpickles what a command or a result
holds (object references inside lists stay references), so its process imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import ray


# ---------------------------------------------------------------------------------------------- messages
@dataclass
class CommandRequest:
    """One call of the driver: how to build the Trainer, the driver's callbacks, and what to run. Each part is a
    one-element list holding an ObjectRef (put once, fetched by each worker)."""

    recipe: list
    callbacks: list
    command: list


@dataclass
class PendingCommand:
    """What a worker gets from `next_command`: the command numbered `seq`."""

    seq: int
    request: CommandRequest


@dataclass(frozen=True)
class Idle:
    """`next_command` found nothing within its wait."""


@dataclass
class LogEvent:
    """Rank 0 logged `entry` (what transformers' `Trainer.log` records, with "step")."""

    entry: dict


@dataclass
class LogRecordEvent:
    """transformers logged `message` on rank 0 with logger `name` at `level` (the driver logs it the same way)."""

    name: str
    level: int
    message: str


@dataclass
class ProgressEvent:
    """Rank 0 finished optimizer step `step` of `max_steps`."""

    step: int
    max_steps: int


@dataclass
class TrialReport:
    """Rank 0 of a search trial evaluated: one Tune result of command `seq`."""

    seq: int
    result: dict


@dataclass
class CommandFinished:
    """Command `seq` is done; `result` is [ObjectRef] of its `CommandResult` (None for a search trial)."""

    seq: int
    result: list


@dataclass(frozen=True)
class Superseded:
    """A newer command was submitted: the one waited for was cancelled and its group handed on."""


@dataclass(frozen=True)
class GroupStopped:
    """The worker group's Ray Train run failed: no command runs any more."""

    why: str


# ---------------------------------------------------------------------------------------------- the actor
@ray.remote(num_cpus=0)
class CommandChannel:
    """Commands from the driver to every worker of a group, events and results back from rank 0."""

    def __init__(self, idle_timeout_s: float | None):
        self.idle_timeout_s = idle_timeout_s
        self.pending: PendingCommand | None = None
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

    async def submit(self, request: CommandRequest) -> int | None:
        """Queue a command for the workers; None when the group has stopped (closed, idle too long, failed)."""
        if self.closed or self.failure is not None:
            return None
        self.last_seq += 1
        self.pending, self.last_active = PendingCommand(self.last_seq, request), time.monotonic()
        await self._notify()
        return self.last_seq

    async def next_command(self, after: int, wait_s: float | None = None) -> PendingCommand | Idle | None:
        """The pending command newer than `after` (a restarted worker passes 0 and gets the one in flight);
        None tells the worker to exit (the group was closed or stayed idle for `idle_timeout_s`); Idle when
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
                if self.pending is not None and self.pending.seq > after:
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
                    return Idle()
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

    async def push(self, event: Any) -> None:
        self.events.append(event)
        await self._notify()

    async def finish(self, seq: int, result: list) -> None:
        """Rank 0's result of command `seq`: the command is done."""
        self.events.append(CommandFinished(seq, result))
        if self.pending is not None and self.pending.seq == seq:
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
        """The TrialReport/CommandFinished events of command `seq`, waiting up to `wait_s` for one. Events of older
        commands and the Trainer's log/progress events are dropped; a newer command's stay. [Superseded()] when a
        newer command was submitted; [GroupStopped(why)] when the group failed."""
        def mine(event) -> bool:
            return isinstance(event, (TrialReport, CommandFinished)) and event.seq == seq

        def take() -> list:
            kept = [e for e in self.events if isinstance(e, (TrialReport, CommandFinished)) and e.seq > seq]
            taken = [e for e in self.events if mine(e)]
            self.events = kept
            return taken

        condition = self._condition()
        async with condition:
            if self.last_seq > seq:
                return [Superseded()]
            if not any(mine(e) for e in self.events):
                try:
                    await asyncio.wait_for(condition.wait_for(
                        lambda: any(mine(e) for e in self.events) or self.last_seq > seq or self.failure is not None),
                        timeout=wait_s)
                except asyncio.TimeoutError:
                    pass
            taken = take()
            return taken if taken or self.failure is None else [GroupStopped(self.failure)]

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

    def note_checkpoint(self, seq: int, location: str) -> None:
        """Command `seq` saved a checkpoint at `location` (a path, or a URI of storage_path)."""
        self.checkpointed[seq] = location

    def checkpoint_of(self, seq: int) -> str | None:
        """Where command `seq` saved its latest checkpoint; None when it saved none yet."""
        return self.checkpointed.get(seq)
