"""Shared pieces of the hyperparameter-search tests: a tiny regression task and its Trainer."""


import datasets
import numpy as np
import torch
from torch import nn

from raytrainer import Trainer, TrainingArguments


class RegressionModel(nn.Module):
    """y = a * x + b (accelerate's test model): two parameters, an exact loss."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        loss = nn.functional.mse_loss(y, labels) if labels is not None else None
        return (loss, y) if loss is not None else (y,)


def regression_data(n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    y = (2 * x + 3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    return datasets.Dataset.from_dict({"input_x": x, "labels": y})


def make_trainer(output_dir, callbacks=None, **overrides) -> Trainer:
    settings = dict(output_dir=str(output_dir), num_workers=1, max_steps=20, per_device_train_batch_size=16,
                    eval_strategy="steps", eval_steps=5, save_strategy="no", logging_steps=5,
                    report_to="none", disable_tqdm=True, seed=11)
    settings.update(overrides)
    return Trainer(model_init=RegressionModel, args=TrainingArguments(**settings),
                   train_dataset=regression_data(128, 0), eval_dataset=regression_data(32, 1), callbacks=callbacks)
