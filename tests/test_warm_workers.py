"""A Trainer keeps its Ray Train worker group warm between calls, and releases it when told, idle or collected."""

import gc
import time

import numpy as np
import pytest
import transformers

from helpers import (KillWorkerOnce, RegressionModel, WorkerPids, killed_pid, process_gone, regression_dataset,
                     training_arguments, training_settings)
from parity import assert_weights_close, comparable, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.own_worker_group]


def build_model():
    return RegressionModel()


class FrozenObjects(transformers.TrainerCallback):
    """Records how many objects the worker's garbage collector has frozen (never walks) when training begins."""

    def __init__(self):
        self.counts: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.counts.append(gc.get_freeze_count())


def wait_until_gone(process: tuple[int, float], timeout_s: float = 60.0) -> bool:
    return process_gone(*process, timeout_s=timeout_s)


@pytest.mark.quick
def test_calls_reuse_the_workers_and_a_warm_second_train_matches_transformers(tmp_path):
    data, held_out = regression_dataset(64), regression_dataset(16, seed=1)  # whole batches on 2 workers: the
    hf_args = transformers.TrainingArguments(**training_settings(tmp_path, "hf", max_steps=12))  # same mean
    theirs, _ = run_transformers(None, hf_args,
                                 model_init=build_model, train_dataset=data, eval_dataset=held_out)
    their_eval, their_prediction = theirs.evaluate(), theirs.predict(held_out)

    pids, frozen = WorkerPids(), FrozenObjects()
    args = training_arguments(tmp_path, max_steps=12, num_workers=2, per_device_train_batch_size=4)
    with Trainer(model_init=build_model, args=args, train_dataset=data, eval_dataset=held_out,
                 callbacks=[pids, frozen]) as ours:
        first = ours.train()  # cold: starts the worker group
        first_weights = {k: v.clone() for k, v in ours.model.state_dict().items()}
        second = ours.train()  # warm: model_init builds a fresh model on the same workers
        assert_weights_close(theirs.model, ours.model, tol=1e-5)
        assert second.training_loss == pytest.approx(first.training_loss, rel=1e-6)
        for name, value in ours.model.state_dict().items():
            assert (value - first_weights[name]).abs().max().item() <= 1e-6, name
        evaluation = ours.evaluate()
        prediction = ours.predict(held_out)
        assert comparable(evaluation) == pytest.approx(comparable(their_eval), rel=1e-5)
        np.testing.assert_allclose(prediction.predictions, their_prediction.predictions, rtol=1e-5)
        assert len(pids.processes) == 4 and len(set(pids.processes)) == 1, pids.processes  # one process served all
        # The imports' objects are out of the collector's sight: transformers' collection at each train() walks only
        # what the calls created.
        assert len(frozen.counts) == 2 and min(frozen.counts) > 100_000, frozen.counts
        worker = pids.processes[0]
        # Another Trainer of the same worker layout takes over the idle group instead of starting one.
        other_pids = WorkerPids()
        other = Trainer(model=RegressionModel(), args=args, eval_dataset=held_out, callbacks=[other_pids])
        other.evaluate()
        assert other_pids.processes == [worker] and ours._raytrainer_workers.group is None
        other.close()
    assert wait_until_gone(worker), "closing the Trainer that holds the group must end its worker processes"


def test_new_arguments_start_a_new_group_and_close_releases_it(tmp_path):
    pids = WorkerPids()
    args = training_arguments(tmp_path, max_steps=3)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32), callbacks=[pids])
    trainer.train()
    trainer.args = training_arguments(tmp_path, max_steps=3, num_workers=2)
    trainer.train()  # a different worker group shape: the old group is released, a new one starts
    assert pids.processes[0] != pids.processes[1]
    assert wait_until_gone(pids.processes[0])
    trainer.close()
    assert wait_until_gone(pids.processes[1])
    trainer.evaluate(regression_dataset(8))  # a closed Trainer starts workers again when called
    assert pids.processes[2] not in pids.processes[:2]
    worker = pids.processes[2]
    del trainer
    gc.collect()
    assert wait_until_gone(worker), "a garbage-collected Trainer must release its workers"


def test_idle_timeout_releases_the_workers_and_the_next_call_starts_new_ones(tmp_path):
    pids = WorkerPids()
    args = training_arguments(tmp_path, max_steps=3, worker_idle_timeout=1)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32),
                      eval_dataset=regression_dataset(8), callbacks=[pids])
    trainer.train()
    assert wait_until_gone(pids.processes[0], timeout_s=60)  # idle for 1 s: the workers exit on their own
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and pids.processes[1] != pids.processes[0]
    trainer.close()


def test_zero_idle_timeout_releases_the_workers_after_every_call(tmp_path):
    pids = WorkerPids()
    args = training_arguments(tmp_path, max_steps=3, worker_idle_timeout=0)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32), callbacks=[pids])
    trainer.train()
    assert trainer._raytrainer_workers.group is None and wait_until_gone(pids.processes[0])


def test_worker_killed_in_a_warm_call_resumes_from_that_calls_checkpoint(tmp_path):
    """The warm group already holds the first call's checkpoints; a restart in the second call must not use them."""
    data = regression_dataset(48)
    values = dict(max_steps=16, save_strategy="steps", save_steps=4, learning_rate=0.05)
    theirs, _ = run_transformers(None, transformers.TrainingArguments(**training_settings(tmp_path, "hf", **values)),
                                 model_init=build_model, train_dataset=data)
    marker = str(tmp_path / "killed.pid")
    ours = {**values, "per_device_train_batch_size": 4}
    first_args = training_arguments(tmp_path, num_workers=2, max_failures=2,
                                    **{**ours, "learning_rate": 0.01})  # other weights at its checkpoint-16
    trainer = Trainer(model_init=build_model, args=first_args, train_dataset=data)
    trainer.train()
    trainer.args = training_arguments(tmp_path, num_workers=2, max_failures=2, **ours)
    trainer.add_callback(KillWorkerOnce(2, marker))  # step 2 of the second call: before it saved anything
    trainer.train()
    assert killed_pid(marker)
    assert trainer.state.global_step == 16
    assert_weights_close(theirs.model, trainer.model, tol=1e-6)
    trainer.close()


class FailingMetrics:
    def __call__(self, prediction):
        raise ValueError("metric exploded on purpose")


def test_an_error_in_a_warm_call_is_reported_and_the_next_call_works(tmp_path):
    args = training_arguments(tmp_path, max_steps=3)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(32),
                      eval_dataset=regression_dataset(8))
    trainer.train()
    trainer.compute_metrics = FailingMetrics()
    with pytest.raises(RuntimeError, match="metric exploded on purpose"):
        trainer.evaluate()
    trainer.compute_metrics = None
    assert "eval_loss" in trainer.evaluate()
    trainer.close()


def test_bad_idle_timeout_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="worker_idle_timeout"):
        TrainingArguments(str(tmp_path), worker_idle_timeout=-1)


def train_worker_processes() -> list:
    """The live Ray Train worker processes of this session's Ray (children of its raylet), counted with psutil."""
    import psutil
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    found = []
    for process in raylet.children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            if command.startswith("ray::RayTrainWorker") and process.status() != psutil.STATUS_ZOMBIE:
                found.append((process.pid, command))
        except psutil.NoSuchProcess:
            pass
    return found


def test_no_worker_group_outlives_its_trainer():
    """Runs last in this module, before the fixture that closes every group at the module's end: each Trainer
    above was closed or garbage-collected, so none of their groups may still be open, and no Ray Train worker
    process of this session's Ray may still run."""
    from raytrainer.backend import group

    gc.collect()
    deadline = time.monotonic() + 60
    while any(g.alive for g in list(group._live_groups)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [g for g in list(group._live_groups) if g.alive] == []
    deadline = time.monotonic() + 120
    while train_worker_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert train_worker_processes() == []
