"""Data in every form the Trainer accepts: datasets (Arrow), torch map/iterable datasets, Ray Data streams."""

import pytest
import torch
import transformers

from helpers import RegressionModel, TorchRegressionDataset, regression_dataset, training_settings
from parity import assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.data_transport import ArrowDataset, DatasetSender, rebuild


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"learning_rate": 0.05, **overrides})


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
@pytest.mark.quick
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


class RecordRows:
    """A data collator that appends the row ids of each batch to `folder/rank-<rank>.txt` (the rows a rank trained on)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __call__(self, rows):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(f"{self.folder}/rank-{rank}.txt", "a") as file:
            file.write("".join(f"{row['id']}\n" for row in rows))
        return {"x": torch.tensor([row["x"] for row in rows]), "labels": torch.tensor([row["labels"] for row in rows])}


@pytest.mark.usefixtures("ray_session")
def test_ray_data_stream_is_split_between_the_two_workers_every_epoch(tmp_path):
    import ray.data

    data = regression_dataset(64)
    stream = ray.data.from_items([{"id": i, "x": float(x), "labels": float(y)}
                                  for i, (x, y) in enumerate(zip(data["x"], data["labels"]))])
    epochs, per_epoch = 3, 64 // (2 * 8)  # 2 workers x batch 8: 4 steps per epoch
    ours = Trainer(model=RegressionModel(), args=TrainingArguments(**settings(
        tmp_path, "rt", max_steps=epochs * per_epoch, num_workers=2, learning_rate=0.3, remove_unused_columns=False)),
        train_dataset=stream, data_collator=RecordRows(tmp_path))
    output = ours.train()
    assert output.global_step == epochs * per_epoch
    seen = [[int(i) for i in (tmp_path / f"rank-{rank}.txt").read_text().split()] for rank in (0, 1)]
    assert [len(rows) for rows in seen] == [epochs * 32] * 2  # each rank: half the rows, every epoch
    for epoch in range(epochs):
        shards = [set(rows[epoch * 32:(epoch + 1) * 32]) for rows in seen]
        assert not shards[0] & shards[1], epoch  # disjoint
        assert shards[0] | shards[1] == set(range(64)), epoch  # every row once per epoch
    def mse(model):  # on every row
        return torch.nn.functional.mse_loss(model(torch.tensor(data["x"]))[0], torch.tensor(data["labels"])).item()

    assert mse(ours.model) < 0.5 * mse(RegressionModel()), (mse(ours.model), mse(RegressionModel()))  # it trained
