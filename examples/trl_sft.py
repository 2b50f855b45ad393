"""TRL's SFTTrainer on Ray: the same script as with TRL, one import changed (`from raytrainer.trl import ...`).

A tiny character-level GPT-2 learns integer addition from prompt/completion pairs on 2 Ray workers; runs offline
in a few seconds on a laptop CPU. Needs TRL: pip install "raytrainer[trl]".

    python examples/trl_sft.py
"""

from __future__ import annotations

import random

from datasets import Dataset

from iterative_sft_arithmetic import addition_prompts, answer, build_model, build_tokenizer
from raytrainer.trl import SFTConfig, SFTTrainer  # was: from trl import SFTConfig, SFTTrainer


def main() -> None:
    prompts = addition_prompts(64, seed=0)
    random.Random(0).shuffle(prompts)
    data = Dataset.from_dict({"prompt": prompts, "completion": [answer(p) for p in prompts]})
    tokenizer = build_tokenizer()
    args = SFTConfig(output_dir="trl_sft_output", num_workers=2, per_device_train_batch_size=8, max_steps=20,
                     learning_rate=3e-3, logging_steps=5, max_length=16, bf16=False, report_to=[],
                     save_strategy="no")
    trainer = SFTTrainer(model=build_model(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()  # TRL's training loop, on 2 Ray Train workers; the trained weights come back here
    trainer.save_model()
    print("losses:", [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e])
    trainer.close()


if __name__ == "__main__":
    main()
