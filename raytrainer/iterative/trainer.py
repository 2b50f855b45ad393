"""IterativeSFTTrainer: TRL's iterative SFT API, with the generate -> score -> train loop on Ray actors.

The driver holds no training state of its own: a trainer actor (or a DDP group of them when
`args.num_workers > 1`) owns the model and optimizer, a generator actor samples with the latest synced
weights, and rollouts travel between them as object references.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import ray
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import rotate_checkpoints

from actors.generator import GeneratorActor
from actors.rollouts import KeepRule
from actors.trainer import TrainerActor
from raytrainer.arguments import TrainingArguments, ray_settings
from raytrainer.backend.cluster import ensure_ray, resolve_use_gpu
from raytrainer.backend.weights import unpack_weights
from raytrainer.iterative.arguments import check_iterative_arguments
from raytrainer.iterative.sft_step import TRUNCATION_MODES, check_open_ended_schedule, check_step_inputs, encode_examples

ROUND_STATE = "iterative_state.json"


class Generations(list):
    """Completions returned by `generate()`, with the weight version that produced them."""

    weight_version: int = 0


class IterativeSFTTrainer:
    """TRL's `IterativeSFTTrainer` (same constructor order) whose steps run on Ray actors.

    Args:
        model: a causal or sequence-to-sequence `PreTrainedModel`.
        args: `raytrainer.TrainingArguments` (or transformers'); `num_workers > 1` makes the trainer side a
            DDP group that shards each step's batch.
        tokenizer: the tokenizer (`processing_class` is accepted as its transformers-v5 name).
        optimizers: `(optimizer, scheduler)` over `model`'s parameters; defaults as transformers builds them.
            With `max_steps=-1` the default schedule is constant after warmup.
        data_collator: turns a list of `{"input_ids", "attention_mask", "labels"}` examples into a batch;
            defaults to right padding (labels padded with -100).
        eval_dataset, preprocess_logits_for_metrics, compute_metrics: for `evaluate()`.
        max_length: each sequence is truncated to this many tokens, per `truncation_mode`.
        truncation_mode: "keep_end" (drop the start) or "keep_start" (drop the end).
        optimize_device_cache: empty the CUDA cache after every step.
        callbacks: `TrainerCallback`s whose `on_log` receives each round's statistics.
    """

    def __init__(
        self, model: PreTrainedModel | None = None, args: TrainingArguments | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None, optimizers=(None, None), data_collator=None,
        eval_dataset=None, max_length: int | None = None, truncation_mode: str = "keep_end",
        preprocess_logits_for_metrics=None, compute_metrics=None, optimize_device_cache: bool = False,
        *, processing_class: PreTrainedTokenizerBase | None = None, callbacks: list[TrainerCallback] | None = None,
    ):
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("Both tokenizer and processing_class were given: they are the same argument "
                             "(processing_class is the transformers-v5 name); pass one of them.")
        tokenizer = tokenizer if tokenizer is not None else processing_class
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"model must be a transformers PreTrainedModel (causal or seq2seq LM), got "
                             f"{type(model).__name__}.")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer (or processing_class) must be a PreTrainedTokenizerBase, got "
                             f"{type(tokenizer).__name__}.")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={truncation_mode!r} is invalid: use 'keep_end' or 'keep_start'.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r} is invalid: use a positive number of tokens or None.")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token.")
        args = args if args is not None else TrainingArguments(output_dir="tmp_trainer", report_to="none")
        check_iterative_arguments(args)
        check_open_ended_schedule(args)
        if optimizers[0] is None and optimizers[1] is not None:
            raise ValueError("optimizers=(None, scheduler): a scheduler needs the optimizer it steps; pass both.")
        self.args, self.tokenizer, self.optimizers = args, tokenizer, optimizers
        self.data_collator, self.eval_dataset = data_collator, eval_dataset
        self.preprocess_logits_for_metrics, self.compute_metrics = preprocess_logits_for_metrics, compute_metrics
        self.max_length, self.truncation_mode, self.optimize_device_cache = max_length, truncation_mode, optimize_device_cache
        self.callbacks = list(callbacks or [])
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.state, self.control = TrainerState(), TrainerControl()
        self.history: list[dict[str, Any]] = []
        self._model, self._trainers, self._generator = model, [], None
        self._trainer_version, self._weights_ref, self._model_version, self._synced_version = 0, None, 0, 0
        # How weights reach the generator: "object_store", or a broadcast group on "nccl" (chosen on GPUs) or
        # "gloo"; None: chosen when the actors start.
        self._weight_transport: str | None = None
        self._weight_layout = None

    # ---- actors -------------------------------------------------------------------------------------
    def _cpus_per_actor(self) -> float:
        resources = ray_settings(self.args)["resources_per_worker"] or {}
        return float(resources.get("CPU", 1))

    def _gpus_per_actor(self) -> float:
        if not resolve_use_gpu(self.args):
            return 0.0
        return float((ray_settings(self.args)["resources_per_worker"] or {}).get("GPU", 1))

    def _start(self) -> None:
        """Start the trainer actor(s) and the generator once, on first use."""
        if self._trainers:
            return
        ensure_ray(ray_settings(self.args)["ray_address"])
        world_size = ray_settings(self.args)["num_workers"]
        cpus, gpus = self._cpus_per_actor(), self._gpus_per_actor()
        bundle_ref = ray.put((self._model, *self.optimizers))  # one pickle: optimizer keeps pointing at the model
        self._trainers = [
            TrainerActor.options(num_cpus=cpus, num_gpus=gpus).remote(
                bundle_ref, self.args, pad_token_id=self.pad_token_id, collator=self.data_collator,
                is_encoder_decoder=self.is_encoder_decoder, max_length=self.max_length,
                truncation_mode=self.truncation_mode, optimize_device_cache=self.optimize_device_cache,
                rank=rank, world_size=world_size, num_threads=max(1, int(cpus)))
            for rank in range(world_size)
        ]
        if world_size > 1:
            address, port = ray.get(self._trainers[0].address.remote())
            ray.get([t.join_process_group.remote(address, port) for t in self._trainers])
        if self._weight_transport is None:  # NCCL needs a GPU of its own for each side
            self._weight_transport = "nccl" if gpus >= 1 else "object_store"

    def _ensure_generator(self):
        """Start the generator on first use (a `step()`-only run never needs one)."""
        self._start()
        if self._generator is None:
            self._model_ref = ray.put(self._model)
            self._generator = self._new_generator()
            self._join_weight_group()
        return self._generator

    def _broadcasts(self) -> bool:
        return self._weight_transport in ("nccl", "gloo")

    def _join_weight_group(self) -> None:
        """With a broadcast transport: trainer rank 0 hosts a group of its own with the generator."""
        if not self._broadcasts():
            return
        host, port = ray.get(self._trainers[0].address.remote())
        layout = self._trainers[0].join_weight_group.remote(host, port, 2, self._weight_transport)
        ray.get(self._generator.join_weight_group.remote(host, port, 1, 2, self._weight_transport))
        self._weight_layout = ray.get(layout)

    def _new_generator(self):
        cpus = self._cpus_per_actor()
        return GeneratorActor.options(num_cpus=cpus, num_gpus=self._gpus_per_actor()).remote(
            self._model_ref, self.tokenizer, is_encoder_decoder=self.is_encoder_decoder,
            num_threads=max(1, int(cpus)), seed=self.args.seed)

    def _restart_generator(self) -> None:
        """Replace a dead generator; the new one gets the latest weights before any other call."""
        ray.kill(self._generator, no_restart=True)
        self._generator = self._new_generator()
        if self._broadcasts():  # a new group with the new generator, and the latest weights over it
            self._join_weight_group()
            self._publish_and_sync()
        elif self._weights_ref is not None:
            self._generator.load_weights.remote(self._weights_ref)

    def _publish_and_sync(self, weights_ref=None):
        """One sync: the trainer packs its weights once (or already did: `weights_ref`) and the generator reads
        them from the object store; with a broadcast group, the trainer sends and the generator receives."""
        generator = self._ensure_generator()
        self._synced_version = self._trainer_version
        if self._broadcasts():  # both sides of one collective; a failed send shows as the receive's error
            self._weights_ref = self._trainers[0].broadcast_weights.remote()
            return generator.receive_weights.remote(self._weight_layout, self._trainer_version)
        self._weights_ref = weights_ref if weights_ref is not None else self._trainers[0].publish_weights.remote()
        return generator.load_weights.remote(self._weights_ref)

    def _train_examples(self, examples_ref, sync: bool = False):
        """Train on the examples; with `sync`, rank 0 also returns the new weights, which the generator is
        told to load at once. Returns the statistics (and with `sync` the load's reference, or None when
        weights go over a broadcast group: both sides of a broadcast block, so the caller starts it when the
        generator has no sampling queued)."""
        publish = [sync and rank == 0 and not self._broadcasts() for rank in range(len(self._trainers))]
        calls = [t.train_examples.options(num_returns=2 if p else 1).remote(examples_ref, p)
                 for t, p in zip(self._trainers, publish)]
        sync_ref = None
        if publish[0]:
            calls[0], weights_ref = calls[0]
            sync_ref = self._publish_and_sync(weights_ref)
        stats = ray.get(calls)[0]
        self._trainer_version = stats["weight_version"]
        self.state.global_step = stats["global_step"]
        if not sync:
            return stats
        if sync_ref is not None:
            self._synced_version = self._trainer_version
        return stats, sync_ref  # None with a broadcast group: the caller syncs once the generator is idle

    # ---- TRL API --------------------------------------------------------------------------------------
    def step(self, input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None) -> dict[str, Any]:
        """One optimisation pass over the given examples (tensors or strings, as TRL) on the trainer actor(s).

        Returns the step's statistics: loss, learning_rate, grad_norm, num_tokens, num_examples,
        optimizer_steps, global_step (optimizer steps so far) and weight_version.
        """
        inputs = check_step_inputs(input_ids, attention_mask, labels, texts, texts_labels,
                                   is_encoder_decoder=self.is_encoder_decoder)
        examples = encode_examples(self.tokenizer, inputs, is_encoder_decoder=self.is_encoder_decoder,
                                   max_length=self.max_length, truncation_mode=self.truncation_mode)
        self._start()
        return self._train_examples(ray.put(examples))

    def generate(self, prompts: list[str] | str, **generation_kwargs) -> Generations:
        """Completions for `prompts` from the generator actor, using the latest trained weights.
        `num_return_sequences=n` gives n consecutive completions per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("generate() needs a non-empty list of prompt strings.")
        self._ensure_generator()
        if self._weights_ref is None or self._synced_version < self._trainer_version:
            ray.get(self._publish_and_sync())
        try:
            result = ray.get(self._generator.sample.remote(prompts, **generation_kwargs))
        except ray.exceptions.RayActorError:  # the generator died: restart it with the latest weights, retry once
            self._restart_generator()
            result = ray.get(self._generator.sample.remote(prompts, **generation_kwargs))
        generations = Generations(result["completions"])
        generations.weight_version = result["weight_version"]
        return generations

    @property
    def model(self) -> PreTrainedModel:
        """The current trained weights, fetched from the trainer actor into the driver's model."""
        if self._trainers and self._model_version != self._trainer_version:
            unpack_weights(ray.get(self._trainers[0].publish_weights.remote()), self._model)
            self._model_version = self._trainer_version
        return self._model

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the current model and tokenizer as a transformers directory."""
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate the current weights on `eval_dataset` (tokenized, with labels) as transformers.Trainer
        does, with `compute_metrics` and `preprocess_logits_for_metrics`."""
        from transformers import DataCollatorForSeq2Seq, Trainer

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset: pass it here or to the constructor.")
        collator = self.data_collator or DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100)
        evaluator = Trainer(model=self.model, args=self.args, data_collator=collator, processing_class=self.tokenizer,
                            compute_metrics=self.compute_metrics,
                            preprocess_logits_for_metrics=self.preprocess_logits_for_metrics)
        return evaluator.evaluate(dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def shutdown(self) -> None:
        """Stop the trainer and generator actors (they also stop when this object is garbage-collected).
        The trained weights are fetched into `model` first."""
        _ = self.model
        for actor in [*self._trainers, *([self._generator] if self._generator is not None else [])]:
            ray.kill(actor)
        self._trainers, self._generator = [], None

    def add_callback(self, callback: TrainerCallback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    # ---- the rollout loop --------------------------------------------------------------------------
    def train(
        self, prompts, reward_fn: Callable[[list[str], list[str]], list[float]], num_rounds: int, *,
        prompts_per_round: int | None = None, samples_per_prompt: int = 1, min_reward: float | None = None,
        best_k: int | None = None, max_staleness: int = 0, generation_kwargs: dict | None = None,
        resume_from_checkpoint: bool | str | None = None,
    ) -> list[dict[str, Any]]:
        """Rejection-sampling fine-tuning: each round samples, scores, keeps and trains, then syncs weights.

        Args:
            prompts: a list of strings or a `datasets.Dataset` with a "prompt" column.
            reward_fn: `reward_fn(prompts, completions) -> list[float]`, one reward per pair (runs on the
                generator actor).
            num_rounds: total rounds (including those done before a resume).
            prompts_per_round: prompts per round (default: all), taken in seeded shuffled order.
            samples_per_prompt: completions sampled per prompt.
            min_reward / best_k: keep samples with reward >= min_reward and/or the best k of each prompt.
            max_staleness: 0 = strictly on-policy; 1 = the generator samples round k+1 while round k trains.
            generation_kwargs: passed to `model.generate` (default `do_sample=True`).
            resume_from_checkpoint: True (latest under output_dir) or a checkpoint path: continue after
                the last completed round.

        Returns:
            One dict per round: reward_mean, kept, loss, weight_version, generate/train/sync seconds, ...
        """
        from raytrainer.iterative.loop import RolloutLoop  # the loop's bookkeeping lives in its own module

        loop = RolloutLoop(self, prompts, reward_fn, num_rounds, prompts_per_round=prompts_per_round,
                           samples_per_prompt=samples_per_prompt, keep_rule=KeepRule(min_reward, best_k),
                           max_staleness=max_staleness, generation_kwargs=generation_kwargs)
        self._start()
        start_round = self._resume(resume_from_checkpoint) if resume_from_checkpoint else 0
        return loop.run(start_round)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _save_round_checkpoint(self, completed_rounds: int) -> Path:
        """`output_dir/checkpoint-<global_step>/`: model, optimizer, scheduler and the round bookkeeping; older
        ones beyond `save_total_limit` are deleted, as transformers does."""
        final = Path(self.args.output_dir).resolve() / f"checkpoint-{self.state.global_step}"  # actors: another cwd
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        ray.get(self._trainers[0].save_checkpoint.remote(str(partial)))
        self.state.save_to_json(str(partial / "trainer_state.json"))
        (partial / ROUND_STATE).write_text(json.dumps({"completed_rounds": completed_rounds,
                                                       "history": self.history}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=self.args.save_total_limit)
        return final

    def _resume(self, checkpoint: bool | str) -> int:
        path = Path(checkpoint) if isinstance(checkpoint, str) else latest_round_checkpoint(self.args.output_dir)
        if path is None or not (path / ROUND_STATE).exists():
            raise ValueError(f"resume_from_checkpoint={checkpoint!r}: no iterative checkpoint found "
                             f"(looked for {ROUND_STATE} under {path or self.args.output_dir}).")
        counters = ray.get([t.load_checkpoint.remote(str(path.resolve())) for t in self._trainers])[0]
        saved = json.loads((path / ROUND_STATE).read_text())
        self.history = saved["history"]
        self.state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        self._trainer_version = counters["weight_version"]
        ray.get(self._publish_and_sync())
        return saved["completed_rounds"]


def latest_round_checkpoint(output_dir: str) -> Path | None:
    """The `checkpoint-<step>` directory with the highest step, or None."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / ROUND_STATE).exists()]
    return max(found)[1] if found else None
