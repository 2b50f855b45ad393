"""raytrainer demo: a tiny GPT-2 learns a generated toy language on 2 Ray workers.

Everything is local (nothing from the Hugging Face Hub): the script generates its text, trains a
byte-level BPE tokenizer on it, builds a GPT-2 from a config, and trains it with `raytrainer.Trainer`
-- the `transformers.Trainer` API -- on 2 Ray Train workers (an embedded local Ray is started on
demand, or the cluster in RAY_ADDRESS is used). It prints eval loss and perplexity before and after
training, saves the model, loads it back with `AutoModelForCausalLM.from_pretrained`, generates from
a few prompts, and writes the loss curve to `<output-dir>/loss_curve.png`.

    python examples/demo.py [--output-dir demo_output] [--num-workers 2] [--max-steps 200]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          default_data_collator)

from raytrainer import Trainer, TrainingArguments  # noqa: E402  (instead of: from transformers import ...)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_corpus  # noqa: E402

PROMPTS = ["the cat eats", "three plus four is", "count five six", "anna went to the"]


def parse_options():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--block-length", type=int, default=64, help="tokens per training example")
    return parser.parse_args()


def build_datasets(block_length: int):
    """Train/eval token blocks from two independently generated parts of the corpus, and the tokenizer."""
    train_documents = tiny_corpus.generate_documents(3000, seed=0)
    eval_documents = tiny_corpus.generate_documents(200, seed=1)
    tokenizer = tiny_corpus.train_tokenizer(train_documents, vocab_size=512)
    return (tiny_corpus.token_blocks(train_documents, tokenizer, block_length),
            tiny_corpus.token_blocks(eval_documents, tokenizer, block_length), tokenizer)


def perplexity_line(label: str, metrics: dict) -> str:
    loss = metrics["eval_loss"]
    return f"{label:<16} eval loss {loss:.4f}   perplexity {math.exp(loss):9.2f}"


def plot_loss_curve(log_history: list[dict], eval_loss_before: float, path: Path) -> None:
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(0, eval_loss_before)]
    evaluation += [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evaluation, "eval loss", "o--")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", yscale="log",
             title="tiny GPT-2 on 2 Ray workers (raytrainer)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def show_generations(model_dir: Path) -> None:
    """Load the saved model and tokenizer the standard transformers way and continue a few prompts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"\nSamples from {model_dir} (greedy):")
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        print(f"  {prompt!r} -> {tokenizer.decode(output[0][inputs['input_ids'].shape[1]:])!r}")


def main():
    options = parse_options()
    output_dir = Path(options.output_dir)
    train_dataset, eval_dataset, tokenizer = build_datasets(options.block_length)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=options.block_length, n_embd=128, n_layer=2,
                        n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    print(f"GPT-2 with {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}; "
          f"{len(train_dataset)} training and {len(eval_dataset)} evaluation blocks of {options.block_length} tokens")

    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"), num_workers=options.num_workers,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=options.max_steps,
        learning_rate=3e-3, warmup_steps=options.max_steps // 10, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=10, eval_strategy="steps", eval_steps=max(options.max_steps // 5, 1), save_strategy="no",
        report_to="none", seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, data_collator=default_data_collator)

    before = trainer.evaluate()
    started = time.time()
    result = trainer.train()
    train_seconds = time.time() - started
    after = trainer.evaluate()

    print(f"\nTrained {result.global_step} steps on {options.num_workers} workers in {train_seconds:.1f} s")
    print(perplexity_line("before training:", before))
    print(perplexity_line("after training:", after))

    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))
    plot_loss_curve(trainer.state.log_history, before["eval_loss"], output_dir / "loss_curve.png")
    print(f"Saved the model to {model_dir} and the loss curve to {output_dir / 'loss_curve.png'}")
    show_generations(model_dir)


if __name__ == "__main__":
    main()
