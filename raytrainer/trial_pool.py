"""The warm worker groups of one hyperparameter search, lent to its trials one at a time.

The driver owns the groups (`SearchGroups`, like a Trainer owns its warm group); trials borrow one through a light
actor (`GroupLender`), train on it, and give it back, so a trial costs its training steps instead of a Ray Train
start-up. The search adopts the Trainer's warm group when it has one and hands a group back to the Trainer at the
end (a later `train()` starts at once). Groups start one at a time, a new one only when trials wait for a group
and none came free for a few seconds: parallel start-ups slow each other down, and short trials are served
faster by the running groups than by a new one.
A failed group is replaced; groups fed by Ray Data streams are replaced after every trial (a stream is read once
per Ray Train run). A Tune callback on the driver drives all this and takes a group back from a trial Tune
stopped, paused or lost, cancelling its command, even when the trial's actor is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import ray

TICK_INTERVAL_S = 0.2
# Start one more group only when trials have waited this long without any group coming free: short trials then
# share the running groups (a Ray Train start-up costs ~10-30 s), long ones get parallel groups.
MORE_GROUPS_AFTER_S = 5.0


@ray.remote(num_cpus=0)
class GroupLender:
    """Lends the search's groups (by their command channels) to trials: `acquire`, `submit`, `release`."""

    def __init__(self, one_shot: bool):
        self.one_shot = one_shot  # a group is replaced after each loan (Ray Data streams)
        self.channels: dict[int, Any] = {}
        self.free: list[int] = []
        self.loans: dict[int, list] = {}  # loan -> [group index, trial_id, seq of its command or None]
        self.loan_ids = itertools.count()
        self.waiting = 0
        self.last_progress = time.monotonic()  # when a group was last lent or added
        self.returned: list[int] = []  # one-shot groups back from a loan, to be replaced by the driver
        self.error: str | None = None
        self.changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:  # created inside the actor's event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def acquire(self, trial_id: str) -> tuple[int, Any]:
        """Lend a group to `trial_id`, waiting for a free one: the loan's id and the group's channel."""
        condition = self._condition()
        async with condition:
            self.waiting += 1
            try:
                await condition.wait_for(lambda: bool(self.free) or self.error is not None)
            finally:
                self.waiting -= 1
            if self.error is not None:
                raise RuntimeError(self.error)
            index = self.free.pop(0)
            self.last_progress = time.monotonic()
            loan = next(self.loan_ids)
            self.loans[loan] = [index, trial_id, None]
            return loan, self.channels[index]

    async def submit(self, loan: int, payload: dict) -> int | None:
        """Queue the trial's command on the lent group; None when the loan was already taken back."""
        if loan not in self.loans:
            return None
        index = self.loans[loan][0]
        seq = await self.channels[index].submit.remote(payload)
        if loan in self.loans:
            self.loans[loan][2] = seq
        return seq

    async def release(self, loan: int, failed: bool = False) -> None:
        """The trial is done with its group; `failed`: the group's Ray Train run failed, lend it no more."""
        if failed and loan in self.loans:
            self.withdraw(self.loans[loan][0])
        await self._take_back(loan)

    async def end_trial(self, trial_id: str) -> None:
        """Tune ended the trial (stopped, paused, failed): cancel its command and take its group back."""
        for loan, (index, holder, seq) in list(self.loans.items()):
            if holder == trial_id:
                if seq is not None and index in self.channels:
                    self.channels[index].cancel.remote(seq)
                await self._take_back(loan)

    async def _take_back(self, loan: int) -> None:
        if loan not in self.loans:
            return
        index = self.loans.pop(loan)[0]
        if index not in self.channels:
            return  # withdrawn meanwhile (its group failed)
        if self.one_shot:
            self.returned.append(index)
            del self.channels[index]
            return
        async with self._condition():
            self.free.append(index)
            self._condition().notify_all()

    async def add(self, index: int, channel: Any) -> None:
        async with self._condition():
            self.last_progress = time.monotonic()
            self.channels[index] = channel
            self.free.append(index)
            self._condition().notify_all()

    def withdraw(self, index: int) -> None:
        """The driver saw the group fail: lend it no more."""
        self.channels.pop(index, None)
        if index in self.free:
            self.free.remove(index)

    async def fail(self, error: str) -> None:
        """No group can start: every waiting and later trial fails with `error`."""
        async with self._condition():
            self.error = error
            self._condition().notify_all()

    def status(self) -> tuple[int, bool, list[int]]:
        """How many trials wait for a group; whether they waited `MORE_GROUPS_AFTER_S` without any group being lent
        or added (so another group would pay off); the one-shot groups returned since the last call."""
        returned, self.returned = self.returned, []
        starved = self.waiting > 0 and time.monotonic() - self.last_progress > MORE_GROUPS_AFTER_S
        return self.waiting, starved, returned


class SearchGroups:
    """The driver's side: starts, replaces and finally releases the search's worker groups."""

    def __init__(self, spec: Any, size: int, ray_datasets: dict | None, adopted: Any | None = None):
        self.spec, self.size, self.ray_datasets = spec, size, ray_datasets or None
        self.lender = GroupLender.options(max_concurrency=1000).remote(one_shot=bool(self.ray_datasets))
        self.groups: dict[int, Any] = {}
        self.starting: tuple[int, ray.ObjectRef] | None = None
        self.ever_ready = self.failed = False
        self.last_tick = 0.0
        if adopted is not None and adopted.alive:
            self.groups[0] = adopted
            self.lender.add.remote(0, adopted.channel)
            self.ever_ready = True
        else:
            self._start(0)

    def _start(self, index: int) -> None:
        from raytrainer.worker_group import WorkerGroup

        group = WorkerGroup(self.spec, idle_timeout_s=None, ray_datasets=self.ray_datasets,
                            run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}-{index}")
        group.start(make_room=False)  # the driver made room for the search before it began
        self.groups[index] = group
        self.starting = (index, group.channel.wait_ready.remote())

    def tick(self) -> None:
        """Called from Tune's loop: admit a group that came up, replace failed ones, start one more on demand."""
        now = time.monotonic()
        if now - self.last_tick < TICK_INTERVAL_S:
            return
        self.last_tick = now
        if self.starting is not None:
            index, ready = self.starting
            if ray.wait([ready], timeout=0)[0]:
                self.starting = None
                if ray.get(ready):
                    self.ever_ready = True
                    # Waited for: an async actor may run the next call (status) before this one.
                    ray.get(self.lender.add.remote(index, self.groups[index].channel))
        for index, group in list(self.groups.items()):
            if not group.alive:
                if self.starting is not None and self.starting[0] == index:
                    self.starting = None
                self._drop_failed(index, group)
        waiting, starved, returned = ray.get(self.lender.status.remote())
        for index in returned:  # one-shot groups (Ray Data): a fresh run for the next trial
            self.groups.pop(index).close(timeout_s=0)
        if self.starting is None and not self.failed and (starved or (waiting and not self.groups)):
            missing = [i for i in range(self.size) if i not in self.groups]
            if missing:
                self._start(missing[0])

    def _drop_failed(self, index: int, group: Any) -> None:
        """Lend a failed group no more (a new one starts when trials wait); fail the search if none ever ran."""
        self.lender.withdraw.remote(index)
        del self.groups[index]
        group.close(timeout_s=0)
        if not self.ever_ready and not self.groups:  # nothing ever started: starting again would fail again
            self.failed = True
            error = group.outcome.get("error")
            self.lender.fail.remote(f"The search's Ray Train workers failed to start: {error}")

    def close(self, keep_one: bool) -> Any | None:
        """Release the groups; with `keep_one`, return one running group (for the Trainer) instead."""
        kept = None
        for index, group in sorted(self.groups.items()):
            if keep_one and kept is None and group.alive and not self.ray_datasets and (
                    self.starting is None or self.starting[0] != index):
                kept = group
            else:
                group.close(timeout_s=0 if self.starting and self.starting[0] == index else 60)
        ray.kill(self.lender)
        return kept


def tune_callback(groups: SearchGroups) -> Any:
    """A Tune callback that keeps the groups going and takes a group back from every trial that stopped running."""
    from ray import tune

    class SearchGroupsCallback(tune.Callback):
        def __init__(self):
            self.running: set[str] = set()

        def on_step_end(self, iteration, trials, **info):
            running = {trial.trial_id for trial in trials if trial.status == "RUNNING"}
            for trial_id in self.running - running:
                groups.lender.end_trial.remote(trial_id)
            self.running = running
            groups.tick()

    return SearchGroupsCallback()
