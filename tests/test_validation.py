"""Bad input gets a clear error on the driver, before any worker starts: transformers' own error where transformers
has one (raised at construction, as in transformers), ours with the cause and the fix where only Ray could find it."""

import threading

import pytest
import torch
import transformers

from helpers import RegressionModel, regression_dataset, training_arguments
from raytrainer import Trainer, TrainingArguments

# Each check must raise before any worker starts, also when an earlier test left Ray or an idle group running; the
# ones that need no cluster resources must raise before Ray is even connected to.
pytestmark = [pytest.mark.usefixtures("no_worker_start"), pytest.mark.quick]


def test_train_without_train_dataset(tmp_path, no_ray_start):
    with pytest.raises(ValueError, match="training requires a train_dataset"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out")).train()


def test_evaluate_without_eval_dataset(tmp_path, no_ray_start):
    with pytest.raises(ValueError, match="evaluation requires an eval_dataset"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out")).evaluate()


def test_dataset_missing_a_required_model_input(tmp_path, no_ray_start):
    data = regression_dataset(8).rename_column("x", "feature")
    with pytest.raises(ValueError, match=r"no \['x'\], which the model's forward requires"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out"), train_dataset=data).train()


def test_dataset_without_labels_cannot_train(tmp_path, no_ray_start):
    data = regression_dataset(8).remove_columns("labels")
    with pytest.raises(ValueError, match=r"no label \['labels'\]"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out"), train_dataset=data).train()


def test_a_collator_that_fails_is_named(tmp_path, no_ray_start):
    def broken(rows):
        raise KeyError("input_ids")

    with pytest.raises(ValueError, match="data_collator.*failed on the first examples of the training dataset"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out"), train_dataset=regression_dataset(8),
                data_collator=broken).train()


def test_ray_fields_are_validated(tmp_path, no_ray_start):
    with pytest.raises(ValueError, match="num_workers=0 is invalid: use a whole number >= 1"):
        training_arguments(tmp_path, "out", num_workers=0)
    with pytest.raises(ValueError, match="placement_strategy='EVERYWHERE' is invalid"):
        training_arguments(tmp_path, "out", placement_strategy="EVERYWHERE")
    with pytest.raises(ValueError, match="use_gpu=True contradicts use_cpu=True"):
        training_arguments(tmp_path, "out", use_gpu=True, use_cpu=True)
    with pytest.raises(ValueError, match="worker_idle_timeout=-1 is invalid"):
        training_arguments(tmp_path, "out", worker_idle_timeout=-1)


def test_fp16_on_cpu_workers(tmp_path, no_ray_start):
    with pytest.raises(ValueError, match="fp16=True needs GPUs"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out", use_gpu=False, fp16=True),
                train_dataset=regression_dataset(8)).train()


class LockedModel(RegressionModel):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_unserializable_components_are_named(tmp_path, ray_session):
    with pytest.raises(TypeError, match="`model` \\(LockedModel\\) cannot be serialized.*Make it picklable"):
        Trainer(LockedModel(), training_arguments(tmp_path, "out"), train_dataset=regression_dataset(8)).train()

    def metrics_with_lock(prediction, lock=threading.Lock()):
        return {}
    with pytest.raises(TypeError, match="`compute_metrics` \\(function\\) cannot be serialized.*Make it picklable"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out"), eval_dataset=regression_dataset(8),
                compute_metrics=metrics_with_lock).evaluate()


def test_more_workers_or_gpus_than_the_cluster_has(tmp_path, ray_session):
    with pytest.raises(ValueError, match=r"500 workers x 1 CPU = 500 CPU, but the Ray cluster has 8"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out", num_workers=500),
                train_dataset=regression_dataset(8)).train()
    with pytest.raises(ValueError, match="GPU.*Lower num_workers or resources_per_worker, or set use_gpu=False"):
        Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out", use_gpu=True),
                train_dataset=regression_dataset(8)).train()


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path, no_ray_start):
    trainer = Trainer(model=RegressionModel(), args=training_arguments(tmp_path, "out"),
                      train_dataset=regression_dataset(8))
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at .*nowhere"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"No valid checkpoint found in output directory \(.*out\)"):
        trainer.train(resume_from_checkpoint=True)


def test_errors_raised_by_transformers_come_from_transformers(tmp_path, no_ray_start):
    """The same construction mistakes give transformers' exception and message (the constructor is its own)."""
    model = RegressionModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [dict(model=model, optimizers=(optimizer, None), optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1})),
             dict(model=model, train_dataset=regression_dataset(8), arguments=dict(eval_strategy="steps",
                                                                                   eval_steps=5)),
             dict(model=model, arguments=dict(load_best_model_at_end=True, eval_strategy="steps",
                                              save_strategy="steps"))]
    for case in cases:
        arguments = case.pop("arguments", {})
        errors = []
        for trainer_class, args_class in ((transformers.Trainer, transformers.TrainingArguments),
                                          (Trainer, TrainingArguments)):
            with pytest.raises(Exception) as caught:
                trainer_class(args=args_class(str(tmp_path / "x"), report_to=[], **arguments), **case)
            errors.append(caught.value)
        assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1]), case
