"""Every TrainingArguments field means what it means in transformers: the workers run transformers' own code for it.
Fields that only work on GPUs (FSDP, DeepSpeed) are tested in test_gpu.py."""

import copy
import glob

import numpy as np
import pytest
import transformers
from transformers import EvalPrediction, TrainerCallback

from helpers import RegressionModel, lm_dataset, regression_dataset, tiny_gpt2, training_settings
from parity import assert_logs_close, assert_weights_close, run_raytrainer, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"max_steps": 6, **overrides})


class OutOfMemoryAbove(TrainerCallback):
    """Raises the error CUDA raises when out of memory while the batch is at least `limit` (as transformers' test)."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_step_end(self, args, state, control, **kwargs):
        if state.train_batch_size >= self.limit:
            raise RuntimeError("CUDA out of memory.")


def test_auto_find_batch_size_shrinks_the_batch_as_transformers_does(tmp_path):
    data = regression_dataset(64)
    common = dict(auto_find_batch_size=True, per_device_train_batch_size=16)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", **common)),
                                 train_dataset=data, callbacks=[OutOfMemoryAbove(12)])
    ours, _ = run_raytrainer(RegressionModel(), TrainingArguments(**settings(tmp_path, "rt", **common)),
                             train_dataset=data, callbacks=[OutOfMemoryAbove(12)])
    assert ours.state.train_batch_size == theirs.state.train_batch_size < 16
    assert ours._train_batch_size == theirs._train_batch_size  # the driver learns the batch size that fitted
    assert_weights_close(theirs.model, ours.model, tol=1e-5)


def batched_mae(prediction: EvalPrediction, compute_result: bool) -> dict | None:
    """batch_eval_metrics: called per batch, the summary on the last one."""
    state = batched_mae.__dict__.setdefault("errors", [])
    state.extend(np.abs(np.asarray(prediction.predictions) - np.asarray(prediction.label_ids)).reshape(-1).tolist())
    if compute_result:
        result = {"mae": float(np.mean(state))}
        state.clear()
        return result
    return None


def test_batch_eval_metrics_give_transformers_metrics(tmp_path):
    held_out = regression_dataset(14, seed=1)
    theirs = transformers.Trainer(model=RegressionModel(1.0, 1.0), compute_metrics=batched_mae,
                                  args=transformers.TrainingArguments(**settings(tmp_path, "hf", batch_eval_metrics=True)))
    expected = theirs.evaluate(held_out)
    ours = Trainer(model=RegressionModel(1.0, 1.0), compute_metrics=batched_mae,
                   args=TrainingArguments(**settings(tmp_path, "rt", batch_eval_metrics=True)))
    actual = ours.evaluate(held_out)
    assert actual["eval_mae"] == pytest.approx(expected["eval_mae"], rel=1e-6)
    assert actual["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)


def test_neftune_noise_trains_as_in_transformers(tmp_path):
    data = lm_dataset(24)
    model = tiny_gpt2()
    common = dict(neftune_noise_alpha=5.0, per_device_train_batch_size=4, learning_rate=1e-3)
    plain, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**settings(
        tmp_path, "plain", per_device_train_batch_size=4, learning_rate=1e-3)), train_dataset=data)
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**settings(tmp_path, "hf", **common)),
                                 train_dataset=data)
    ours, _ = run_raytrainer(copy.deepcopy(model), TrainingArguments(**settings(tmp_path, "rt", **common)),
                             train_dataset=data)
    their_losses = [e["loss"] for e in theirs.state.log_history if "loss" in e]
    assert their_losses != pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e], rel=1e-4)
    assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-4)
    assert_weights_close(theirs.model, ours.model, tol=1e-4)


def test_tensorboard_and_mlflow_record_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # set by the script after Ray started: forwarded
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "raytrainer-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, no server
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    ours = Trainer(model=RegressionModel(), train_dataset=regression_dataset(32),
                   args=TrainingArguments(**settings(tmp_path, "rt", report_to=["tensorboard", "mlflow"])))
    ours.train()
    assert glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("raytrainer-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    logged = [e["loss"] for e in ours.state.log_history if "loss" in e]
    assert [point.value for point in sorted(history, key=lambda p: p.step)] == pytest.approx(logged, rel=1e-6)
    assert runs[0].data.params["learning_rate"] == "0.1"


def test_push_to_hub_gives_transformers_own_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def attempt(trainer_class, args_class):
        with pytest.raises(Exception) as caught:
            trainer_class(model=RegressionModel(), args=args_class(**settings(
                tmp_path, "hub", push_to_hub=True, hub_model_id="someone/raytrainer-test")))
        return caught.value

    theirs, ours = attempt(transformers.Trainer, transformers.TrainingArguments), attempt(Trainer, TrainingArguments)
    assert type(ours) is type(theirs) and str(ours) == str(theirs)


def test_a_field_that_cannot_work_on_ray_is_refused_with_the_reason(tmp_path):
    trainer = Trainer(model=RegressionModel(), train_dataset=regression_dataset(8),
                      args=TrainingArguments(**settings(tmp_path, "jit", enable_jit_checkpoint=True)))
    with pytest.raises(ValueError, match="enable_jit_checkpoint.*SIGTERM.*max_failures"):
        trainer.train()


# FSDP and DeepSpeed need GPU workers: tests/test_gpu.py.
