"""The reference of tests/test_trl.py's two-worker SFT test: TRL's SFTTrainer itself under torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_trl_torchrun_sft.py settings.json result.json

settings.json holds SFTConfig's arguments; rank 0 writes the log history and the final weights to result.json.
"""

import json
import sys

import trl

from _iterative_fixtures import gpt2, tokenizer
from _trl_fixtures import sft_data


def main(settings_path: str, result_path: str) -> None:
    with open(settings_path) as file:
        settings = json.load(file)
    trainer = trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings), train_dataset=sft_data(),
                             processing_class=tokenizer())
    trainer.train()
    if trainer.args.process_index == 0:
        weights = {name: tensor.tolist() for name, tensor in trainer.model.state_dict().items()}
        with open(result_path, "w") as file:
            json.dump({"world_size": trainer.args.world_size, "log_history": trainer.state.log_history,
                       "weights": weights}, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
