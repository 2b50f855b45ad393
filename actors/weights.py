"""Versioned weight sync from the trainer actor to the generator actor.

`pack_weights` views every distinct tensor of a model's state dict (tied weights once) as a numpy byte
array, without copying: returned from an actor, the list goes through Ray's object store as ONE object
(written once, as a plain `ray.put` writes it) and a reader on the same node maps it without a copy.
`unpack_weights` copies the bytes into the receiving model's tensors. `WeightBroadcastGroup` is the GPU
path: the tensors packed into one flat device buffer, broadcast over a NCCL (or, on CPU, gloo) process
group of its own, outside the trainers' DDP group.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
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
    """The tensors sent, in order, with their offsets in a flat buffer; `aliases` maps each tied name to
    the name actually sent."""

    slots: list[TensorSlot]
    aliases: dict[str, str]
    total_bytes: int


@dataclass
class WeightVersion:
    """One sync's payload: the version number (weights after `version` trainer steps) and the bytes."""

    version: int
    layout: WeightLayout
    arrays: list[np.ndarray]  # one uint8 array per layout slot; all of them one object in the object store
    pack_seconds: float = 0.0
    packed_at: float = 0.0  # time.time() when packing began: a reader on the node times the whole sync

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)


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


def _load_slots(model: torch.nn.Module, slots: list[TensorSlot], byte_tensors) -> None:
    """Copy each slot's bytes into `model`'s tensor of that name, in place (tied tensors are written once)."""
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for slot, data in zip(slots, byte_tensors):
            target = targets[slot.name]
            target.copy_(data.view(slot.dtype).view(slot.shape).to(target.device), non_blocking=True)


def unpack_from(flat: torch.Tensor, layout: WeightLayout, model: torch.nn.Module) -> None:
    """Copy the bytes of `flat` into `model`'s tensors."""
    _load_slots(model, layout.slots, (flat[slot.offset: slot.offset + slot.nbytes] for slot in layout.slots))


def _byte_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a numpy array without a copy (any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def pack_weights(model: torch.nn.Module, version: int) -> WeightVersion:
    """The model's weights as uint8 numpy arrays, ready to return from an actor or `ray.put`.

    On CPU the arrays are views of the live weights: serialize the payload (return it from the actor,
    `ray.put` it) before the model changes, as Ray does with an actor method's return value."""
    packed_at, started = time.time(), time.perf_counter()
    state_dict = model.state_dict()
    layout = weight_layout(state_dict)
    arrays = [_byte_array(state_dict[slot.name]) for slot in layout.slots]
    return WeightVersion(version, layout, arrays, pack_seconds=time.perf_counter() - started, packed_at=packed_at)


def unpack_weights(payload: WeightVersion, model: torch.nn.Module) -> None:
    """Load a `WeightVersion` into `model`. The arrays may be read-only object-store mappings."""
    with warnings.catch_warnings():  # torch warns about read-only buffers; we only read from them
        warnings.simplefilter("ignore", UserWarning)
        byte_tensors = [torch.from_numpy(array) for array in payload.arrays]
    _load_slots(model, payload.layout.slots, byte_tensors)


class WeightBroadcastGroup:
    """A process group of the trainer (rank 0) and the generators, used only to broadcast weights.

    It is built from a TCPStore directly, so it does not disturb the default process group the DDP
    trainers use. On GPUs the backend is NCCL and the flat buffer stays on the device; on CPU, gloo.
    The layout travels once through Ray; each sync is then a single `broadcast` of `total_bytes` bytes.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 timeout: timedelta = timedelta(minutes=2)):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend={backend!r}: weight broadcast runs on 'nccl' (GPU) or 'gloo' (CPU).")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # as torch.distributed sets it for its own groups
            self.group = dist.ProcessGroupNCCL(dist.PrefixStore("weights", self.store), rank, world_size, options)
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
