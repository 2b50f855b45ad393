"""Killing a worker process mid-run: Ray Train restarts the group and training resumes from the checkpoint."""

import os

import pytest
import transformers

from helpers import KillWorkerOnce, RegressionModel, regression_dataset
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


def test_killed_worker_is_restarted_and_reaches_the_same_weights(tmp_path):
    data = regression_dataset(48)
    common = dict(per_device_train_batch_size=8, learning_rate=0.05, logging_steps=1, max_steps=16, save_steps=4,
                  report_to=[], disable_tqdm=True)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(str(tmp_path / "hf"), **common),
                                 train_dataset=data)
    marker = str(tmp_path / "killed.pid")
    args = TrainingArguments(str(tmp_path / "rt"), num_workers=2, max_failures=1,
                             **{**common, "per_device_train_batch_size": 4})
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=data, callbacks=[KillWorkerOnce(6, marker)])
    trainer.train()
    assert os.path.exists(marker)  # a worker really died at step 6
    assert trainer.state.global_step == 16
    assert_weights_close(theirs.model, trainer.model, tol=1e-6)


def test_without_max_failures_a_killed_worker_fails_the_run_clearly(tmp_path):
    args = TrainingArguments(str(tmp_path / "rt"), max_steps=6, save_steps=100, report_to=[], disable_tqdm=True,
                             per_device_train_batch_size=4)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32),
                      callbacks=[KillWorkerOnce(2, str(tmp_path / "killed.pid"))])
    with pytest.raises(RuntimeError, match="(?i)worker|died|actor"):
        trainer.train()
