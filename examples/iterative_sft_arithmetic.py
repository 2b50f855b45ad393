"""Rejection-sampling fine-tuning on integer addition with a tiny character-level GPT-2.

1. Warm up: supervised training on a small labelled set of "a+b=" -> "c" problems.
2. Iterate: `IterativeSFTTrainer.train` samples answers for unlabelled prompts, keeps the exactly
   correct ones (reward 1) and fine-tunes on them. Held-out greedy accuracy is printed after each round.

    python examples/iterative_sft_arithmetic.py              # full run (a few minutes on 2 CPU cores)
    python examples/iterative_sft_arithmetic.py --rounds 3   # shorter
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import ray

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (DataCollatorForSeq2Seq, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                          TrainerCallback)

from raytrainer import IterativeSFTTrainer, TrainingArguments

IGNORE_INDEX = -100
if __name__ != "__main__":  # imported by the tests or the benchmark: actors cannot import this file, so its
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # reward function travels by value


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of "0123456789+=", plus pad, EOS and unknown."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("0123456789+=")}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_model(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def addition_prompts(count: int, seed: int, max_operand: int = 49, exclude: set[str] = frozenset()) -> list[str]:
    """`count` distinct prompts "a+b=" with 0 <= a, b <= max_operand, none of them in `exclude`."""
    rng, prompts = random.Random(seed), []
    while len(prompts) < count:
        prompt = f"{rng.randint(0, max_operand)}+{rng.randint(0, max_operand)}="
        if prompt not in exclude and prompt not in prompts:
            prompts.append(prompt)
    return prompts


def answer(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def exact_match_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(c.strip() == answer(p)) for p, c in zip(prompts, completions)]


def labelled_dataset(prompts: list[str], tokenizer) -> Dataset:
    """Prompt + answer + EOS, with the loss on the answer and EOS only."""
    rows = {"input_ids": [], "labels": []}
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target = tokenizer(answer(prompt))["input_ids"] + [tokenizer.eos_token_id]
        rows["input_ids"].append(prompt_ids + target)
        rows["labels"].append([IGNORE_INDEX] * len(prompt_ids) + target)
    return Dataset.from_dict(rows)


def warm_up(model, tokenizer, prompts: list[str], epochs: int, output_dir: str, seed: int = 0):
    """Supervised warm-up on labelled problems with raytrainer's Trainer (one Ray Train worker)."""
    from raytrainer import Trainer

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=32, num_train_epochs=epochs,
                             learning_rate=3e-3, lr_scheduler_type="constant", save_strategy="no",
                             logging_strategy="no", report_to="none", disable_tqdm=True, seed=seed, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=labelled_dataset(prompts, tokenizer),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX))
    trainer.train()
    return trainer.model


def accuracy(trainer: IterativeSFTTrainer, prompts: list[str]) -> float:
    """Greedy exact-match accuracy, generated on the generator actor with the latest weights."""
    completions = trainer.generate(prompts, do_sample=False, max_new_tokens=5)
    return sum(exact_match_reward(prompts, completions)) / len(prompts)


class PrintHeldOutAccuracy(TrainerCallback):
    def __init__(self, trainer, held_out):
        self.trainer, self.held_out, self.accuracies = trainer, held_out, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.accuracies.append(accuracy(self.trainer, self.held_out))
        print(f"round {logs['round'] + 1:2d}: held-out accuracy {self.accuracies[-1]:.1%}  reward "
              f"{logs['reward_mean']:.3f}  kept {logs['kept']:4d}  loss {logs['loss']:.3f}  "
              f"{logs['round_seconds']:.2f} s", flush=True)


def run(rounds: int = 10, prompts_per_round: int = 128, samples_per_prompt: int = 16, warmup_examples: int = 300,
        warmup_epochs: int = 30, max_staleness: int = 0, learning_rate: float = 1e-3, batch_size: int = 32,
        best_k: int | None = None,
        output_dir: str = "out_iterative_sft", seed: int = 0, quiet: bool = False) -> dict:
    """Warm up, then iterate; returns accuracies before and after each round."""
    torch.set_num_threads(1)  # a tiny model: more threads only contend for the 2 cores
    tokenizer = build_tokenizer()
    held_out = addition_prompts(200, seed=seed + 1)
    labelled = addition_prompts(warmup_examples, seed=seed + 2, exclude=set(held_out))
    unlabelled = addition_prompts(1500, seed=seed + 3, exclude=set(held_out) | set(labelled))
    model = warm_up(build_model(tokenizer, seed), tokenizer, labelled, warmup_epochs, output_dir, seed)

    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                             lr_scheduler_type="constant", save_strategy="no", report_to="none",
                             disable_tqdm=quiet, seed=seed, use_cpu=True)
    trainer = IterativeSFTTrainer(model, args, tokenizer, max_length=16)
    before = accuracy(trainer, held_out)
    printer = PrintHeldOutAccuracy(trainer, held_out)
    trainer.add_callback(printer)
    print(f"after warm-up: held-out accuracy {before:.1%}", flush=True)
    started = time.perf_counter()
    history = trainer.train(unlabelled, exact_match_reward, rounds, prompts_per_round=prompts_per_round,
                            samples_per_prompt=samples_per_prompt, min_reward=1.0, best_k=best_k,
                            max_staleness=max_staleness,
                            generation_kwargs={"max_new_tokens": 5, "temperature": 1.0})
    seconds = time.perf_counter() - started
    print(f"held-out accuracy {before:.1%} -> {printer.accuracies[-1]:.1%} after {rounds} rounds "
          f"({seconds:.1f} s)", flush=True)
    trainer.shutdown()
    return {"before": before, "after": printer.accuracies, "history": history, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--prompts-per-round", type=int, default=128)
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--max-staleness", type=int, default=0, choices=(0, 1))
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    run(options.rounds, options.prompts_per_round, options.samples_per_prompt, max_staleness=options.max_staleness,
        seed=options.seed)
