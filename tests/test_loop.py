"""The worker loop in-process (no Ray): step-for-step parity with transformers.Trainer."""

import copy

import numpy as np
import pytest
import torch
import transformers
from transformers import EvalPrediction

from helpers import RegressionModel, lm_dataset, regression_dataset, tiny_gpt2
from parity import assert_logs_close, assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments
from raytrainer.distributed import WorkerContext
from raytrainer.loop import WorkerTrainer


def run_in_process(model, args, **kwargs):
    """Build the job exactly as the driver does, then run the worker loop here."""
    trainer = Trainer(model=model, args=args, **kwargs)
    worker = WorkerTrainer(trainer._job({}, train=True), WorkerContext())
    output = worker.train()
    return worker, output


def args_for(tmp_path, name, **overrides):
    settings = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, learning_rate=0.1,
                    logging_steps=1, num_train_epochs=3, report_to=[], save_strategy="no", disable_tqdm=True)
    settings.update(overrides)
    return settings


@pytest.mark.parametrize("overrides", [
    {},
    {"gradient_accumulation_steps": 3, "warmup_steps": 0.2, "weight_decay": 0.1, "lr_scheduler_type": "cosine",
     "num_train_epochs": 7},
    {"optim": "sgd", "max_grad_norm": 0.5, "max_steps": 21, "seed": 7},
])
def test_regression_losses_and_weights_match_transformers(tmp_path, overrides):
    data = regression_dataset(60)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**args_for(tmp_path, "hf", **overrides)),
                                 train_dataset=data)
    ours, output = run_in_process(RegressionModel(), TrainingArguments(**args_for(tmp_path, "rt", **overrides)),
                                  train_dataset=data)
    assert len([e for e in ours.state.log_history if "loss" in e]) >= 20
    assert_logs_close(theirs.state.log_history, ours.state.log_history)
    assert_weights_close(theirs.model, ours.model)
    assert output.global_step == theirs.state.global_step


def test_gpt2_losses_and_weights_match_transformers(tmp_path):
    data = lm_dataset(48)
    model = tiny_gpt2()
    overrides = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=24, warmup_steps=3)
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**args_for(tmp_path, "hf", **overrides)),
                                 train_dataset=data)
    ours, _ = run_in_process(copy.deepcopy(model), TrainingArguments(**args_for(tmp_path, "rt", **overrides)),
                             train_dataset=data)
    assert_logs_close(theirs.state.log_history, ours.state.log_history)
    assert_weights_close(theirs.model, ours.model)
    losses = [e["loss"] for e in ours.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] * 0.8  # it learns


def test_evaluate_and_predict_match_transformers(tmp_path):
    data, held_out = regression_dataset(40), regression_dataset(13, seed=1)

    def metrics(prediction: EvalPrediction):
        return {"mae": float(np.abs(prediction.predictions - prediction.label_ids).mean())}

    settings = args_for(tmp_path, "x", per_device_eval_batch_size=4, eval_strategy="epoch")
    # (creating a TrainingArguments resets accelerate's state under an existing transformers.Trainer: run it first)
    theirs = transformers.Trainer(model=RegressionModel(1.0, 1.0), args=transformers.TrainingArguments(**settings),
                                  train_dataset=data, eval_dataset=held_out, compute_metrics=metrics)
    expected, expected_prediction = theirs.evaluate(), theirs.predict(held_out)
    ours = Trainer(model=RegressionModel(1.0, 1.0), args=TrainingArguments(**settings), train_dataset=data,
                   eval_dataset=held_out, compute_metrics=metrics)
    worker = WorkerTrainer(ours._job({}), WorkerContext())
    actual = worker.evaluate()
    for key in ("eval_loss", "eval_mae"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-6)
    actual_prediction = worker.predict(ours._transferable(held_out, "test", {}, "t"))
    assert actual_prediction.predictions.shape == (13,)
    np.testing.assert_allclose(actual_prediction.predictions, expected_prediction.predictions, rtol=1e-6)
    np.testing.assert_allclose(actual_prediction.label_ids, expected_prediction.label_ids)
    assert actual_prediction.metrics["test_loss"] == pytest.approx(expected_prediction.metrics["test_loss"], rel=1e-6)
