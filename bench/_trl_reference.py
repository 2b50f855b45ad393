"""Reference side of bench/iterative_sft.py: TRL 0.23's IterativeSFTTrainer driven by the usual
sequential generate -> filter -> step loop in one process. Runs in bench/.venv-trl (TRL 0.23 needs
transformers 4.x); reads the settings JSON the benchmark writes and prints one JSON line of results.

    bench/.venv-trl/bin/python bench/_trl_reference.py settings.json
"""

import json
import sys
import time
import warnings

import torch
import trl
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments

warnings.filterwarnings("ignore")


def answer(prompt):
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def generate(model, tokenizer, prompts, **kwargs):
    # Left padding for generation only: TRL's collator pads training batches with the tokenizer's side (right).
    tokenizer.padding_side = "left"
    # transformers 4.x returns token_type_ids here, which GPT-2 would add as embeddings: leave them out.
    encoded = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **kwargs)
    width = encoded["input_ids"].shape[1]
    completion_ids = []
    for row in out[:, width:].tolist():  # up to and including EOS, as our generator keeps them
        completion_ids.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return completion_ids, tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


class PromptMaskedIterativeSFTTrainer(trl.IterativeSFTTrainer):
    """TRL 0.23 with its causal-LM labels bug worked around: the given labels (prompt masked with -100) are kept
    instead of being replaced by input_ids. What a TRL user has to write to train on completions only."""

    def prepare_model_inputs(self, input_ids, attention_mask, labels):
        pad = self.processing_class.pad_token_id
        if attention_mask is None:
            attention_mask = [torch.ones_like(ids) for ids in input_ids]
        return {"input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad),
                "attention_mask": pad_sequence(attention_mask, batch_first=True, padding_value=0),
                "labels": pad_sequence(labels, batch_first=True, padding_value=-100)}


def main(path):
    settings = json.load(open(path))
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(settings["model_dir"])
    model = GPT2LMHeadModel.from_pretrained(settings["model_dir"])
    args = TrainingArguments(output_dir=settings["output_dir"], per_device_train_batch_size=settings["batch_size"],
                             learning_rate=settings["learning_rate"], lr_scheduler_type="constant", report_to="none",
                             seed=settings["seed"], use_cpu=True, save_strategy="no", logging_steps=10**9)
    trainer_class = PromptMaskedIterativeSFTTrainer if settings["mask_prompt"] else trl.IterativeSFTTrainer
    trainer = trainer_class(model, args, processing_class=tokenizer)
    round_seconds, rollouts = [], 0
    for round_index, prompts in enumerate(settings["round_prompts"]):
        started = time.perf_counter()
        torch.manual_seed(settings["seed"] + round_index)
        model.eval()
        completion_ids, completions = generate(model, tokenizer, prompts, do_sample=True,
                                               num_return_sequences=settings["samples_per_prompt"],
                                               max_new_tokens=settings["max_new_tokens"])
        repeated = [p for p in prompts for _ in range(settings["samples_per_prompt"])]
        rewards = [float(c.strip() == answer(p)) for p, c in zip(repeated, completions)]
        kept = [i for i, r in enumerate(rewards) if r >= 1.0]
        rollouts += len(rewards)
        if kept:
            prompt_ids = [tokenizer(repeated[i])["input_ids"] for i in kept]
            input_ids = [torch.tensor(p + completion_ids[i]) for p, i in zip(prompt_ids, kept)]
            labels = [torch.tensor([-100] * len(p) + completion_ids[i]) for p, i in zip(prompt_ids, kept)]
            # TRL 0.23 as shipped drops these labels for causal LMs (the prompt is trained on too).
            trainer.step(input_ids=input_ids, labels=labels)
        round_seconds.append(time.perf_counter() - started)
    model.eval()
    _, held_out = generate(model, tokenizer, settings["held_out"], do_sample=False,
                           max_new_tokens=settings["max_new_tokens"])
    accuracy = sum(c.strip() == answer(p) for p, c in zip(settings["held_out"], held_out)) / len(held_out)
    print(json.dumps({"trl_version": trl.__version__, "round_seconds": round_seconds, "rollouts": rollouts,
                      "accuracy": accuracy}))


if __name__ == "__main__":
    main(sys.argv[1])
