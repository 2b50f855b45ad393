"""Killing a worker process mid-run: Ray Train restarts the group and training resumes from the checkpoint."""

import glob
import os
import shutil

import pytest
import transformers

from helpers import KillWorkerOnce, RegressionModel, StepsRun, killed_pid, regression_dataset
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


class RemoveLocalCheckpointsAndKill(KillWorkerOnce):
    """Deletes output_dir's checkpoints first: the restarted workers can only resume from storage_path's copy."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero and not os.path.exists(self.marker):
            for path in glob.glob(os.path.join(args.output_dir, "checkpoint-*")):
                shutil.rmtree(path)
        super().on_step_end(args, state, control, **kwargs)


@pytest.mark.quick
def test_killed_worker_is_restarted_and_reaches_the_same_weights(tmp_path):
    data = regression_dataset(48)
    common = dict(per_device_train_batch_size=8, learning_rate=0.05, logging_steps=1, max_steps=16, save_steps=4,
                  report_to=[], disable_tqdm=True)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(str(tmp_path / "hf"), **common),
                                 train_dataset=data)
    marker = str(tmp_path / "killed.pid")
    # Ray Train copies each checkpoint to storage_path (keeping save_total_limit of them there); the callback deletes
    # output_dir's own before it kills the worker, so the restarted workers resume from the storage_path copy, as on
    # a cluster whose nodes share no output_dir.
    args = TrainingArguments(str(tmp_path / "rt"), num_workers=2, max_failures=1, storage_path=str(tmp_path / "shared"),
                             save_total_limit=1, **{**common, "per_device_train_batch_size": 4})
    steps_run = StepsRun()
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=data,
                      callbacks=[RemoveLocalCheckpointsAndKill(6, marker), steps_run])
    trainer.train()
    assert killed_pid(marker)  # a worker really died at step 6 (the marker holds its pid, and it is gone)
    assert trainer.state.global_step == 16
    assert steps_run.steps == list(range(5, 17))  # resumed after checkpoint-4: a restart from scratch would run 1..16
    assert_weights_close(theirs.model, trainer.model, tol=1e-6)


def test_without_max_failures_a_killed_worker_fails_the_run_clearly(tmp_path):
    marker = str(tmp_path / "killed.pid")
    args = TrainingArguments(str(tmp_path / "rt"), max_steps=6, save_steps=100, report_to=[], disable_tqdm=True,
                             per_device_train_batch_size=4)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32),
                      callbacks=[KillWorkerOnce(2, marker)])
    with pytest.raises(RuntimeError, match="Training failed on the Ray Train workers") as raised:
        trainer.train()
    pid = killed_pid(marker)
    # Ray's own account of the death, of the very process the callback killed (not any worker error)
    assert "The actor died unexpectedly" in str(raised.value) and f"pid: {pid}\n" in str(raised.value), raised.value
