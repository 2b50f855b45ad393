"""Versioned weight sync from the trainer actor to the generator actor.

`pack_weights` copies every distinct tensor of a model's state dict (tied weights once) into ONE flat
byte buffer, a numpy array: returned from an actor it goes through Ray's object store as a single
object, and a reader on the same node maps it without a copy. `unpack_weights` copies the bytes into
the receiving model's tensors. `WeightBroadcastGroup` is the GPU path: the same flat buffer broadcast
over a NCCL (or, on CPU, gloo) process group of its own, outside the trainers' DDP group.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

_ALIGNMENT = 64  # byte offsets aligned so every slice can be viewed as its dtype


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the flat buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class WeightLayout:
    """The flat buffer's table of contents; `aliases` maps each tied name to the name actually sent."""

    slots: list[TensorSlot]
    aliases: dict[str, str]
    total_bytes: int


@dataclass
class WeightVersion:
    """One sync's payload: the version number (weights after `version` trainer steps) and the bytes."""

    version: int
    layout: WeightLayout
    buffer: np.ndarray  # uint8, one object in the object store
    pack_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes


def weight_layout(state_dict: dict[str, torch.Tensor]) -> WeightLayout:
    """Assign each distinct tensor a slot; tensors sharing storage (tied embeddings) get one slot."""
    slots, aliases, seen, offset = [], {}, {}, 0
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(TensorSlot(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGNMENT) * _ALIGNMENT
    return WeightLayout(slots, aliases, offset)


def pack_into(state_dict: dict[str, torch.Tensor], layout: WeightLayout, flat: torch.Tensor) -> torch.Tensor:
    """Copy the tensors into `flat` (uint8, `layout.total_bytes` long, on any device)."""
    for slot in layout.slots:
        source = state_dict[slot.name].detach().contiguous().reshape(-1).view(torch.uint8)
        flat[slot.offset: slot.offset + slot.nbytes].copy_(source)
    return flat


def unpack_from(flat: torch.Tensor, layout: WeightLayout, model: torch.nn.Module) -> None:
    """Copy the bytes of `flat` into `model`'s tensors in place (tied tensors are written once)."""
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for slot in layout.slots:
            target = targets[slot.name]
            source = flat[slot.offset: slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            target.copy_(source.to(target.device), non_blocking=True)


def pack_weights(model: torch.nn.Module, version: int) -> WeightVersion:
    """The model's weights as one uint8 numpy buffer, ready to return from an actor or `ray.put`."""
    started = time.perf_counter()
    state_dict = model.state_dict()
    layout = weight_layout(state_dict)
    flat = pack_into(state_dict, layout, torch.empty(layout.total_bytes, dtype=torch.uint8))
    return WeightVersion(version, layout, flat.numpy(), pack_seconds=time.perf_counter() - started)


def unpack_weights(payload: WeightVersion, model: torch.nn.Module) -> None:
    """Load a `WeightVersion` into `model`. The buffer may be the read-only object-store mapping."""
    with warnings.catch_warnings():  # torch warns about read-only buffers; we only read from it
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(payload.buffer)
    unpack_from(flat, payload.layout, model)


class WeightBroadcastGroup:
    """A process group of the trainer (rank 0) and the generators, used only to broadcast weights.

    It is built from a TCPStore directly, so it does not disturb the default process group the DDP
    trainers use. On GPUs the backend is NCCL and the flat buffer stays on the device; on CPU, gloo.
    The layout travels once through Ray; each sync is then a single `broadcast` of `total_bytes` bytes.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout: timedelta = timedelta(minutes=10)):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend={backend!r}: weight broadcast runs on 'nccl' (GPU) or 'gloo' (CPU).")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(dist.PrefixStore("weights", self.store), rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore("weights", self.store), rank, world_size, timeout)
        self.flat: torch.Tensor | None = None

    def _buffer(self, layout: WeightLayout) -> torch.Tensor:
        if self.flat is None or self.flat.numel() != layout.total_bytes:
            self.flat = torch.empty(layout.total_bytes, dtype=torch.uint8, device=self.device)
        return self.flat

    def send(self, model: torch.nn.Module, layout: WeightLayout) -> None:
        """Rank 0: pack `model` into the device buffer and broadcast it."""
        flat = pack_into(model.state_dict(), layout, self._buffer(layout))
        self.group.broadcast(flat, 0).wait()

    def receive(self, model: torch.nn.Module, layout: WeightLayout) -> None:
        """Ranks > 0: receive the broadcast and copy it into `model`."""
        flat = self._buffer(layout)
        self.group.broadcast(flat, 0).wait()
        unpack_from(flat, layout, model)
