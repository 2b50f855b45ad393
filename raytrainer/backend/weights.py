"""Model weights as numpy byte arrays: what crosses Ray's object store without a copy (torch tensors get pickled).

`pack_state_dict` views every distinct tensor of a state dict (tied weights once) as a uint8 numpy array, without
copying on CPU: returned from a worker or actor, the payload goes through the object store as ONE object, and a
reader on the same node maps it without a copy. `unpack_weights` copies the bytes into a model's tensors in place
(its device, its ties and its optimizer's references stay); `state_dict_of` gives them to a model's own
`load_state_dict`. The trainer's results and the iterative SFT weight sync both use them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

_ALIGNMENT = 64  # byte offsets aligned so every slice of a flat buffer can be viewed as its dtype


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a flat buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class WeightLayout:
    """The tensors sent, in order, with their offsets in a flat buffer; `aliases` maps each tied name to the name
    actually sent."""

    slots: list[TensorSlot]
    aliases: dict[str, str]
    total_bytes: int


@dataclass
class WeightVersion:
    """One payload of weights: a version number (the weights after `version` trainer steps) and the bytes."""

    version: int
    layout: WeightLayout
    arrays: list[np.ndarray]  # one uint8 array per layout slot; all of them one object in the object store
    pack_seconds: float = 0.0
    packed_at: float = 0.0  # time.time() when packing began: a reader on the node times the whole transfer

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


def _byte_array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a CPU numpy array (no copy for a contiguous CPU tensor; any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def pack_state_dict(state_dict: dict[str, torch.Tensor], version: int = 0) -> WeightVersion:
    """The tensors of `state_dict` as uint8 numpy arrays, ready to return from a worker or `ray.put`.

    On CPU the arrays are views of the live tensors: serialize the payload before the model changes again."""
    packed_at, started = time.time(), time.perf_counter()
    layout = weight_layout(state_dict)
    arrays = [_byte_array(state_dict[slot.name]) for slot in layout.slots]
    return WeightVersion(version, layout, arrays, pack_seconds=time.perf_counter() - started, packed_at=packed_at)


def pack_weights(model: torch.nn.Module, version: int = 0) -> WeightVersion:
    """`pack_state_dict` of a model's own state dict."""
    return pack_state_dict(model.state_dict(), version)


def load_slots(model: torch.nn.Module, slots: list[TensorSlot], byte_tensors) -> None:
    """Copy each slot's bytes into `model`'s tensor of that name, in place (tied tensors are written once)."""
    targets = model.state_dict(keep_vars=True)
    missing = [slot.name for slot in slots if slot.name not in targets]
    if missing:
        raise KeyError(f"The weights name tensors the model does not have: {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for slot, data in zip(slots, byte_tensors):
            target = targets[slot.name]
            target.copy_(data.view(slot.dtype).view(slot.shape).to(target.device), non_blocking=True)


def state_dict_of(payload: WeightVersion) -> dict[str, torch.Tensor]:
    """The payload as a state dict (tied names included), for a model's own `load_state_dict` (which may resize
    buffers that grew, or map names, where an in-place copy could not). The tensors may be read-only mappings."""
    with warnings.catch_warnings():  # torch warns about read-only buffers; load_state_dict only reads them
        warnings.simplefilter("ignore", UserWarning)
        state = {slot.name: torch.from_numpy(array).view(slot.dtype).view(slot.shape)
                 for slot, array in zip(payload.layout.slots, payload.arrays)}
    state.update({alias: state[name] for alias, name in payload.layout.aliases.items()})
    return state


def unpack_weights(payload: WeightVersion, model: torch.nn.Module) -> None:
    """Load a `WeightVersion` into `model`. The arrays may be read-only object-store mappings."""
    with warnings.catch_warnings():  # torch warns about read-only buffers; we only read from them
        warnings.simplefilter("ignore", UserWarning)
        byte_tensors = [torch.from_numpy(array) for array in payload.arrays]
    load_slots(model, payload.layout.slots, byte_tensors)
