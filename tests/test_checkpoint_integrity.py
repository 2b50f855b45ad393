"""What a checkpoint may hold and when it counts: a worker killed while it writes one resumes from the previous
complete checkpoint, and a checkpoint whose file carries a pickled object that runs code is refused before it runs."""

import json
import os
import signal

import pytest
import torch
import transformers

from helpers import RegressionModel, StepsRun, process_gone, regression_dataset, training_settings
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")

KILL_STEP = 8


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"learning_rate": 0.05, "max_steps": 12, "save_strategy": "steps",
                                                "save_steps": 4, **overrides})


class KilledWhileSaving(Trainer):
    """SIGKILLs rank 0 in the middle of writing checkpoint-8, the first time only: the weights, optimizer and
    scheduler are on disk, the RNG states and trainer_state.json are not. The marker holds the pid and the files
    the half-written folder had."""

    kill_marker = ""

    def _save_rng_state(self, output_dir):
        if (self.state.global_step == KILL_STEP and self.is_world_process_zero()
                and not os.path.exists(self.kill_marker)):
            with open(self.kill_marker, "w") as file:
                json.dump({"pid": os.getpid(), "files": sorted(os.listdir(output_dir))}, file)
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(tmp_path):
    """max_failures=1: Ray Train restarts the group, which resumes from the last checkpoint rank 0 reported (a
    checkpoint is reported once transformers has written all of it)."""
    data = regression_dataset(48)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf")),
                                 train_dataset=data)
    marker = tmp_path / "killed.json"
    trainer_class = type("KilledWhileSaving", (KilledWhileSaving,), {"kill_marker": str(marker)})
    steps_run = StepsRun()
    trainer = trainer_class(model=RegressionModel(), train_dataset=data, callbacks=[steps_run],
                            args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2, max_failures=1,
                                                              per_device_train_batch_size=4)))
    trainer.train()

    killed = json.loads(marker.read_text())
    assert process_gone(killed["pid"], timeout_s=30), "the killed worker is still running"
    assert "model.safetensors" in killed["files"] and "trainer_state.json" not in killed["files"], killed
    # Resumed after checkpoint-4, the last complete one: taking the half-written checkpoint-8 fails (its
    # trainer_state.json is missing); a restart from scratch would run 1..12.
    assert steps_run.steps == list(range(5, 13))
    assert trainer.state.global_step == 12
    assert_weights_close(theirs.model, trainer.model, tol=1e-6)
    assert os.path.isfile(tmp_path / "rt" / "checkpoint-8" / "trainer_state.json")  # written again, complete


class RunsCode:
    """Unpickled, it runs code: it writes `marker` (what a crafted checkpoint from an untrusted source would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the pickled object ran')",)


def test_a_checkpoint_file_carrying_a_pickled_object_is_refused_before_it_runs(tmp_path, no_ray_start):
    """transformers writes the checkpoint; one of its torch.load files then carries an object whose unpickling writes
    a marker. Resuming from it fails on the driver, naming the file and what it holds, before Ray or a worker is
    used (no_ray_start), and nothing in the file ran."""
    data = regression_dataset(32)
    run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", max_steps=4)),
                     train_dataset=data)
    checkpoint = tmp_path / "hf" / "checkpoint-4"
    marker = tmp_path / "ran.txt"
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    torch.save({**optimizer_state, "extra": RunsCode(str(marker))}, checkpoint / "optimizer.pt")

    for resume in (str(checkpoint), True):  # the folder itself, and output_dir's last checkpoint
        resumed = Trainer(model=RegressionModel(), train_dataset=data,
                          args=TrainingArguments(**settings(tmp_path, "hf", max_steps=8)))
        with pytest.raises(ValueError) as raised:
            resumed.train(resume_from_checkpoint=resume)
        message = str(raised.value)
        assert message.startswith(f"{checkpoint / 'optimizer.pt'} holds pickled objects that are not tensors "
                                  "(builtins.exec): loading it could run code"), message
        assert "Resume only from checkpoints you trust" in message
    assert not marker.exists(), "checking the checkpoint ran the pickled object's code"
    # The same check passes transformers' own files, numpy RNG states included: the unchanged checkpoint-4 of the
    # other tests resumes (test_checkpoints, and the kill test above).
    torch.save(optimizer_state, checkpoint / "optimizer.pt")
    from raytrainer.checks import check_loads_without_code

    check_loads_without_code(str(checkpoint))


def test_resume_true_after_a_kill_mid_write_takes_the_last_complete_checkpoint(tmp_path):
    """Without max_failures the kill fails the run and leaves checkpoint-8 half-written; resume_from_checkpoint=True
    then takes checkpoint-4 (transformers' get_last_checkpoint would take checkpoint-8, whose missing
    trainer_state.json fails the resume) and ends with an uninterrupted run's weights."""
    data = regression_dataset(48)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf")),
                                 train_dataset=data)
    marker = tmp_path / "killed.json"
    trainer_class = type("KilledWhileSaving", (KilledWhileSaving,), {"kill_marker": str(marker)})
    args = TrainingArguments(**settings(tmp_path, "rt", num_workers=2, per_device_train_batch_size=4))
    with pytest.raises(RuntimeError, match="The actor died unexpectedly"):
        trainer_class(model=RegressionModel(), train_dataset=data, args=args).train()
    assert process_gone(json.loads(marker.read_text())["pid"], timeout_s=30)
    half_written = tmp_path / "rt" / "checkpoint-8"
    assert half_written.is_dir() and not (half_written / "trainer_state.json").exists()

    steps_run = StepsRun()
    resumed = trainer_class(model=RegressionModel(), train_dataset=data, args=args, callbacks=[steps_run])
    resumed.train(resume_from_checkpoint=True)
    assert steps_run.steps == list(range(5, 13))
    assert_weights_close(theirs.model, resumed.model, tol=1e-6)
