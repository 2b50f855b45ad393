"""raytrainer.Trainer is a transformers.Trainer: same constructor, same driver-side methods, and the user's own
subclass overrides run on the workers with transformers' numbers."""

import copy
import inspect

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from helpers import RegressionModel, regression_dataset, training_settings
from parity import assert_logs_close, assert_weights_close, run_raytrainer, run_transformers
from raytrainer import Trainer, TrainingArguments


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"max_steps": 12, **overrides})


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------- on the driver
def test_it_is_a_transformers_trainer_with_transformers_constructor(tmp_path):
    trainer = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt")),
                      train_dataset=regression_dataset(16))
    assert isinstance(trainer, transformers.Trainer)
    for method in ("__init__", "train", "evaluate", "predict", "hyperparameter_search"):
        ours = inspect.signature(getattr(Trainer, method)).parameters.values()
        theirs = inspect.signature(getattr(transformers.Trainer, method)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], method


def test_driver_methods_work_as_in_transformers(tmp_path):
    data, held_out = regression_dataset(16), regression_dataset(10, seed=1)
    theirs = transformers.Trainer(model=RegressionModel(), args=transformers.TrainingArguments(**settings(tmp_path, "hf")),
                                  train_dataset=data, eval_dataset=held_out)
    their_batches = [batch for batch in theirs.get_train_dataloader()]
    their_eval = [batch["labels"].tolist() for batch in theirs.get_eval_dataloader()]
    their_optimizer = theirs.create_optimizer()
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2)),
                   train_dataset=data, eval_dataset=held_out)
    assert ours.model.a.device.type == "cpu" and ours.args.device.type == "cpu"
    assert ours.accelerator.num_processes == 1  # the driver is one process; the workers have their own
    batches = [batch for batch in ours.get_train_dataloader()]
    assert len(batches) == len(their_batches)
    for mine, expected in zip(batches, their_batches):
        assert torch.equal(mine["x"], expected["x"]) and torch.equal(mine["labels"], expected["labels"])
    assert [batch["labels"].tolist() for batch in ours.get_eval_dataloader()] == their_eval
    assert len(ours.get_test_dataloader(held_out)) == len(theirs.get_test_dataloader(held_out))
    optimizer = ours.create_optimizer()
    assert type(optimizer) is type(their_optimizer)
    assert optimizer.defaults == their_optimizer.defaults
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in their_optimizer.param_groups]
    assert ours.compute_loss(ours.model, {"x": batches[0]["x"], "labels": batches[0]["labels"]}).item() == \
        pytest.approx(theirs.compute_loss(theirs.model, {"x": batches[0]["x"], "labels": batches[0]["labels"]}).item())
    assert ours.is_world_process_zero() and ours.is_local_process_zero()


@pytest.mark.parametrize("case", ["no model", "model and model_init", "model_init and optimizers",
                                  "evaluation without eval_dataset", "best model without metric"])
def test_constructor_errors_are_transformers_own(tmp_path, case):
    def attempt(trainer_class, args_class):
        arguments = {"evaluation without eval_dataset": dict(eval_strategy="steps", eval_steps=2),
                     "best model without metric": dict(save_strategy="best")}.get(case, {})
        kwargs = {"no model": {},
                  "model and model_init": dict(model=RegressionModel(), model_init=RegressionModel),
                  "model_init and optimizers": dict(model_init=RegressionModel, optimizers=(
                      torch.optim.SGD(RegressionModel().parameters(), lr=0.1), None))}.get(case, {"model": RegressionModel()})
        with pytest.raises(Exception) as caught:
            trainer_class(args=args_class(**settings(tmp_path, "x", **arguments)), **kwargs)
        return caught.value

    theirs, ours = attempt(transformers.Trainer, transformers.TrainingArguments), attempt(Trainer, TrainingArguments)
    assert type(ours) is type(theirs) and str(ours) == str(theirs)


# ---------------------------------------------------------------------------------------------- user subclasses
# Each override as a mixin, so that the same code runs in a subclass of raytrainer.Trainer and of transformers.Trainer.
class DoubledLoss:
    """compute_loss override: the loss scaled by 2 (its gradients too)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return (loss[0] * 2, loss[1]) if return_outputs else loss * 2


class HalvedStep:
    """training_step override: gradients of half the loss; the reported loss is the half too."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch) * 0.5
        self.accelerator.backward(loss)
        return loss.detach()


class ShiftedPrediction:
    """prediction_step override: predictions shifted by 100, loss unchanged."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return loss, (logits + 100 if logits is not None else None), labels


class SGDMomentum:
    """create_optimizer override: SGD with momentum instead of AdamW."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD((model or self.model).parameters(), lr=self.args.learning_rate,
                                             momentum=0.9)
        return self.optimizer


class FirstRows:
    """get_train_dataloader override: the first 16 rows in order, batches of 4, over and over."""

    def get_train_dataloader(self):
        rows = [self.train_dataset[i] for i in range(16)]
        return torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=self.data_collator)


class DoubledLossTrainer(DoubledLoss, Trainer):
    pass


class HalvedStepTrainer(HalvedStep, Trainer):
    pass


class ShiftedPredictionTrainer(ShiftedPrediction, Trainer):
    pass


class SGDMomentumTrainer(SGDMomentum, Trainer):
    pass


class FirstRowsTrainer(FirstRows, Trainer):
    pass


def _in_transformers(trainer_class):
    """The same override on transformers.Trainer."""
    return type(f"Transformers{trainer_class.__name__}", (trainer_class.__bases__[0], transformers.Trainer), {})


def _two_process_reference(trainer_class):
    return trainer_class is not FirstRowsTrainer  # a loader of the user's own is not split across ranks


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("trainer_class", [DoubledLossTrainer, HalvedStepTrainer, SGDMomentumTrainer,
                                           FirstRowsTrainer])
def test_training_overrides_run_on_the_workers_with_transformers_numbers(tmp_path, trainer_class):
    data = regression_dataset(64)
    reference = _in_transformers(trainer_class)
    theirs = reference(model=RegressionModel(), args=transformers.TrainingArguments(**settings(tmp_path, "hf")),
                       train_dataset=data)
    theirs.train()
    plain, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "plain")),
                                train_dataset=data)
    assert losses(theirs) != pytest.approx(losses(plain), rel=1e-3)  # the override changes the run

    one, _ = run_raytrainer(RegressionModel(), TrainingArguments(**settings(tmp_path, "one")),
                            trainer_class=trainer_class, train_dataset=data)
    assert type(one) is trainer_class
    assert_logs_close(theirs.state.log_history, one.state.log_history, rel=1e-4)
    assert_weights_close(theirs.model, one.model, tol=1e-4)
    if _two_process_reference(trainer_class):
        two, _ = run_raytrainer(RegressionModel(), TrainingArguments(**settings(
            tmp_path, "two", num_workers=2, per_device_train_batch_size=4)), trainer_class=trainer_class,
            train_dataset=data)
        assert_logs_close(theirs.state.log_history, two.state.log_history, rel=1e-4)
        assert_weights_close(theirs.model, two.model, tol=1e-5)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.quick
def test_prediction_step_override_runs_on_the_workers(tmp_path):
    held_out = regression_dataset(16, seed=1)  # whole batches on 2 workers: the loss is the same mean
    theirs = _in_transformers(ShiftedPredictionTrainer)(
        model=RegressionModel(1.0, 2.0), args=transformers.TrainingArguments(**settings(tmp_path, "hf")))
    expected = theirs.predict(held_out)
    ours = ShiftedPredictionTrainer(model=RegressionModel(1.0, 2.0),
                                    args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2)))
    actual = ours.predict(held_out)
    assert actual.predictions.min() > 90  # the override ran
    np.testing.assert_allclose(actual.predictions, expected.predictions, rtol=1e-6)
    assert actual.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-6)
    assert ours.evaluate(held_out)["eval_loss"] == pytest.approx(theirs.evaluate(held_out)["eval_loss"], rel=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_changes_made_on_the_driver_after_construction_reach_the_workers(tmp_path):
    data = regression_dataset(64)

    def prepared(trainer):
        trainer.model.a.requires_grad_(False)  # a frozen parameter
        trainer.train_dataset = data.select(range(32))  # another dataset
        trainer.model_accepts_loss_kwargs = False
        return trainer

    theirs = prepared(transformers.Trainer(model=RegressionModel(), train_dataset=data,
                                           args=transformers.TrainingArguments(**settings(tmp_path, "hf"))))
    theirs.train()
    ours = prepared(Trainer(model=RegressionModel(), train_dataset=data,
                            args=TrainingArguments(**settings(tmp_path, "rt"))))
    ours.train()
    assert ours.model.a.item() == 0.0 and ours.model.b.item() != 0.0
    assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-5)
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


class LinearModel(nn.Module):
    """A model class of the test module (not importable on the workers), returning a dict with its own loss."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x, labels=None):
        y = self.linear(x.unsqueeze(-1)).squeeze(-1)
        return {"loss": ((y - labels) ** 2).mean(), "logits": y} if labels is not None else {"logits": y}


@pytest.mark.usefixtures("ray_session")
def test_a_transformers_trainer_and_a_raytrainer_live_in_one_process(tmp_path):
    data, held_out = regression_dataset(32), regression_dataset(8, seed=1)
    torch.manual_seed(0)
    model = LinearModel()

    def transformers_trainer(name):
        return transformers.Trainer(model=copy.deepcopy(model), train_dataset=data, eval_dataset=held_out,
                                    args=transformers.TrainingArguments(**settings(tmp_path, name)))

    first = transformers_trainer("hf1")  # transformers before raytrainer
    first.train()
    first_eval = first.evaluate()
    # a plain transformers.TrainingArguments works too (the Ray fields take their defaults: one CPU worker)
    ours = Trainer(model=copy.deepcopy(model), args=transformers.TrainingArguments(**settings(tmp_path, "rt")),
                   train_dataset=data, eval_dataset=held_out)
    ours.train()
    assert ours.evaluate()["eval_loss"] == pytest.approx(first_eval["eval_loss"], rel=1e-5)
    assert first.evaluate()["eval_loss"] == pytest.approx(first_eval["eval_loss"], rel=1e-6)  # still works after
    second = transformers_trainer("hf2")  # transformers after raytrainer
    second.train()
    assert second.evaluate()["eval_loss"] == pytest.approx(first_eval["eval_loss"], rel=1e-6)
    assert_weights_close(first.model, ours.model, tol=1e-5)


class WarnsAtTheEnd(transformers.TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        transformers.logging.get_logger("transformers.raytrainer_test").warning(
            f"trained {state.global_step} steps on rank {args.process_index}")


@pytest.mark.usefixtures("ray_session")
def test_transformers_logs_of_rank_zero_reach_the_drivers_loggers(tmp_path):
    import logging

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.levelno, record.getMessage()))

    handler = Collect()
    logging.getLogger("transformers").addHandler(handler)
    try:
        Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", num_workers=2,
                                                                          per_device_train_batch_size=4)),
                train_dataset=regression_dataset(32), callbacks=[WarnsAtTheEnd()]).train()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert ("transformers.raytrainer_test", logging.WARNING, "trained 12 steps on rank 0") in records
    assert not any("on rank 1" in message for *_, message in records)  # other ranks log where they run
