"""The references of tests/test_trl.py's two-worker tests: TRL's trainers themselves under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_trl_torchrun.py runs.json results.json

runs.json maps a run's kind ("sft", "grpo") to its config's arguments; the runs share the two processes (one start
of torchrun for the test module) and train one after the other. Rank 0 writes, per kind, the log history, the world
size, the torch thread count, the config's generation batch (GRPO) and the final weights to results.json.
"""

import json
import sys

import torch
import trl

from _iterative_fixtures import gpt2, tokenizer
from _trl_fixtures import digits, grpo_prompts, sft_data


def build(kind: str, settings: dict):
    if kind == "sft":
        return trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings), train_dataset=sft_data(),
                              processing_class=tokenizer())
    if kind == "grpo":
        return trl.GRPOTrainer(model=gpt2(), args=trl.GRPOConfig(**settings), reward_funcs=digits,
                               train_dataset=grpo_prompts(), processing_class=tokenizer())
    raise ValueError(f"unknown run kind {kind!r}: use 'sft' or 'grpo'")


def run(kind: str, settings: dict) -> dict:
    trainer = build(kind, settings)
    trainer.train()
    return {"world_size": trainer.args.world_size, "threads": torch.get_num_threads(),
            "log_history": trainer.state.log_history,
            "generation_batch_size": getattr(trainer.args, "generation_batch_size", None),
            "weights": {name: tensor.tolist() for name, tensor in trainer.model.state_dict().items()},
            "rank": trainer.args.process_index}


def main(runs_path: str, results_path: str) -> None:
    with open(runs_path) as file:
        runs = json.load(file)
    results = {kind: run(kind, settings) for kind, settings in runs.items()}
    if all(result.pop("rank") == 0 for result in results.values()):
        with open(results_path, "w") as file:
            json.dump(results, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
