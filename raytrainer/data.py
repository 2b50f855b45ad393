"""Data on the workers: column removal, collators, batch sharding as accelerate does it, and Arrow transport.

Sharding follows transformers + accelerate exactly: one seeded permutation per epoch
(`SeedableRandomSampler`, seed `data_seed or seed` plus the epoch), cut into per-device batches that are dealt
to the ranks in turn (`BatchSamplerShard`). A global step therefore sees the same examples whether it runs on
1 worker with batch 2B or on 2 workers with batch B.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets
import pyarrow as pa
import torch
from accelerate.data_loader import BatchSamplerShard, IterableDatasetShard, SeedableRandomSampler, SkipBatchSampler
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.trainer_utils import RemoveColumnsCollator

from raytrainer.distributed import WorkerContext


def default_collator(processing_class: Any) -> Callable:
    """transformers' default: pad with the tokenizer/feature extractor when there is one."""
    if isinstance(processing_class, (PreTrainedTokenizerBase, SequenceFeatureExtractor)):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def model_input_columns(model: torch.nn.Module, label_names: list[str]) -> list[str]:
    """The columns a model's forward accepts, plus the label columns (transformers' signature columns)."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    columns = list(inspect.signature(forward).parameters.keys())
    return list(dict.fromkeys(columns + ["label", "label_ids"] + list(label_names)))


def remove_unused_columns(dataset: datasets.Dataset, columns: list[str], description: str) -> datasets.Dataset:
    """Drop the columns of a `datasets.Dataset` that the model does not accept."""
    ignored = [c for c in dataset.column_names if c not in columns]
    if len(ignored) == len(dataset.column_names):
        raise ValueError(
            f"No column of the {description} dataset ({dataset.column_names}) is accepted by the model's forward "
            f"({columns}). Tokenize the data so that it has the model's inputs (e.g. 'input_ids'), or set "
            "remove_unused_columns=False and pass a data_collator that builds the inputs."
        )
    return dataset.remove_columns(ignored) if ignored else dataset


def prepare_dataset_and_collator(dataset: Any, collator: Callable, columns: list[str] | None, description: str):
    """Apply `remove_unused_columns`: trim a datasets.Dataset, or wrap the collator for other datasets."""
    if columns is None:
        return dataset, collator
    if isinstance(dataset, datasets.Dataset):
        return remove_unused_columns(dataset, columns, description), collator
    return dataset, RemoveColumnsCollator(collator, signature_columns=columns, description=description,
                                          model_name="model")


# ---------------------------------------------------------------- Arrow through the object store
@dataclass
class ArrowPayload:
    """A `datasets.Dataset` reduced to its Arrow table (or a reference to it) and its output format.

    The driver puts the table in the Ray object store once; every worker reads it zero-copy.
    """

    table: Any  # pyarrow.Table, or an object-store reference to one
    format: dict = field(default_factory=dict)
    num_rows: int = 0
    fingerprint: str | None = None  # given to the rebuilt Dataset, so it never hashes the whole table


def to_arrow_payload(dataset: datasets.Dataset) -> ArrowPayload:
    if dataset._indices is not None:  # a shuffled/selected view: materialise the rows it points to
        dataset = dataset.flatten_indices()
    table = dataset.data.table
    if not isinstance(table, pa.Table):
        table = pa.table(table)
    return ArrowPayload(table=table, format=dict(dataset.format), num_rows=len(dataset),
                        fingerprint=dataset._fingerprint)


def from_arrow_payload(payload: ArrowPayload, table: pa.Table | None = None) -> datasets.Dataset:
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table if table is not None else payload.table),
                               fingerprint=payload.fingerprint or "raytrainer-arrow-payload")
    fmt = payload.format
    dataset.set_format(type=fmt.get("type"), columns=fmt.get("columns"),
                       output_all_columns=fmt.get("output_all_columns", False), **fmt.get("format_kwargs", {}))
    return dataset


# ---------------------------------------------------------------- dataloaders
def _loader_options(args: Any) -> dict:
    options = {"num_workers": args.dataloader_num_workers,
               "pin_memory": args.dataloader_pin_memory and torch.cuda.is_available()}
    if args.dataloader_num_workers > 0:
        options.update(persistent_workers=args.dataloader_persistent_workers,
                       prefetch_factor=args.dataloader_prefetch_factor,
                       multiprocessing_context=args.dataloader_multiprocessing_context)
    return options


def is_presharded(dataset: Any) -> bool:
    """Datasets that already hold only this worker's share (e.g. a Ray Data shard)."""
    return getattr(dataset, "is_presharded", False)


def train_dataloader(dataset: Any, collator: Callable, args: Any, context: WorkerContext, epoch: int,
                     skip_batches: int = 0) -> DataLoader:
    """This worker's training batches for `epoch`, optionally skipping the first `skip_batches` (resume)."""
    batch_size = args.per_device_train_batch_size
    if isinstance(dataset, IterableDataset):
        if context.world_size > 1 and not is_presharded(dataset):
            dataset = IterableDatasetShard(dataset, batch_size=batch_size, drop_last=args.dataloader_drop_last,
                                           num_processes=context.world_size, process_index=context.rank)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collator,
                          drop_last=args.dataloader_drop_last, **_loader_options(args))
    if str(args.train_sampling_strategy) == "sequential":
        sampler = SequentialSampler(dataset)
    else:
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = SeedableRandomSampler(dataset, data_seed=seed)
        sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, batch_size, drop_last=args.dataloader_drop_last)
    if context.world_size > 1:
        batches = BatchSamplerShard(batches, num_processes=context.world_size, process_index=context.rank)
    if skip_batches:
        batches = SkipBatchSampler(batches, skip_batches=skip_batches)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, **_loader_options(args))


def eval_dataloader(dataset: Any, collator: Callable, args: Any, context: WorkerContext) -> DataLoader:
    """This worker's evaluation batches: dataset order, dealt to ranks in turn, the last round padded."""
    batch_size = args.per_device_eval_batch_size
    if isinstance(dataset, IterableDataset):
        if context.world_size > 1 and not is_presharded(dataset):
            dataset = IterableDatasetShard(dataset, batch_size=batch_size, drop_last=args.dataloader_drop_last,
                                           num_processes=context.world_size, process_index=context.rank)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, **_loader_options(args))
    batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=args.dataloader_drop_last)
    if context.world_size > 1:
        batches = BatchSamplerShard(batches, num_processes=context.world_size, process_index=context.rank)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, **_loader_options(args))


def has_length(dataset: Any) -> bool:
    try:
        return len(dataset) is not None
    except (TypeError, ValueError, NotImplementedError):
        return False


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int | None:
    """The number of examples in a collated batch (transformers' find_batch_size)."""
    from transformers.trainer_pt_utils import find_batch_size

    return find_batch_size(batch)
