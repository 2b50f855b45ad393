"""Versioned weight sync from the trainer actor to the generator actor.

Through the object store, weights travel as `raytrainer.backend.weights.pack_weights` packs them (one object of
numpy byte views, tied weights once) and `unpack_weights` loads them. `WeightBroadcastGroup` is the GPU
path: the tensors packed into one flat device buffer, broadcast over a NCCL (or, on CPU, gloo) process
group of its own, outside the trainers' DDP group.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from raytrainer.backend.weights import WeightLayout, load_slots


def pack_into(state_dict: dict[str, torch.Tensor], layout: WeightLayout, flat: torch.Tensor) -> torch.Tensor:
    """Copy the tensors into `flat` (uint8, `layout.total_bytes` long, on any device)."""
    for slot in layout.slots:
        source = state_dict[slot.name].detach().contiguous().reshape(-1).view(torch.uint8)
        flat[slot.offset: slot.offset + slot.nbytes].copy_(source)
    return flat


def unpack_from(flat: torch.Tensor, layout: WeightLayout, model: torch.nn.Module) -> None:
    """Copy the bytes of `flat` into `model`'s tensors."""
    load_slots(model, layout.slots, (flat[slot.offset: slot.offset + slot.nbytes] for slot in layout.slots))


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
