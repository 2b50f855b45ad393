"""Any transformers.Trainer subclass on Ray with `raytrainer.on_ray`: here a Seq2SeqTrainer subclass of one's own
(a label-smoothed loss), and `raytrainer.Seq2SeqTrainer`'s generation on 2 workers. Tiny T5, offline, seconds.

    python examples/any_trainer_on_ray.py
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config
from transformers import T5ForConditionalGeneration

from iterative_sft_arithmetic import addition_prompts, answer, build_tokenizer
from raytrainer import on_ray


class SmoothedSeq2Seq(Seq2SeqTrainer):
    """A library's Trainer subclass with one override of one's own: it runs on the Ray workers."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits.transpose(1, 2), inputs["labels"],
                                                 ignore_index=-100, label_smoothing=0.1)
        return (loss, outputs) if return_outputs else loss


def main() -> None:
    tokenizer = build_tokenizer()
    prompts = addition_prompts(64, seed=0)
    data = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts],
                              "labels": [tokenizer(answer(p))["input_ids"] + [tokenizer.eos_token_id]
                                         for p in prompts]})
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    args = on_ray(Seq2SeqTrainingArguments)(
        output_dir="seq2seq_output", num_workers=2, per_device_train_batch_size=8, max_steps=20, learning_rate=1e-2,
        logging_steps=5, predict_with_generate=True, generation_max_length=6, report_to=[], save_strategy="no")
    trainer = on_ray(SmoothedSeq2Seq)(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                     data_collator=DataCollatorForSeq2Seq(tokenizer))
    trainer.train()
    predictions = trainer.predict(data.select(range(4))).predictions  # generated on the workers
    predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)  # -100: padding across batches
    for prompt, ids in zip(prompts, predictions):
        print(prompt, tokenizer.decode(ids, skip_special_tokens=True))
    trainer.close()


if __name__ == "__main__":
    main()
