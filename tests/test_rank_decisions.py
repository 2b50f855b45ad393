"""A callback that sets a `TrainerControl` flag on one rank only, in a 2-worker run.

transformers' Trainer reads `control` on each process and never compares them: a flag set on rank 1 alone makes
rank 1 stop (or save, evaluate, log: each of which runs a collective) while rank 0 does something else, and the two
wait on each other's collectives until the process-group timeout. raytrainer makes the flags agree: a decision any
rank makes is made by every rank, at the same step (`raytrainer.backend.worker_events.WorkerEvents`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import TrainerCallback

from helpers import RegressionModel, regression_dataset, training_settings
from raytrainer import Trainer, TrainingArguments

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.timeout(120)]  # a hang fails, it does not wait


class DecideOnOneRank(TrainerCallback):
    """At the given steps, sets `control.<flag>` on the given rank only; every rank records the steps it ran."""

    def __init__(self, record_dir: str, decisions: list[tuple[int, int, str]]):
        self.record_dir, self.decisions = record_dir, decisions  # (rank, global_step, flag)

    def on_step_end(self, args, state, control, **kwargs):
        with open(os.path.join(self.record_dir, f"steps-rank{args.process_index}.txt"), "a") as file:
            file.write(f"{state.global_step}\n")
        for rank, step, flag in self.decisions:
            if args.process_index == rank and state.global_step == step:
                setattr(control, flag, True)


def _steps_run(record_dir: Path) -> dict[int, list[int]]:
    return {rank: [int(line) for line in (record_dir / f"steps-rank{rank}.txt").read_text().split()] for rank in (0, 1)}


def _train(tmp_path, decisions, **overrides) -> Trainer:
    args = TrainingArguments(**training_settings(tmp_path, "rt", num_workers=2, per_device_train_batch_size=4,
                                                 max_steps=8, logging_steps=100, **overrides))
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(64),
                      eval_dataset=regression_dataset(16, seed=1), callbacks=[DecideOnOneRank(str(tmp_path), decisions)])
    trainer.train()
    return trainer


def test_training_stop_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    trainer = _train(tmp_path, [(1, 3, "should_training_stop")])
    assert trainer.state.global_step == 3
    assert _steps_run(tmp_path) == {0: [1, 2, 3], 1: [1, 2, 3]}


def test_save_evaluate_and_log_on_one_rank_happen_on_every_rank(tmp_path):
    trainer = _train(tmp_path, [(1, 2, "should_save"), (1, 4, "should_evaluate"), (1, 5, "should_log"),
                                (0, 6, "should_evaluate")])  # rank 0's own decision (the usual pattern) too
    assert trainer.state.global_step == 8 and _steps_run(tmp_path) == {0: list(range(1, 9)), 1: list(range(1, 9))}
    assert sorted(p.name for p in (tmp_path / "rt").glob("checkpoint-*")) == ["checkpoint-2"]  # save_strategy="no"
    saved = tmp_path / "rt" / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= {p.name for p in saved.iterdir()}
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 2
    history = trainer.state.log_history
    assert [h["step"] for h in history if "eval_loss" in h] == [4, 6]
    assert [h["step"] for h in history if "loss" in h] == [5]  # logging_steps=100: only the decided log
