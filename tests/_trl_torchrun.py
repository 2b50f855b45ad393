"""The references of tests/test_trl.py's two-worker tests: TRL's trainers themselves under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_trl_torchrun.py sft|grpo settings.json result.json

settings.json holds the config's arguments; rank 0 writes the log history, the world size, the config's
generation batch (GRPO) and the final weights to result.json.
"""

import json
import sys

import trl

from _iterative_fixtures import gpt2, tokenizer
from _trl_fixtures import digits, grpo_prompts, sft_data


def build(kind: str, settings: dict):
    if kind == "sft":
        return trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings), train_dataset=sft_data(),
                              processing_class=tokenizer())
    return trl.GRPOTrainer(model=gpt2(), args=trl.GRPOConfig(**settings), reward_funcs=digits,
                           train_dataset=grpo_prompts(), processing_class=tokenizer())


def main(kind: str, settings_path: str, result_path: str) -> None:
    with open(settings_path) as file:
        settings = json.load(file)
    trainer = build(kind, settings)
    trainer.train()
    if trainer.args.process_index == 0:
        weights = {name: tensor.tolist() for name, tensor in trainer.model.state_dict().items()}
        with open(result_path, "w") as file:
            json.dump({"world_size": trainer.args.world_size, "log_history": trainer.state.log_history,
                       "generation_batch_size": getattr(trainer.args, "generation_batch_size", None),
                       "weights": weights}, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
