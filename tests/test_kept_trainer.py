"""The workers keep the Trainer they built for the driver's Trainer: a second call continues it as transformers does in
one process (the same optimizer, its moments and steps), and the driver holds the optimizer and scheduler an
in-process Trainer would hold. A kept Trainer serves no other driver Trainer."""

import pytest
import torch
import transformers
from transformers import TrainerCallback

from helpers import (KillWorkerOnce, RegressionModel, killed_pid, regression_dataset, training_arguments,
                     training_settings)
from parity import assert_weights_close
from raytrainer import Trainer

pytestmark = pytest.mark.usefixtures("ray_session")


class MarksTheModel(TrainerCallback):
    """Records which model object each call ran on, and sets an attribute on the model at the end of training."""

    def __init__(self, sets_attribute: bool = True):
        self.model_ids, self.sets_attribute = [], sets_attribute

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model_ids.append(id(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.sets_attribute:
            model.train_calls = getattr(model, "train_calls", 0) + 1

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.model_ids.append(id(model))


def assert_optimizers_equal(theirs: transformers.Trainer, ours: Trainer) -> None:
    assert type(ours.optimizer) is type(theirs.optimizer)
    assert type(ours.optimizer.optimizer) is type(theirs.optimizer.optimizer)
    assert type(ours.lr_scheduler) is type(theirs.lr_scheduler)
    their_state, our_state = theirs.optimizer.state_dict(), ours.optimizer.state_dict()
    assert our_state["param_groups"] == their_state["param_groups"]
    assert our_state["state"].keys() == their_state["state"].keys()
    for index, values in their_state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(our_state["state"][index][name], values[name], rtol=1e-5, atol=1e-7)
    assert ours.lr_scheduler.state_dict() == theirs.lr_scheduler.state_dict()
    # The driver's optimizer steps the driver's model.
    assert [p for group in ours.optimizer.param_groups for p in group["params"]] == list(ours.model.parameters())


def test_a_second_train_continues_the_optimizer_and_the_driver_holds_it_as_transformers_does(tmp_path):
    data, held_out = regression_dataset(64), regression_dataset(16, seed=1)
    hf_args = transformers.TrainingArguments(**training_settings(tmp_path, "hf", max_steps=4))
    theirs = transformers.Trainer(model=RegressionModel(), args=hf_args, train_dataset=data, eval_dataset=held_out,
                                  callbacks=[MarksTheModel()])
    args = training_arguments(tmp_path, max_steps=4, num_workers=2, per_device_train_batch_size=4)
    marks = MarksTheModel()
    ours = Trainer(model=RegressionModel(), args=args, train_dataset=data, eval_dataset=held_out, callbacks=[marks])
    assert ours.optimizer is None and ours.lr_scheduler is None

    theirs.train()
    ours.train()
    assert_optimizers_equal(theirs, ours)
    assert ours.model.train_calls == 1

    theirs.args.max_steps = ours.args.max_steps = 6  # the driver's code changes the arguments between calls
    theirs.train()  # transformers keeps the optimizer (10 steps in all) and makes a new schedule
    ours.train()
    assert theirs.optimizer.state_dict()["state"][0]["step"].item() == 10
    assert_optimizers_equal(theirs, ours)
    assert_weights_close(theirs.model, ours.model, tol=1e-6)
    assert ours.state.global_step == theirs.state.global_step == 6
    assert ours.model.train_calls == theirs.model.train_calls == 2

    assert ours.evaluate()["eval_loss"] == pytest.approx(theirs.evaluate()["eval_loss"], rel=1e-5)
    assert ours.model.training is theirs.model.training is False
    assert len(marks.model_ids) == 3 and len(set(marks.model_ids)) == 1, "each call must run on the kept Trainer"
    ours.close()


def test_changed_weights_reach_the_kept_trainer_and_a_new_trainer_gets_a_fresh_one(tmp_path):
    data = regression_dataset(64)
    hf_args = transformers.TrainingArguments(**training_settings(tmp_path, "hf", max_steps=3))
    args = training_arguments(tmp_path, max_steps=3, num_workers=2, per_device_train_batch_size=4)
    theirs = transformers.Trainer(model=RegressionModel(), args=hf_args, train_dataset=data)
    marks = MarksTheModel()
    ours = Trainer(model=RegressionModel(), args=args, train_dataset=data, callbacks=[marks])
    theirs.train()
    ours.train()
    with torch.no_grad():  # the driver's code changes the weights between calls
        for model in (theirs.model, ours.model):
            model.a.fill_(1.0)
    theirs.train()
    ours.train()
    assert_optimizers_equal(theirs, ours)
    assert_weights_close(theirs.model, ours.model, tol=1e-6)
    assert len(set(marks.model_ids)) == 1

    # Another driver Trainer on the same model object takes over the idle group: its workers build its own Trainer,
    # with a fresh optimizer, as a new transformers Trainer starts one.
    group = ours._raytrainer_workers.group
    their_next = transformers.Trainer(model=theirs.model, args=hf_args, train_dataset=data)
    other_marks = MarksTheModel(sets_attribute=False)
    our_next = Trainer(model=ours.model, args=args, train_dataset=data, callbacks=[other_marks])
    their_next.train()
    our_next.train()
    assert our_next._raytrainer_workers.group is group
    assert our_next.optimizer.state_dict()["state"][0]["step"].item() == 3
    assert_optimizers_equal(their_next, our_next)
    assert_weights_close(their_next.model, our_next.model, tol=1e-6)
    assert other_marks.model_ids[0] not in marks.model_ids

    # The first Trainer takes the idle group back: the Trainer its workers keep is the second one's, which must not
    # serve it. They build its Trainer afresh, whose optimizer starts anew (3 steps, not 6 of the other's).
    ours.train()
    assert ours._raytrainer_workers.group is group
    assert ours.optimizer.state_dict()["state"][0]["step"].item() == 3
    ours.close()
    our_next.close()


def test_a_worker_killed_in_a_second_train_restarts_the_group_which_builds_the_trainer_again(tmp_path):
    """The restarted workers keep nothing: they build the Trainer and resume from the checkpoint the second call saved
    (whose optimizer state went on from the first call's), ending where transformers' two calls end."""
    data = regression_dataset(48)
    values = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=0.05)
    theirs = transformers.Trainer(model=RegressionModel(), train_dataset=data,
                                  args=transformers.TrainingArguments(**training_settings(tmp_path, "hf", **values)))
    ours = Trainer(model=RegressionModel(), train_dataset=data,
                   args=training_arguments(tmp_path, num_workers=2, max_failures=1, per_device_train_batch_size=4,
                                           **values))
    theirs.train()
    theirs.train()
    ours.train()
    marker = str(tmp_path / "killed.pid")
    ours.add_callback(KillWorkerOnce(6, marker))  # after the second call's checkpoint-4
    ours.train()
    assert killed_pid(marker)
    assert ours.state.global_step == 8
    assert_optimizers_equal(theirs, ours)
    assert_weights_close(theirs.model, ours.model, tol=1e-6)
    ours.close()
