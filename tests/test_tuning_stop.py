"""A trial that Tune stops is cancelled on its workers at their next step, not run to the end of its budget, and
the warm group it trained on serves the next trial.

A Tune `Stopper` (run on the driver) stops the first trial at its first result (the evaluation at step 20 of 60). Each
worker records the steps it ran; each step takes 0.1 s (a sleep in a callback), so the trial's budget is 6 s of
steps and one report interval (20 steps) is 2 s, far more than the cancellation takes to arrive."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from ray import tune
from transformers import TrainerCallback

from _tuning_fixtures import make_trainer
from helpers import process_identity

STOPPED_LR, FULL_LR = 0.5, 0.3
REPORT_EVERY, BUDGET = 20, 60


class RecordSteps(TrainerCallback):
    """Every rank appends `step pid` to steps-<learning rate>-rank<r>.txt, one line per step; each step sleeps."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def on_step_end(self, args, state, control, **kwargs):
        path = os.path.join(self.record_dir, f"steps-{args.learning_rate}-rank{args.process_index}.txt")
        with open(path, "a") as file:
            file.write(f"{state.global_step} {process_identity()[0]}\n")
        time.sleep(0.1)


class StopOneTrialAtItsFirstResult(tune.Stopper):
    def __init__(self):
        self.stopped_at: list[int] = []

    def __call__(self, trial_id, result):
        if result["config"]["learning_rate"] == STOPPED_LR:
            self.stopped_at.append(result["step"])
            return True
        return False

    def stop_all(self):
        return False


def _record(record_dir: Path, lr: float, rank: int) -> tuple[list[int], set[int]]:
    lines = [line.split() for line in (record_dir / f"steps-{lr}-rank{rank}.txt").read_text().splitlines()]
    return [int(step) for step, _ in lines], {int(pid) for _, pid in lines}


def test_a_trial_tune_stops_is_cancelled_at_its_next_step_and_its_group_serves_the_next(ray_session, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    trainer = make_trainer(tmp_path / "search", callbacks=[RecordSteps(str(records))], num_workers=2,
                           per_device_train_batch_size=8, max_steps=BUDGET, eval_steps=REPORT_EVERY,
                           logging_steps=REPORT_EVERY)
    stopper = StopOneTrialAtItsFirstResult()
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": tune.grid_search([STOPPED_LR, FULL_LR])}, n_trials=1,
        stop=stopper, max_concurrent_trials=1)  # one group: the second trial must get the stopped trial's group
    assert stopper.stopped_at == [REPORT_EVERY]
    statuses = {t.config["learning_rate"]: (t.status, t.last_result["step"]) for t in best.run_summary.trials}
    assert statuses == {STOPPED_LR: ("TERMINATED", REPORT_EVERY), FULL_LR: ("TERMINATED", BUDGET)}

    stopped = [_record(records, STOPPED_LR, rank) for rank in (0, 1)]
    full = [_record(records, FULL_LR, rank) for rank in (0, 1)]
    for steps, _ in stopped:  # both ranks stopped at the same step, within one report interval of Tune's stop
        assert steps == list(range(1, len(steps) + 1)) and REPORT_EVERY <= len(steps) < 2 * REPORT_EVERY, steps
    assert stopped[0][0] == stopped[1][0]
    for rank in (0, 1):  # the next trial ran its whole budget on the same worker processes (the warm group)
        assert full[rank][0] == list(range(1, BUDGET + 1))
        assert len(stopped[rank][1]) == 1 and full[rank][1] == stopped[rank][1]
