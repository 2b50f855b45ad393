"""The warm worker groups of one hyperparameter search, lent to its trials one at a time.

The driver owns the groups (`SearchGroups`, like a Trainer owns its warm group); trials borrow one through a light
actor (`GroupLender`, kept for the driver's next search), train on it, and give it back, so a trial costs its
training steps instead of a Ray Train start-up. Tune runs one trial at a time until a trial holds its group for a
few seconds (`TrialConcurrency`): each trial actor is a new process, and short trials gain nothing from more of
them. The search adopts the Trainer's warm group when it has one and hands a group back to the Trainer at the
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
        self.loan_ids = itertools.count()  # never restarts: a loan of an earlier search matches no later one
        self.changed: asyncio.Condition | None = None
        self.reset(one_shot)

    def reset(self, one_shot: bool) -> None:
        """Serve a new search (a lender outlives its search, so the next one starts no new actor process)."""
        self.one_shot = one_shot  # a group is replaced after each loan (Ray Data streams)
        self.channels: dict[int, Any] = {}
        self.free: list[int] = []
        # loan -> [group index, trial_id, seq of its command or None, when it was lent]
        self.loans: dict[int, list] = {}
        self.waiting = 0
        self.last_progress = time.monotonic()  # when a group was last lent or added
        self.returned: list[int] = []  # one-shot groups back from a loan, to be replaced by the driver
        self.error: str | None = None

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
            self.loans[loan] = [index, trial_id, None, self.last_progress]
            return loan, self.channels[index]

    async def submit(self, loan: int, request: Any) -> int | None:
        """Queue the trial's command on the lent group; None when the loan was already taken back."""
        if loan not in self.loans:
            return None
        index = self.loans[loan][0]
        seq = await self.channels[index].submit.remote(request)
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
        for loan, (index, holder, seq, _) in list(self.loans.items()):
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

    def status(self) -> tuple[int, bool, bool, list[int]]:
        """How many trials wait for a group; whether they waited `MORE_GROUPS_AFTER_S` without any group being lent
        or added (so another group would pay off); whether a trial has held its group that long (trials are long:
        more of them side by side would pay off); the one-shot groups returned since the last call."""
        returned, self.returned = self.returned, []
        now = time.monotonic()
        starved = self.waiting > 0 and now - self.last_progress > MORE_GROUPS_AFTER_S
        long_trials = any(now - lent_at > MORE_GROUPS_AFTER_S for *_, lent_at in self.loans.values())
        return self.waiting, starved, long_trials, returned


class TrialConcurrency:
    """Tune's limit on trials running at once: one at first, `limit` as soon as a trial has held its group for
    `MORE_GROUPS_AFTER_S` (long trials: more groups pay off, and waiting trials make the pool start them).

    Every trial actor Tune starts is a new process that imports Ray Tune (~2 s of CPU on 2 cores), and short trials
    run one after the other on the warm groups anyway, so starting `limit` of them up front only delays the first
    trial. Only schedulers that never pause a trial start this way: the others (PBT, HyperBand) pause trials until
    the rest of their population or bracket catches up, so all of them must be able to run at once.
    """

    NEVER_PAUSING = ("FIFOScheduler", "AsyncHyperBandScheduler", "MedianStoppingRule")

    def __init__(self, tune_kwargs: dict[str, Any], limit: int, population: int | None = None):
        """Set up `tune_kwargs` (`search_alg`, `max_concurrent_trials`) for at most `limit` trials at once, or
        `population` trials under a scheduler that compares a population or bracket (PBT, HyperBand): those trials
        must all be alive at once, more than the pool's groups, and wait for a group in turn (a paused trial gives
        its group back). Tune's `max_concurrent_trials` caps the trials alive, so set to the pool's size it would
        shrink PBT's population to the trials that fit side by side, one small population after another."""
        from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

        self.limit, self.limiter = limit, None
        scheduler, search_alg = tune_kwargs.get("scheduler"), tune_kwargs.get("search_alg")
        tune_kwargs.pop("max_concurrent_trials", None)
        if search_alg is not None and (not isinstance(search_alg, Searcher) or isinstance(search_alg,
                                                                                          ConcurrencyLimiter)):
            return  # the user's own ConcurrencyLimiter or search generator sets it (Tune refuses a second limit)
        if population is not None and compares_population(scheduler):
            tune_kwargs["max_concurrent_trials"] = max(population, limit)
            return
        if limit == 1 or (scheduler is not None and type(scheduler).__name__ not in self.NEVER_PAUSING):
            tune_kwargs["max_concurrent_trials"] = limit
            return
        self.limiter = (BasicVariantGenerator(max_concurrent=1) if search_alg is None
                        else ConcurrencyLimiter(search_alg, max_concurrent=1))
        tune_kwargs["search_alg"] = self.limiter

    def open_up(self) -> None:
        """Let `limit` trials run at once from now on."""
        if self.limiter is None or self.limiter.max_concurrent >= self.limit:
            return
        if hasattr(self.limiter, "searcher"):  # a ConcurrencyLimiter: the searcher may keep its own limit
            self.limiter.searcher.set_max_concurrency(self.limit)
        self.limiter.max_concurrent = self.limit


def compares_population(scheduler: Any) -> bool:
    """PBT (and PB2) and synchronous HyperBand pause trials until the rest of their population or bracket gets
    there: every trial of it must be alive at once."""
    from ray.tune.schedulers import HyperBandScheduler, PopulationBasedTraining

    return isinstance(scheduler, (PopulationBasedTraining, HyperBandScheduler))


_IDLE_LENDERS: list = []  # lenders of finished searches in this driver, kept for the next search


def _take_lender(one_shot: bool) -> Any:
    """An idle lender reset for a new search, or a new one (a new actor process costs a second or more)."""
    while _IDLE_LENDERS:
        lender = _IDLE_LENDERS.pop()
        try:
            ray.get(lender.reset.remote(one_shot), timeout=10)
            return lender
        except Exception:  # noqa: BLE001 - gone with an earlier Ray session, or unresponsive: start a new one
            continue
    from raytrainer.backend.cluster import on_driver_node

    return GroupLender.options(max_concurrency=1000, scheduling_strategy=on_driver_node()).remote(one_shot=one_shot)


class SearchGroups:
    """The driver's side: starts, replaces and finally releases the search's worker groups."""

    def __init__(self, spec: Any, size: int, ray_datasets: dict | None, adopted: Any | None = None,
                 concurrency: TrialConcurrency | None = None):
        self.spec, self.size, self.ray_datasets = spec, size, ray_datasets or None
        self.concurrency = concurrency
        self.lender = _take_lender(one_shot=bool(self.ray_datasets))
        self.groups: dict[int, Any] = {}
        self.status_asked: ray.ObjectRef | None = None
        self.status_predates_group = False  # the status in flight was asked before the last group was added
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
        from raytrainer.backend.group import WorkerGroup

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
                    self.status_predates_group = True
        for index, group in list(self.groups.items()):
            if not group.alive:
                if self.starting is not None and self.starting[0] == index:
                    self.starting = None
                self._drop_failed(index, group)
        # Asked at one tick, read at a later one: Tune's loop never waits for the lender.
        if self.status_asked is None or not ray.wait([self.status_asked], timeout=0)[0]:
            self.status_asked = self.status_asked or self.lender.status.remote()
            return
        waiting, starved, long_trials, returned = ray.get(self.status_asked)
        self.status_asked = self.lender.status.remote()
        if self.status_predates_group:  # its trials may have got the new group meanwhile
            self.status_predates_group = starved = False
        if long_trials and self.concurrency is not None:
            self.concurrency.open_up()
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
        _IDLE_LENDERS.append(self.lender)
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
