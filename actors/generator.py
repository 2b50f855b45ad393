"""The generator actor: holds the latest synced weights, samples completions, scores and keeps them."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import ray
import torch

from actors.rollouts import KeepRule, write_rollouts
from actors.sampling import can_share_prefill, sample_with_shared_prefill
from actors.weights import WeightBroadcastGroup
from raytrainer.backend.weights import WeightLayout, WeightVersion, unpack_weights
from raytrainer.iterative.sft_step import IGNORE_INDEX


def completion_tokens(sequence: list[int], eos_token_id: int | None) -> list[int]:
    """Generated tokens up to and including the first EOS (what follows it is padding)."""
    if eos_token_id is not None and eos_token_id in sequence:
        return sequence[: sequence.index(eos_token_id) + 1]
    return sequence


@ray.remote
class GeneratorActor:
    """Samples completions with the weights of the last `load_weights` call (its `weight_version`)."""

    def __init__(self, model, tokenizer, *, is_encoder_decoder: bool, num_threads: int, seed: int):
        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only generation continues the prompt's last token
        self.is_encoder_decoder = is_encoder_decoder
        self.seed = seed
        self.weight_version = 0

    def pid(self) -> int:
        return os.getpid()

    def load_weights(self, payload: WeightVersion) -> dict[str, float]:
        """Copy a synced weight version into the model and forget state computed with older weights."""
        started = time.perf_counter()
        unpack_weights(payload, self.model)
        self._loaded(payload.version)
        return {"weight_version": payload.version, "load_seconds": time.perf_counter() - started,
                "pack_seconds": payload.pack_seconds, "nbytes": payload.nbytes,
                "latency_seconds": time.time() - payload.packed_at}  # pack start -> loaded, queueing included

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Join the trainer's broadcast group (NCCL on GPUs) as a receiver."""
        self.weight_group = WeightBroadcastGroup(host, port, rank, world_size, backend)

    def receive_weights(self, layout: WeightLayout, version: int) -> dict[str, float]:
        """Receive one broadcast of the trainer's weights (the trainer calls `broadcast_weights`)."""
        started = time.perf_counter()
        self.weight_group.receive(self.model, layout)
        self._loaded(version)
        seconds = time.perf_counter() - started
        return {"weight_version": version, "load_seconds": seconds, "pack_seconds": 0.0,
                "nbytes": layout.total_bytes, "latency_seconds": seconds}

    def _loaded(self, version: int) -> None:
        self.model.__dict__.pop("_cache", None)  # a static KV cache transformers keeps between generate calls
        self.weight_version = version

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int | None = None, **generation_kwargs) -> dict[str, Any]:
        """Generate for `prompts`; returns prompt/completion token ids, decoded completions and the version.
        With `num_return_sequences=n`, the n samples of each prompt are consecutive."""
        if seed is not None:
            torch.manual_seed(seed)
        tokenizer = self.tokenizer
        encoded = tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        generation_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        samples = generation_kwargs.get("num_return_sequences", 1)
        if can_share_prefill(self.model, encoded, samples, generation_kwargs):
            kwargs = {k: v for k, v in generation_kwargs.items() if k != "num_return_sequences"}
            outputs = sample_with_shared_prefill(self.model, encoded, samples, **kwargs).tolist()
        else:
            outputs = self.model.generate(**encoded, **generation_kwargs).tolist()
        samples = len(outputs) // len(prompts)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        start = 1 if self.is_encoder_decoder else encoded["input_ids"].shape[1]  # skip decoder start / prompt
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.model.config.eos_token_id
        completion_ids = [completion_tokens(seq[start:], eos) for seq in outputs]
        return {
            "prompt_ids": [prompt_ids[i // samples] for i in range(len(outputs))],
            "completion_ids": completion_ids,
            "completions": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            "weight_version": self.weight_version,
        }

    def rollout_round(
        self, round_index: int, prompts: list[str], reward_fn: Callable, keep_rule: KeepRule,
        samples_per_prompt: int, generation_kwargs: dict, output_dir: str,
    ):
        """Sample, score and select one round; write it to Parquet; return (summary, training examples).

        The examples go straight to the trainer actor as an object reference; the driver gets the summary.
        """
        started = time.perf_counter()
        generated = self.sample(prompts, seed=self.seed + round_index,
                                num_return_sequences=samples_per_prompt, **generation_kwargs)
        generate_seconds = time.perf_counter() - started
        prompt_indices = [i // samples_per_prompt for i in range(len(generated["completions"]))]
        repeated_prompts = [prompts[i] for i in prompt_indices]
        rewards = [float(r) for r in reward_fn(repeated_prompts, generated["completions"])]
        if len(rewards) != len(repeated_prompts):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(repeated_prompts)} completions; "
                             "it must return one number per (prompt, completion) pair.")
        kept = keep_rule.select(rewards, prompt_indices)
        version = generated["weight_version"]
        write_rollouts(output_dir, round_index, {
            "round": [round_index] * len(rewards), "prompt_index": prompt_indices,
            "sample_index": [i % samples_per_prompt for i in range(len(rewards))],
            "prompt": repeated_prompts, "completion": generated["completions"], "reward": rewards,
            "kept": kept, "weight_version": [version] * len(rewards),
        })
        examples = [self._training_example(p, c) for p, c, k in
                    zip(generated["prompt_ids"], generated["completion_ids"], kept) if k]
        summary = {"round": round_index, "weight_version": version, "num_rollouts": len(rewards),
                   "kept": len(examples), "reward_mean": sum(rewards) / len(rewards),
                   "generate_seconds": generate_seconds, "rollout_seconds": time.perf_counter() - started}
        return summary, examples

    def _training_example(self, prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
        if self.is_encoder_decoder:
            return {"input_ids": prompt_ids, "attention_mask": [1] * len(prompt_ids), "labels": completion_ids}
        return {"input_ids": prompt_ids + completion_ids, "attention_mask": [1] * (len(prompt_ids) + len(completion_ids)),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}
