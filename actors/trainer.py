"""The trainer actor: runs SFT steps on examples; with several of them, a DDP group that shards each step."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from safetensors.torch import load_model

from actors.weights import WeightBroadcastGroup
from raytrainer.backend.weights import WeightLayout, WeightVersion, pack_weights, weight_layout
from raytrainer.iterative.sft_step import SFTStepper, build_optimizer_and_scheduler, pad_examples, truncate

STEPPER_STATE = "iterative_stepper.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class TrainerActor:
    """One rank of the trainer side. Every rank receives the whole step and trains on its slice.

    Args:
        bundle: `(model, optimizer, scheduler)` pickled together, so a user-given optimizer still
            points at this copy's parameters; optimizer/scheduler may be None (built from `args`).
        collator: turns a list of examples into a batch; None pads with `pad_token_id`.
    """

    def __init__(self, bundle, args, *, pad_token_id: int, collator, is_encoder_decoder: bool,
                 max_length: int | None, truncation_mode: str, optimize_device_cache: bool,
                 rank: int, world_size: int, num_threads: int):
        torch.set_num_threads(num_threads)
        model, optimizer, scheduler = bundle
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")
        model.to(self.device)  # moves parameters in place: a given optimizer keeps pointing at them
        optimizer, scheduler = build_optimizer_and_scheduler(model, args, (optimizer, scheduler))
        self.model, self.args, self.rank, self.world_size = model, args, rank, world_size
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.optimize_device_cache = optimize_device_cache
        collate = collator if collator is not None else (lambda examples: pad_examples(examples, pad_token_id))
        self.stepper = SFTStepper(model, args, optimizer, scheduler, is_encoder_decoder=is_encoder_decoder,
                                  collate=lambda examples: {k: v for k, v in collate(examples).items()
                                                            if k in ("input_ids", "attention_mask", "labels")},
                                  rank=rank, world_size=world_size)
        self.weight_version = 0

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        return ray.util.get_node_ip_address(), _free_port()

    def join_process_group(self, master_address: str, master_port: int) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_address}:{master_port}",
                                rank=self.rank, world_size=self.world_size)

    def train_examples(self, examples: list[dict[str, list[int]]], publish: bool = False):
        """One `step()` over `examples` (token lists with labels); returns the step's statistics, and with
        `publish` also the new weights (call with `num_returns=2`: the weights can go to the generator as
        soon as this returns, without a round trip through the driver)."""
        stats = self._train(examples)
        return (stats, self.publish_weights()) if publish else stats

    def _train(self, examples: list[dict[str, list[int]]]) -> dict:
        examples = [{k: truncate(v, self.max_length, self.truncation_mode) for k, v in e.items()} for e in examples]
        if not examples:  # a round where nothing was kept: the weights do not change
            return {"loss": float("nan"), "num_examples": 0, "num_tokens": 0, "optimizer_steps": 0,
                    "global_step": self.stepper.global_step, "weight_version": self.weight_version}
        stats = self.stepper.step(examples)
        self.weight_version += 1
        if self.optimize_device_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {**asdict(stats), "weight_version": self.weight_version}

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> WeightLayout:
        """Host a broadcast group (rank 0) for the generator(s); replaces an older group. Returns the layout
        the receivers need. Blocks until every receiver has joined."""
        self.weight_group = WeightBroadcastGroup(host, port, 0, world_size, backend)
        self.weight_layout = weight_layout(self.model.state_dict())
        return self.weight_layout

    def broadcast_weights(self) -> int:
        """Send the current weights over the broadcast group (one collective); returns their version."""
        self.weight_group.send(self.model, self.weight_layout)
        return self.weight_version

    def publish_weights(self) -> WeightVersion:
        """The current weights as byte views of its tensors, one object in the object store (no packing copy)."""
        return pack_weights(self.model, self.weight_version)

    def save_checkpoint(self, directory: str) -> None:
        """Rank 0 writes model (transformers layout), optimizer, scheduler and step counters."""
        if self.rank != 0:
            return
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        torch.save(self.stepper.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.stepper.scheduler.state_dict(), path / "scheduler.pt")
        torch.save(torch.get_rng_state(), path / "rng_state.pth")
        counters = {"global_step": self.stepper.global_step, "steps_called": self.stepper.steps_called,
                    "weight_version": self.weight_version}
        (path / STEPPER_STATE).write_text(json.dumps(counters))

    def load_checkpoint(self, directory: str) -> dict:
        """Every rank loads the same checkpoint, so the group continues in lockstep."""
        path = Path(directory)
        load_model(self.model, str(path / "model.safetensors"), device=str(self.device), strict=False)
        self.stepper.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.stepper.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng_state.pth", weights_only=True))
        counters = json.loads((path / STEPPER_STATE).read_text())
        self.stepper.global_step, self.stepper.steps_called = counters["global_step"], counters["steps_called"]
        self.weight_version = counters["weight_version"]
        return counters

    def pid(self) -> int:
        return os.getpid()
