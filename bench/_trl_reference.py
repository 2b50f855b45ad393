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
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments

warnings.filterwarnings("ignore")


def answer(prompt):
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def generate(model, tokenizer, prompts, **kwargs):
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **kwargs)
    width = encoded["input_ids"].shape[1]
    completion_ids = []
    for row in out[:, width:].tolist():  # up to and including EOS, as our generator keeps them
        completion_ids.append(row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row)
    return completion_ids, tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def main(path):
    settings = json.load(open(path))
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(settings["model_dir"])
    model = GPT2LMHeadModel.from_pretrained(settings["model_dir"])
    args = TrainingArguments(output_dir=settings["output_dir"], per_device_train_batch_size=settings["batch_size"],
                             learning_rate=settings["learning_rate"], lr_scheduler_type="constant", report_to="none",
                             seed=settings["seed"], use_cpu=True, save_strategy="no", logging_steps=10**9)
    trainer = trl.IterativeSFTTrainer(model, args, processing_class=tokenizer)
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
            input_ids = [torch.tensor(tokenizer(repeated[i])["input_ids"] + completion_ids[i]) for i in kept]
            # TRL 0.23 requires labels here but drops them for causal LMs: the prompt is trained on too.
            trainer.step(input_ids=input_ids, labels=input_ids)
        round_seconds.append(time.perf_counter() - started)
    model.eval()
    _, held_out = generate(model, tokenizer, settings["held_out"], do_sample=False,
                           max_new_tokens=settings["max_new_tokens"])
    accuracy = sum(c.strip() == answer(p) for p, c in zip(settings["held_out"], held_out)) / len(held_out)
    print(json.dumps({"trl_version": trl.__version__, "round_seconds": round_seconds, "rollouts": rollouts,
                      "accuracy": accuracy}))


if __name__ == "__main__":
    main(sys.argv[1])
