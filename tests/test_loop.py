"""The worker loop in-process (no Ray): step-for-step parity with transformers.Trainer."""

import copy

import numpy as np
import pytest
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


@pytest.mark.parametrize("overrides", [
    {"label_smoothing_factor": 0.1},
    {"gradient_checkpointing": True},
    {"bf16": True, "use_cpu": True},
    {"dataloader_drop_last": True, "per_device_train_batch_size": 5, "gradient_accumulation_steps": 2},
    {"optim": "adamw_torch", "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "weight_decay": 0.1,
     "lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2}},
    {"eval_on_start": True, "eval_strategy": "steps", "eval_steps": 4},
    {"torch_compile": True, "torch_compile_backend": "eager"},
])
def test_gpt2_options_match_transformers(tmp_path, overrides):
    data = lm_dataset(40)
    model = tiny_gpt2()
    base = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=8, warmup_steps=1)
    extra = {"eval_dataset": data.select(range(6))} if "eval_strategy" in overrides else {}
    settings = {**base, **overrides}
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**args_for(tmp_path, "hf", **settings)),
                                 train_dataset=data, **extra)
    ours, _ = run_in_process(copy.deepcopy(model), TrainingArguments(**args_for(tmp_path, "rt", **settings)),
                             train_dataset=data, **extra)
    tolerance = 2e-2 if overrides.get("bf16") else 1e-4
    assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=tolerance)
    assert_weights_close(theirs.model, ours.model, tol=tolerance)


def test_prediction_options_match_transformers(tmp_path):
    data = lm_dataset(11)
    model = tiny_gpt2()

    def metrics(prediction: EvalPrediction):
        return {"inputs_sum": float(np.asarray(prediction.inputs).sum()),
                "mean_token_loss": float(np.mean(prediction.losses)), "shape": float(prediction.predictions.shape[-1])}

    def argmax_logits(logits, labels):
        return logits.argmax(-1)

    settings = args_for(tmp_path, "x", per_device_eval_batch_size=4, include_for_metrics=["inputs", "loss"])
    theirs = transformers.Trainer(model=copy.deepcopy(model), args=transformers.TrainingArguments(**settings),
                                  compute_metrics=metrics, preprocess_logits_for_metrics=argmax_logits)
    expected, expected_prediction = theirs.evaluate(data), theirs.predict(data)
    ours = Trainer(model=copy.deepcopy(model), args=TrainingArguments(**settings), compute_metrics=metrics,
                   preprocess_logits_for_metrics=argmax_logits)
    worker = WorkerTrainer(ours._job({}), WorkerContext())
    payload = ours._transferable(data, "test", {}, "t")
    actual, actual_prediction = worker.evaluate(payload), worker.predict(payload)
    for key in ("eval_loss", "eval_inputs_sum", "eval_mean_token_loss", "eval_shape"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-6), key
    np.testing.assert_array_equal(actual_prediction.predictions, expected_prediction.predictions)
    np.testing.assert_array_equal(actual_prediction.label_ids, expected_prediction.label_ids)
