"""Bad input gets a clear error on the driver, before any worker starts."""

import threading

import pytest
import torch
import transformers

from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments


def args(tmp_path, **overrides):
    return TrainingArguments(str(tmp_path / "out"), report_to=[], disable_tqdm=True, **overrides)


def test_model_or_model_init_is_required(tmp_path):
    with pytest.raises(RuntimeError, match="requires either a `model` or a `model_init`"):
        Trainer(args=args(tmp_path))


def test_optimizers_and_optimizer_cls_and_kwargs_exclude_each_other(tmp_path):
    model = RegressionModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="either `optimizers` or `optimizer_cls_and_kwargs`"):
        Trainer(model=model, args=args(tmp_path), optimizers=(optimizer, None),
                optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    with pytest.raises(RuntimeError, match="model_init.*incompatible"):
        Trainer(model_init=lambda: RegressionModel(), args=args(tmp_path), optimizers=(optimizer, None))


def test_train_without_train_dataset(tmp_path):
    with pytest.raises(ValueError, match="needs a train_dataset"):
        Trainer(model=RegressionModel(), args=args(tmp_path)).train()


def test_evaluation_requested_without_eval_dataset(tmp_path):
    with pytest.raises(ValueError, match="no eval_dataset"):
        Trainer(model=RegressionModel(), args=args(tmp_path, eval_strategy="steps", eval_steps=5),
                train_dataset=regression_dataset(8))
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        Trainer(model=RegressionModel(), args=args(tmp_path)).evaluate()


def test_dataset_missing_a_required_model_input(tmp_path):
    data = regression_dataset(8).rename_column("x", "feature")
    with pytest.raises(ValueError, match=r"no column \['x'\]"):
        Trainer(model=RegressionModel(), args=args(tmp_path), train_dataset=data).train()


def test_dataset_without_labels_cannot_train(tmp_path):
    data = regression_dataset(8).remove_columns("labels")
    with pytest.raises(ValueError, match="no label"):
        Trainer(model=RegressionModel(), args=args(tmp_path), train_dataset=data).train()


def test_inconsistent_best_model_settings(tmp_path):
    with pytest.raises(ValueError):  # transformers' own check, raised when the arguments are built
        TrainingArguments(str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        Trainer(model=RegressionModel(), args=args(tmp_path, load_best_model_at_end=True, save_strategy="no"),
                train_dataset=regression_dataset(8))


def test_unimplemented_arguments_are_rejected_not_ignored(tmp_path):
    with pytest.raises(ValueError, match="neftune_noise_alpha=5"):
        Trainer(model=RegressionModel(), args=args(tmp_path, neftune_noise_alpha=5))
    with pytest.raises(ValueError, match="report_to"):
        Trainer(model=RegressionModel(), args=transformers.TrainingArguments(str(tmp_path), report_to=["mlflow"]))


def test_ray_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="num_workers=0"):
        args(tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="placement_strategy"):
        args(tmp_path, placement_strategy="EVERYWHERE")


def test_fp16_on_cpu_workers(tmp_path):
    with pytest.raises(ValueError, match="(?i)fp16"):
        Trainer(model=RegressionModel(), args=args(tmp_path, use_gpu=False, fp16=True),
                train_dataset=regression_dataset(8)).train()


class LockedModel(RegressionModel):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_unserializable_components_are_named(tmp_path, ray_session):
    with pytest.raises(TypeError, match="`model`.*cannot be serialized"):
        Trainer(model=LockedModel(), args=args(tmp_path), train_dataset=regression_dataset(8)).train()

    def metrics_with_lock(prediction, lock=threading.Lock()):
        return {}
    with pytest.raises(TypeError, match="`compute_metrics`.*cannot be serialized"):
        Trainer(model=RegressionModel(), args=args(tmp_path), eval_dataset=regression_dataset(8),
                compute_metrics=metrics_with_lock).evaluate()


def test_more_workers_or_gpus_than_the_cluster_has(tmp_path, ray_session):
    with pytest.raises(ValueError, match=r"500 workers x 1 CPU"):
        Trainer(model=RegressionModel(), args=args(tmp_path, num_workers=500),
                train_dataset=regression_dataset(8)).train()
    with pytest.raises(ValueError, match="GPU"):
        Trainer(model=RegressionModel(), args=args(tmp_path, use_gpu=True),
                train_dataset=regression_dataset(8)).train()


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        Trainer(model=RegressionModel(), args=args(tmp_path), train_dataset=regression_dataset(8)).train(
            resume_from_checkpoint=str(tmp_path))
