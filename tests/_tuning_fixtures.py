"""Shared pieces of the hyperparameter-search tests: the tiny regression task of tests/helpers.py and its Trainer."""

from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments


def regression_model() -> RegressionModel:
    """model_init: transformers calls it with no argument (or the trial)."""
    return RegressionModel()


def make_trainer(output_dir, callbacks=None, **overrides) -> Trainer:
    settings = dict(output_dir=str(output_dir), num_workers=1, max_steps=20, per_device_train_batch_size=16,
                    eval_strategy="steps", eval_steps=5, save_strategy="no", logging_steps=5,
                    report_to="none", disable_tqdm=True, seed=11)
    settings.update(overrides)
    return Trainer(model_init=regression_model, args=TrainingArguments(**settings),
                   train_dataset=regression_dataset(128, 0), eval_dataset=regression_dataset(32, 1), callbacks=callbacks)
