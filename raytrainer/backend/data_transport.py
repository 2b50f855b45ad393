"""Datasets on their way to the workers: `datasets.Dataset` as Arrow through the object store, once; Ray Data as
Ray Train dataset shards.

A `datasets.Dataset` pickles its whole table into every message that holds it. Instead the driver puts its Arrow
table in the object store once per Trainer (`DatasetSender`), and sends a small `ArrowDataset` in its place; each
worker maps the table without a copy and gets back a `datasets.Dataset` with the same rows, format and
fingerprint, which transformers' Trainer then treats exactly as the original (column removal, sampling, sharding).
A `ray.data.Dataset` goes to `TorchTrainer(datasets=...)`; each worker reads its own shard (`RayDataShard`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
import torch.utils.data


@dataclass
class ArrowDataset:
    """Stands for a `datasets.Dataset` in a message: its Arrow table in the object store and its format."""

    table: Any  # [ObjectRef] of a pyarrow.Table (a list: the channel actor passes it on without fetching it)
    format: dict = field(default_factory=dict)
    fingerprint: str | None = None  # given to the rebuilt Dataset, so it never hashes the whole table

    def rebuild(self):
        import datasets

        table = ray.get(self.table[0])
        dataset = datasets.Dataset(datasets.table.InMemoryTable(table),
                                   fingerprint=self.fingerprint or "raytrainer-arrow-dataset")
        fmt = self.format
        dataset.set_format(type=fmt.get("type"), columns=fmt.get("columns"),
                           output_all_columns=fmt.get("output_all_columns", False), **fmt.get("format_kwargs", {}))
        if self.fingerprint:  # set_format gave it a new one: the driver's dataset's (caches, logs) is the same data
            dataset._fingerprint = self.fingerprint
        return dataset


@dataclass
class RayDataMarker:
    """Stands for a `ray.data.Dataset` passed to `TorchTrainer(datasets=...)` under `name`."""

    name: str

    def rebuild(self):
        return RayDataShard(ray.train.get_dataset_shard(self.name))


class RayDataShard(torch.utils.data.IterableDataset):
    """This worker's shard of a Ray Data stream, read row by row (the Trainer's collator batches it). It holds
    only this worker's rows already, so it is never split again across ranks (see `backend.worker`)."""

    is_presharded = True

    def __init__(self, shard):
        self.shard = shard

    def __iter__(self):
        yield from self.shard.iter_rows()


def is_ray_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("ray.data")


def arrow_table(dataset) -> pa.Table:
    """The rows of a `datasets.Dataset` as one Arrow table (a shuffled or selected view is materialised)."""
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    table = dataset.data.table
    return table if isinstance(table, pa.Table) else pa.table(table)


class DatasetSender:
    """The driver side: replaces datasets by their stand-ins, putting each Arrow table in the object store once.

    `ray_datasets` collects the Ray Data streams of one call, for the worker group to hand to Ray Train.
    """

    def __init__(self):
        self._sent: dict[int, tuple[Any, ArrowDataset]] = {}  # id(dataset) -> (dataset, its stand-in)

    def stand_in(self, value: Any, ray_datasets: dict[str, Any], name: str) -> Any:
        """`value` itself, or the stand-in of a dataset (or of each dataset of a dict of them)."""
        import datasets

        if isinstance(value, dict) and any(_is_dataset(v) for v in value.values()):
            return {key: self.stand_in(part, ray_datasets, f"{name}_{key}") for key, part in value.items()}
        if is_ray_dataset(value):
            ray_datasets[name] = value
            return RayDataMarker(name)
        if isinstance(value, datasets.Dataset):
            sent = self._sent.get(id(value))
            if sent is None or sent[0] is not value:
                sent = (value, ArrowDataset(table=[ray.put(arrow_table(value))], format=dict(value.format),
                                            fingerprint=value._fingerprint))
                self._sent[id(value)] = sent
            return sent[1]
        return value


def _is_dataset(value: Any) -> bool:
    import datasets

    return isinstance(value, datasets.Dataset) or is_ray_dataset(value)


def rebuild(value: Any) -> Any:
    """On a worker: the dataset a stand-in stands for (recursing into a dict of them); anything else as it is."""
    if isinstance(value, (ArrowDataset, RayDataMarker)):
        return value.rebuild()
    if isinstance(value, dict) and any(isinstance(v, (ArrowDataset, RayDataMarker)) for v in value.values()):
        return {key: rebuild(part) for key, part in value.items()}
    return value
