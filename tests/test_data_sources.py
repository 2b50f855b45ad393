"""Data in every form the Trainer accepts: datasets (Arrow), torch map/iterable datasets, Ray Data streams."""

import numpy as np
import pytest
import torch
import transformers

from helpers import RegressionModel, TorchRegressionDataset, regression_dataset
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.data_transport import ArrowDataset, DatasetSender, rebuild


def settings(tmp_path, name, **overrides):
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, learning_rate=0.05,
                  logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return values


@pytest.mark.usefixtures("ray_session")
def test_a_dataset_travels_once_as_arrow_and_keeps_rows_order_and_format():
    data = regression_dataset(20).shuffle(seed=3).select(range(7)).with_format("torch", columns=["x", "labels"])
    sender = DatasetSender()
    stand_in = sender.stand_in(data, {}, "train")
    assert isinstance(stand_in, ArrowDataset)
    assert sender.stand_in(data, {}, "train") is stand_in  # put in the object store once per Trainer
    rebuilt = rebuild(stand_in)
    assert len(rebuilt) == 7 and rebuilt.format["type"] == "torch" and rebuilt._fingerprint == data._fingerprint
    assert torch.equal(rebuilt[:]["x"], data[:]["x"]) and set(rebuilt[0]) == {"x", "labels"}
    both = rebuild(sender.stand_in({"a": data, "b": regression_dataset(3)}, {}, "eval"))
    assert set(both) == {"a", "b"} and len(both["b"]) == 3


class StreamOfRegressionRows(torch.utils.data.IterableDataset):
    def __iter__(self):
        data = regression_dataset(64)
        for x, y in zip(data["x"], data["labels"]):
            yield {"x": torch.tensor(x), "labels": torch.tensor(y)}


@pytest.mark.usefixtures("ray_session")
def test_torch_map_dataset_matches_transformers(tmp_path):
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", max_steps=12)),
                                 train_dataset=TorchRegressionDataset())
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(tmp_path, "rt", max_steps=12)),
                   train_dataset=TorchRegressionDataset())
    ours.train()
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_iterable_dataset_on_two_workers_matches_transformers(tmp_path):
    theirs, _ = run_transformers(RegressionModel(), transformers.TrainingArguments(**settings(tmp_path, "hf", max_steps=8)),
                                 train_dataset=StreamOfRegressionRows())
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(
        tmp_path, "rt", max_steps=8, num_workers=2, per_device_train_batch_size=4)), train_dataset=StreamOfRegressionRows())
    ours.train()
    assert_weights_close(theirs.model, ours.model, tol=1e-5)


@pytest.mark.usefixtures("ray_session")
def test_ray_data_stream_trains_on_two_workers(tmp_path):
    import ray.data

    data = regression_dataset(256)
    stream = ray.data.from_items([{"x": float(x), "labels": float(y)} for x, y in zip(data["x"], data["labels"])])
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(
        tmp_path, "rt", max_steps=30, num_workers=2, per_device_train_batch_size=8, learning_rate=0.1)),
        train_dataset=stream)
    output = ours.train()
    losses = [e["loss"] for e in ours.state.log_history if "loss" in e]
    assert output.global_step == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert ours.model.a.item() == pytest.approx(2.0, abs=0.6)
