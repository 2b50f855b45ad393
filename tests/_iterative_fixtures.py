"""Tiny models, tokenizer and arguments shared by the iterative SFT tests."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import iterative_sft_arithmetic as arithmetic  # noqa: E402  (the example doubles as the test task)

from raytrainer import TrainingArguments  # noqa: E402

torch.set_num_threads(1)
  # tiny models on a shared 2-core box: extra threads only contend


def tokenizer():
    return arithmetic.build_tokenizer()


def gpt2(seed: int = 0, dropout: bool = False):
    """The example's 2-layer, 64-wide GPT-2; dropout off by default so numbers can be compared exactly."""
    model = arithmetic.build_model(arithmetic.build_tokenizer(), seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and not dropout:
            module.p = 0.0
    return model


def t5(seed: int = 0):
    torch.manual_seed(seed)
    tok = arithmetic.build_tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    return T5ForConditionalGeneration(config)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                    lr_scheduler_type="constant", save_strategy="no", report_to="none", disable_tqdm=True,
                    seed=0, use_cpu=True)
    settings.update(overrides)
    return TrainingArguments(**settings)
