"""raytrainer.Trainer on real Ray Train workers, compared with transformers.Trainer on the same inputs."""

import copy
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, EvalPrediction, TrainerCallback

from helpers import RegressionModel, lm_dataset, regression_dataset, tiny_gpt2, training_settings
from parity import assert_logs_close, assert_weights_close, comparable, run_transformers
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"num_train_epochs": 3, **overrides})


def mae(prediction: EvalPrediction) -> dict:
    return {"mae": float(np.abs(prediction.predictions - prediction.label_ids).mean())}


class EventRecorder(TrainerCallback):
    """Records every event name with the global step (the driver sees rank 0's record after the call)."""

    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            events = object.__getattribute__(self, "events")

            def record(args, state, control, **kwargs):
                events.append((name, state.global_step))
            return record
        return object.__getattribute__(self, name)


@pytest.mark.quick
def test_one_worker_matches_transformers_train_evaluate_predict(tmp_path):
    data, held_out = regression_dataset(64), regression_dataset(13, seed=1)
    common = dict(eval_strategy="steps", eval_steps=8, gradient_accumulation_steps=2, warmup_steps=2,
                  weight_decay=0.01, num_train_epochs=6)
    hf_recorder, our_recorder = EventRecorder(), EventRecorder()
    theirs, their_output = run_transformers(
        RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", **common)), train_dataset=data,
        eval_dataset=held_out, compute_metrics=mae, callbacks=[hf_recorder])
    their_logs, their_events = list(theirs.state.log_history), list(hf_recorder.events)
    their_eval, their_prediction = theirs.evaluate(), theirs.predict(held_out)

    model = RegressionModel()
    ours = Trainer(model=model, args=TrainingArguments(**settings(tmp_path, "rt", **common)), train_dataset=data,
                   eval_dataset=held_out, compute_metrics=mae, callbacks=[our_recorder])
    output = ours.train()
    assert len([e for e in ours.state.log_history if "loss" in e]) >= 20
    assert_logs_close(their_logs, ours.state.log_history)
    assert_weights_close(theirs.model, ours.model)
    assert ours.model is model  # trained weights land in the user's model object on the driver
    assert output.global_step == their_output.global_step
    assert output.training_loss == pytest.approx(their_output.training_loss, rel=1e-4)
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second"} <= set(output.metrics)
    assert our_recorder.events == their_events  # every event, at the same steps

    evaluation = ours.evaluate()
    assert comparable(evaluation) == pytest.approx(comparable(their_eval), rel=1e-5)
    prediction = ours.predict(held_out)
    np.testing.assert_allclose(prediction.predictions, their_prediction.predictions, rtol=1e-5)
    assert comparable(prediction.metrics) == pytest.approx(comparable(their_prediction.metrics), rel=1e-5)
    assert our_recorder.events == hf_recorder.events


@pytest.mark.quick
def test_two_workers_batch_b_equal_one_process_batch_2b(tmp_path):
    data, odd = regression_dataset(64), regression_dataset(13, seed=2)  # a whole number of global batches
    theirs, _ = run_transformers(
        RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", gradient_accumulation_steps=2,
                                                                     num_train_epochs=10)), train_dataset=data)
    their_prediction = theirs.predict(odd)
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(
        **settings(tmp_path, "rt", gradient_accumulation_steps=2, num_train_epochs=10, per_device_train_batch_size=4,
                   num_workers=2)), train_dataset=data)
    ours.train()
    assert len([e for e in ours.state.log_history if "loss" in e]) >= 20
    assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-4)
    assert_weights_close(theirs.model, ours.model, tol=1e-5)
    prediction = ours.predict(odd)  # 2 workers, 13 rows, eval batch 4: one row per example, in order
    assert prediction.predictions.shape == (13,)
    np.testing.assert_allclose(prediction.label_ids, np.asarray(odd["labels"]))
    np.testing.assert_allclose(prediction.predictions, their_prediction.predictions, rtol=1e-5)


def test_gpt2_matches_transformers_and_saves_a_loadable_model(tmp_path):
    data = lm_dataset(48)
    model = tiny_gpt2()
    common = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=20, warmup_steps=2,
                  eval_strategy="steps", eval_steps=10)
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**settings(tmp_path, "hf", **common)),
                                 train_dataset=data, eval_dataset=data.select(range(9)))
    ours = Trainer(model=copy.deepcopy(model), args=TrainingArguments(**settings(tmp_path, "rt", **common)),
                   train_dataset=data, eval_dataset=data.select(range(9)))
    ours.train()
    assert_logs_close(theirs.state.log_history, ours.state.log_history)
    assert_weights_close(theirs.model, ours.model)
    ours.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert_weights_close(ours.model, loaded, tol=0)
    generated = loaded.generate(torch.tensor([[3, 4]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 6)


def test_dict_eval_dataset_prefixes_metrics_per_key(tmp_path):
    eval_dataset = {"small": regression_dataset(5), "other": regression_dataset(7, seed=3)}
    theirs = transformers.Trainer(model=RegressionModel(1.0, 1.0), eval_dataset=eval_dataset, compute_metrics=mae,
                                  args=transformers.TrainingArguments(**settings(tmp_path, "hf"))).evaluate()
    ours = Trainer(model=RegressionModel(1.0, 1.0), args=TrainingArguments(**settings(tmp_path, "rt")),
                   eval_dataset=eval_dataset, compute_metrics=mae)
    metrics = ours.evaluate()
    keys = ("eval_small_loss", "eval_small_mae", "eval_other_loss", "eval_other_mae")
    assert [metrics[k] for k in keys] == pytest.approx([theirs[k] for k in keys], rel=1e-6)


def test_early_stopping_stops_all_workers_like_transformers(tmp_path):
    data, held_out = regression_dataset(64), regression_dataset(16, seed=1)
    # A learning rate so large that eval loss gets worse quickly: early stopping must end training.
    common = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, learning_rate=1.5,
                  load_best_model_at_end=True, metric_for_best_model="eval_loss", num_train_epochs=20,
                  save_total_limit=2)
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", **common)),
                                 train_dataset=data, eval_dataset=held_out,
                                 callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2,
                                                                              per_device_train_batch_size=4, **common)),
                   train_dataset=data, eval_dataset=held_out, callbacks=[EarlyStoppingCallback(2)])
    ours.train()
    assert ours.state.global_step == theirs.state.global_step < ours.state.max_steps
    assert os.path.basename(ours.state.best_model_checkpoint) == os.path.basename(theirs.state.best_model_checkpoint)
    assert ours.state.best_metric == pytest.approx(theirs.state.best_metric, rel=1e-4)
    assert_weights_close(theirs.model, ours.model)  # the best weights, loaded at the end
    assert sorted(os.listdir(tmp_path / "rt")) == sorted(os.listdir(tmp_path / "hf"))
