"""Checkpoints: transformers layout, rotation, and resume to the same final weights."""

import os

import pytest
import transformers

from helpers import RegressionModel, regression_dataset, training_settings
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"per_device_train_batch_size": 4, "learning_rate": 0.05,
                                                "logging_steps": 2, "max_steps": 12, "save_strategy": "steps",
                                                "save_steps": 4, "warmup_steps": 2, **overrides})


@pytest.mark.quick
def test_checkpoint_layout_rotation_and_resume_match_an_uninterrupted_run(tmp_path):
    data = regression_dataset(40)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf")),
                                 train_dataset=data)
    first = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2,
                                                                               per_device_train_batch_size=2)),
                    train_dataset=data)
    first.train()
    assert_weights_close(theirs.model, first.model, tol=1e-6)
    ours_dir, hf_dir = tmp_path / "rt", tmp_path / "hf"
    assert sorted(d for d in os.listdir(ours_dir) if d.startswith("checkpoint")) == [
        "checkpoint-12", "checkpoint-4", "checkpoint-8"]
    hf_files = set(os.listdir(hf_dir / "checkpoint-8"))
    our_files = set(os.listdir(ours_dir / "checkpoint-8"))
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            "rng_state_0.pth", "rng_state_1.pth"} <= our_files
    assert hf_files - {"rng_state.pth"} <= our_files
    assert not [d for d in os.listdir(ours_dir) if d.startswith(".tmp")]  # nothing half-written left behind

    # A worker killed while writing a checkpoint: tests/test_checkpoint_integrity.py.

    resumed = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2,
                                                                                 per_device_train_batch_size=2)),
                      train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ours_dir / "checkpoint-4"))
    assert_weights_close(theirs.model, resumed.model, tol=1e-6)
    assert resumed.state.global_step == 12
    their_losses = [e["loss"] for e in theirs.state.log_history if "loss" in e and e["step"] > 4]
    our_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4]
    assert our_losses == pytest.approx(their_losses, rel=1e-5)


def test_save_total_limit_keeps_the_newest_and_resume_true_takes_the_last(tmp_path):
    data = regression_dataset(40)
    trainer = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", save_total_limit=2)),
                      train_dataset=data)
    trainer.train()
    assert sorted(d for d in os.listdir(tmp_path / "rt") if d.startswith("checkpoint")) == [
        "checkpoint-12", "checkpoint-8"]
    with pytest.raises(ValueError, match="No valid checkpoint"):
        Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "empty")),
                train_dataset=data).train(resume_from_checkpoint=True)


def test_storage_path_persists_checkpoints_through_ray_train_and_tensorboard_logs(tmp_path):
    storage = tmp_path / "shared-storage"
    trainer = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(
        tmp_path, "rt", storage_path=str(storage), report_to=["tensorboard"], max_steps=8)),
        train_dataset=regression_dataset(40))
    trainer.train()
    persisted = [os.path.join(root, d) for root, dirs, _ in os.walk(storage) for d in dirs if d.startswith("checkpoint-")]
    assert sorted(os.path.basename(p) for p in persisted) == ["checkpoint-4", "checkpoint-8"]
    assert all(os.path.isfile(os.path.join(p, "model.safetensors")) for p in persisted)
    events = [f for _, _, files in os.walk(tmp_path / "rt") for f in files if f.startswith("events.out.tfevents")]
    assert events, "report_to=tensorboard wrote no event file"
