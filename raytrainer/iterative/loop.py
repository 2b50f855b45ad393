"""The rollout loop behind `IterativeSFTTrainer.train`: sample -> score -> keep -> train -> sync, per round.

With `max_staleness=0` each round waits for the previous round's weights. With `max_staleness=1` the
generator samples round k+1 (with the weights of round k-1) while the trainer trains round k; the
weight sync for round k then queues behind that sampling. Every rollout carries the weight version
that produced it, and a round is re-sampled if it is staler than allowed.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import ray
import torch
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from actors.rollouts import KeepRule


def _prompt_list(prompts) -> list[str]:
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        if "prompt" not in prompts.column_names:
            raise ValueError(f"The prompts dataset has columns {prompts.column_names}; it needs a 'prompt' column.")
        prompts = prompts["prompt"]
    if isinstance(prompts, str) or not hasattr(prompts, "__iter__"):
        raise ValueError("prompts must be a list of strings or a datasets.Dataset with a 'prompt' column.")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings.")
    return prompts


def round_prompts(prompts: list[str], round_index: int, per_round: int, seed: int) -> list[str]:
    """The prompts of a round: walk seeded per-epoch permutations, so a resumed run sees the same ones."""
    n, chosen = len(prompts), []
    for i in range(round_index * per_round, (round_index + 1) * per_round):
        epoch, position = divmod(i, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        chosen.append(prompts[int(order[position])])
    return chosen


class RolloutLoop:
    """One `train()` call. Arguments are checked here, on the driver, before any actor does work."""

    def __init__(self, trainer, prompts, reward_fn: Callable, num_rounds: int, *, prompts_per_round: int | None,
                 samples_per_prompt: int, keep_rule: KeepRule, max_staleness: int, generation_kwargs: dict | None):
        self.prompts = _prompt_list(prompts)
        if not callable(reward_fn):
            raise ValueError(f"reward_fn must be callable as reward_fn(prompts, completions) -> list[float], got "
                             f"{type(reward_fn).__name__}.")
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds={num_rounds!r} is invalid: use a whole number >= 1.")
        if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt={samples_per_prompt!r} is invalid: use a whole number >= 1.")
        if max_staleness not in (0, 1):
            raise ValueError(f"max_staleness={max_staleness!r} is not supported: use 0 (on-policy) or 1 "
                             "(sample the next round while this one trains).")
        prompts_per_round = prompts_per_round or len(self.prompts)
        if not isinstance(prompts_per_round, int) or not 1 <= prompts_per_round <= len(self.prompts):
            raise ValueError(f"prompts_per_round={prompts_per_round!r} is invalid: use 1..{len(self.prompts)} "
                             "(the number of prompts).")
        generation_kwargs = {"do_sample": True, **(generation_kwargs or {})}
        if "num_return_sequences" in generation_kwargs:
            raise ValueError("Set samples_per_prompt instead of generation_kwargs['num_return_sequences'].")
        self.trainer, self.reward_fn, self.num_rounds = trainer, reward_fn, num_rounds
        self.prompts_per_round, self.samples_per_prompt = prompts_per_round, samples_per_prompt
        self.keep_rule, self.max_staleness, self.generation_kwargs = keep_rule, max_staleness, generation_kwargs
        self.last_saved_step = trainer.state.global_step

    def round_prompts(self, round_index: int) -> list[str]:
        return round_prompts(self.prompts, round_index, self.prompts_per_round, self.trainer.args.seed)

    def _launch(self, round_index: int):
        return self.trainer._generator.rollout_round.options(num_returns=2).remote(
            round_index, self.round_prompts(round_index), self.reward_fn, self.keep_rule,
            self.samples_per_prompt, self.generation_kwargs,
            os.path.abspath(self.trainer.args.output_dir))  # the actor's working directory is not the driver's

    def _await_rollouts(self, round_index: int, pending: dict) -> tuple[dict, Any]:
        """Wait for a round's rollouts; restart a dead generator; re-sample rollouts that are too stale."""
        while True:
            summary_ref, examples_ref = pending.pop(round_index)
            try:
                summary = ray.get(summary_ref)
            except RayActorError:
                self.trainer._restart_generator()
                self.restarts += 1
                pending[round_index] = self._launch(round_index)
                continue
            if self.trainer._trainer_version - summary["weight_version"] <= self.max_staleness:
                return summary, examples_ref
            pending[round_index] = self._launch(round_index)  # the latest weights are already queued

    def _finish_sync(self, sync_ref, issued_at: float, generator) -> dict[str, float]:
        try:
            info = ray.get(sync_ref)
        except RayActorError:  # the generator died: its replacement is loaded with these weights
            if generator is self.trainer._generator:  # not yet replaced while awaiting rollouts
                self.trainer._restart_generator()
                self.restarts += 1
            return {"sync_seconds": math.nan, "sync_bytes": 0}
        return {"sync_seconds": info["pack_seconds"] + info["load_seconds"], "sync_bytes": info["nbytes"],
                "sync_wall_seconds": time.perf_counter() - issued_at if self.max_staleness == 0 else math.nan}

    def _complete(self, entry: dict, sync_ref, issued_at: float, generator, progress) -> None:
        if sync_ref is None:  # a broadcast group: sync now that the generator has no sampling queued
            issued_at, sync_ref = time.perf_counter(), self.trainer._publish_and_sync()
            generator = self.trainer._generator
        entry.update(self._finish_sync(sync_ref, issued_at, generator))
        trainer = self.trainer
        trainer.history.append(entry)
        trainer.state.log_history.append({**entry, "step": trainer.state.global_step})
        for callback in trainer.callbacks:
            callback.on_log(trainer.args, trainer.state, trainer.control, logs=dict(entry))
        progress.update(1)
        progress.set_postfix(reward=f"{entry['reward_mean']:.3f}", kept=entry["kept"], loss=f"{entry['loss']:.3f}")
        if self._should_save(entry["round"]):
            trainer._save_round_checkpoint(completed_rounds=entry["round"] + 1)
            self.last_saved_step = trainer.state.global_step

    def _should_save(self, round_index: int) -> bool:
        args = self.trainer.args
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy == "epoch" or (strategy != "no" and round_index + 1 == self.num_rounds):
            return strategy != "no"
        if strategy == "steps":
            every = max(1, int(args.save_steps))
            return self.trainer.state.global_step // every > self.last_saved_step // every
        return False

    def run(self, start_round: int) -> list[dict[str, Any]]:
        trainer = self.trainer
        self.restarts = 0
        ray.get(trainer._publish_and_sync())  # the generator starts from the trainer's weights
        for callback in trainer.callbacks:
            callback.on_train_begin(trainer.args, trainer.state, trainer.control)
        progress = tqdm(total=self.num_rounds, initial=start_round, desc="rounds", disable=trainer.args.disable_tqdm)
        pending, deferred = {}, None
        for round_index in range(start_round, self.num_rounds):
            started = time.perf_counter()
            if round_index not in pending:
                pending[round_index] = self._launch(round_index)
            summary, examples_ref = self._await_rollouts(round_index, pending)
            if deferred is not None:  # staleness 1: last round's sync was queued behind this sampling
                self._complete(*deferred, progress)
                deferred = None
            if self.max_staleness >= 1 and round_index + 1 < self.num_rounds:
                pending[round_index + 1] = self._launch(round_index + 1)
            rollout_version, version_before = summary["weight_version"], trainer._trainer_version
            train_started = time.perf_counter()
            generator = trainer._ensure_generator()
            stats, sync_ref = trainer._train_examples(examples_ref, sync=True)  # weights go on to the generator
            issued_at = time.perf_counter()
            train_seconds = issued_at - train_started
            entry = {
                **{k: v for k, v in summary.items() if k != "weight_version"},
                "rollout_weight_version": rollout_version, "staleness": version_before - rollout_version,
                "loss": stats["loss"], "learning_rate": stats.get("learning_rate", math.nan),
                "grad_norm": stats.get("grad_norm", math.nan), "num_tokens": stats["num_tokens"],
                "global_step": stats["global_step"], "weight_version": stats["weight_version"],
                "train_seconds": train_seconds, "round_seconds": time.perf_counter() - started,
                "generator_restarts": self.restarts,
            }
            if self.max_staleness == 0:
                self._complete(entry, sync_ref, issued_at, generator, progress)
            else:
                deferred = (entry, sync_ref, issued_at, generator)
        if deferred is not None:
            self._complete(*deferred, progress)
        progress.close()
        for callback in trainer.callbacks:
            callback.on_train_end(trainer.args, trainer.state, trainer.control)
        return trainer.history
