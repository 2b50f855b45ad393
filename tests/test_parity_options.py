"""transformers' own training options, run by the workers, give transformers' numbers (1 worker, same model and data).

The workers run transformers' loop, so these are checks that nothing on the way (the model's and the data's
transport, arguments placed on the worker's device, results back) changes what transformers computes.
"""

import copy

import numpy as np
import pytest
import transformers
from transformers import EvalPrediction

from helpers import RegressionModel, lm_dataset, regression_dataset, tiny_gpt2, training_settings
from parity import assert_logs_close, assert_weights_close, run_raytrainer, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


def args_for(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"num_train_epochs": 3, **overrides})


@pytest.mark.parametrize("overrides", [
    {"gradient_accumulation_steps": 3, "warmup_steps": 0.2, "weight_decay": 0.1, "lr_scheduler_type": "cosine",
     "num_train_epochs": 7},
    {"optim": "sgd", "max_grad_norm": 0.5, "max_steps": 21, "seed": 7},
])
def test_regression_losses_and_weights_match_transformers(tmp_path, overrides):
    data = regression_dataset(60)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**args_for(tmp_path, "hf", **overrides)),
                                 train_dataset=data)
    ours, output = run_raytrainer(RegressionModel(), TrainingArguments(**args_for(tmp_path, "rt", **overrides)),
                                  train_dataset=data)
    assert len([e for e in ours.state.log_history if "loss" in e]) >= 20
    assert_logs_close(theirs.state.log_history, ours.state.log_history)
    assert_weights_close(theirs.model, ours.model)
    assert output.global_step == theirs.state.global_step


@pytest.mark.parametrize("overrides", [
    {"label_smoothing_factor": 0.1, "gradient_checkpointing": True},
    {"bf16": True, "use_cpu": True},
    {"dataloader_drop_last": True, "per_device_train_batch_size": 5, "gradient_accumulation_steps": 2,
     "optim": "adamw_torch", "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "weight_decay": 0.1,
     "lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2}},
    {"eval_on_start": True, "eval_strategy": "steps", "eval_steps": 4, "torch_compile": True,
     "torch_compile_backend": "eager"},
])
def test_gpt2_options_match_transformers(tmp_path, overrides):
    data = lm_dataset(40)
    model = tiny_gpt2()
    base = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=8, warmup_steps=1)
    extra = {"eval_dataset": data.select(range(6))} if "eval_strategy" in overrides else {}
    settings = {**base, **overrides}
    initial = copy.deepcopy(model)
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**args_for(tmp_path, "hf", **settings)),
                                 train_dataset=data, **extra)
    ours, _ = run_raytrainer(copy.deepcopy(model), TrainingArguments(**args_for(tmp_path, "rt", **settings)),
                             train_dataset=data, **extra)
    if overrides.get("bf16"):  # bf16: tied to the size of the update, not to an absolute number
        update = max((theirs.model.state_dict()[k] - v).abs().max().item() for k, v in initial.state_dict().items())
        assert_weights_close(theirs.model, ours.model, tol=update / 10)
        assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-2)
    else:
        assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-4)
        assert_weights_close(theirs.model, ours.model, tol=1e-4)


def test_evaluate_predict_and_prediction_options_match_transformers(tmp_path):
    data = lm_dataset(16)  # whole rounds of batches on 2 workers (transformers' own loss differs otherwise)
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
    ours = Trainer(model=copy.deepcopy(model), args=TrainingArguments(**settings, num_workers=2),
                   compute_metrics=metrics, preprocess_logits_for_metrics=argmax_logits)
    actual, actual_prediction = ours.evaluate(data), ours.predict(data)
    for key in ("eval_loss", "eval_inputs_sum", "eval_mean_token_loss", "eval_shape"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-4), key
    np.testing.assert_array_equal(actual_prediction.predictions, expected_prediction.predictions)
    np.testing.assert_array_equal(actual_prediction.label_ids, expected_prediction.label_ids)
