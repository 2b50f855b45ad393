"""Model weights as numpy arrays: what crosses the Ray object store zero-copy (torch tensors get pickled)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns and are viewed back on arrival.
_RAW16 = {torch.bfloat16: torch.int16}


def state_dict_to_numpy(model: nn.Module) -> dict[str, tuple[np.ndarray, str]]:
    """`{name: (array, torch dtype name)}` for every parameter and buffer, on the CPU."""
    arrays = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        dtype = tensor.dtype
        if dtype in _RAW16:
            tensor = tensor.view(_RAW16[dtype])
        arrays[name] = (tensor.contiguous().numpy(), str(dtype).removeprefix("torch."))
    return arrays


def numpy_to_state_dict(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    state = {}
    for name, (array, dtype_name) in arrays.items():
        dtype = getattr(torch, dtype_name)
        tensor = torch.from_numpy(np.array(array, copy=True))  # object-store arrays are read-only
        state[name] = tensor.view(dtype) if dtype in _RAW16 else tensor
    return state


def load_numpy_state_dict(model: nn.Module, arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    """Copy weights from `state_dict_to_numpy` output into `model` in place (keeps its device and ties)."""
    model.load_state_dict(numpy_to_state_dict(arrays), strict=True)
