"""GPU step time: a GPT-2 of ~124M parameters (12 layers, 768 wide, built from a config), sequence 512, bf16:

  (a) transformers.Trainer, in-process, on the GPU
  (c) raytrainer.Trainer, 1 GPU worker (embedded Ray started by the child process)

and the generator of iterative SFT (the example's model, on the GPU) sampling at batch 1, 16 and 64.

Each variant runs in a fresh child process (own CUDA context, own peak-memory counter) and trains `--repeats`
times; each repeat is a new Trainer of a fresh model (raytrainer's later repeats reuse its warm worker). Per
repeat: the median interval between optimizer steps after `--warmup` steps, tokens per second (global batch x
sequence / step time), peak GPU memory (torch.cuda.max_memory_allocated) and the model FLOPs utilisation:
(6 N + 12 L d T) FLOPs per token (N parameters without the position table, nanoGPT/PaLM's count, attention
included) x tokens per second / the GPU's dense bf16 peak (a table of known GPUs, or `--peak-tflops`).
The table shows medians over repeats, and (c) / (a). Goal: (c) / (a) step time <= 1.03.

Usage: python bench/gpu.py [--repeats 3] [--steps 30] [--batch 8] [--smoke]
`--smoke` runs a 2-layer model for a few steps, also on CPU: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "B200": 2250.0, "GH200": 989.0}
CHILD_TIMEOUT_S = 600


def model_config(options):
    from transformers import GPT2Config

    if options.smoke:
        return GPT2Config(vocab_size=512, n_positions=options.seq, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                          eos_token_id=0)
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def train_dataset(options, rows: int):
    import numpy as np

    import datasets

    rng = np.random.default_rng(0)
    ids = rng.integers(0, model_config(options).vocab_size, size=(rows, options.seq), dtype=np.int64)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def flops_per_token(config, seq: int) -> tuple[int, float]:
    from transformers import GPT2LMHeadModel

    with __import__("torch").device("meta"):
        model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return params, 6 * params + 12 * config.n_layer * config.n_embd * seq


# ----------------------------------------------------------------------------- children

def step_recorder(path: str):
    """A callback that records optimizer-step ends and the peak GPU memory of the training process (rank 0)."""
    import torch
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.step_ends = []
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done: the interval is the step's time
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
                device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
                with open(path, "a") as file:
                    file.write(json.dumps({"step_ends": self.step_ends, "peak_bytes": peak, "device": device}) + "\n")

    return StepRecorder()


def run_training_child(variant: str, options, record_path: str) -> None:
    import torch
    import transformers
    from transformers import GPT2LMHeadModel, default_data_collator

    data = train_dataset(options, options.batch * (options.warmup + options.steps))
    settings = dict(max_steps=options.warmup + options.steps, per_device_train_batch_size=options.batch,
                    learning_rate=3e-4, bf16=not options.smoke or torch.cuda.is_available(), logging_steps=10_000,
                    save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=2, seed=0,
                    use_cpu=options.smoke and not torch.cuda.is_available())
    for repeat in range(options.repeats):
        torch.manual_seed(repeat)
        model = GPT2LMHeadModel(model_config(options))
        output_dir = tempfile.mkdtemp(prefix=f"gpu-{variant}-")
        if variant == "a":
            trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(output_dir, **settings),
                                           train_dataset=data, data_collator=default_data_collator,
                                           callbacks=[step_recorder(record_path)])
        else:
            import raytrainer

            args = raytrainer.TrainingArguments(output_dir, num_workers=1, **settings)
            trainer = raytrainer.Trainer(model=model, args=args, train_dataset=data,
                                         data_collator=default_data_collator, callbacks=[step_recorder(record_path)])
        trainer.train()
        del trainer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_generator_child(options, record_path: str) -> None:
    """Samples with the iterative SFT example's model on the generator actor (on the GPU where there is one)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import iterative_sft_arithmetic as arithmetic

    from raytrainer import IterativeSFTTrainer, TrainingArguments

    tokenizer = arithmetic.build_tokenizer()
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(tempfile.mkdtemp(prefix="gpu-gen-"), report_to="none", use_gpu=on_gpu,
                             use_cpu=not on_gpu, resources_per_worker={"CPU": 1, "GPU": 0.5} if on_gpu else None)
    trainer = IterativeSFTTrainer(arithmetic.build_model(tokenizer, 0), args, tokenizer)
    new_tokens = 8 if options.smoke else 64
    try:
        trainer.generate(["1+2="] * 4, do_sample=True, max_new_tokens=4)  # start the actor, warm up
        for batch in (1, 16, 64):
            prompts = [f"{i % 50}+{(7 * i) % 50}=" for i in range(batch)]
            for _ in range(options.repeats):
                started = time.perf_counter()
                generated = trainer.generate(prompts, do_sample=True, max_new_tokens=new_tokens,
                                             min_new_tokens=new_tokens)
                seconds = time.perf_counter() - started
                with open(record_path, "a") as file:
                    file.write(json.dumps({"batch": batch, "seconds": seconds, "sequences": len(generated),
                                           "new_tokens": new_tokens}) + "\n")
    finally:
        trainer.shutdown()


def run_child(kind: str, options, root: Path) -> list[dict]:
    record = root / f"{kind}.jsonl"
    command = [sys.executable, __file__, "--child", kind, "--record", str(record), *options.passthrough]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)  # each child starts its own embedded Ray
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(f"child {kind} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return [json.loads(line) for line in record.read_text().splitlines()]


# ----------------------------------------------------------------------------- the table

def summarize_training(records: list[dict], options, config) -> dict:
    params, per_token = flops_per_token(config, options.seq)
    tokens_per_step = options.batch * options.seq
    steps = [statistics.median([b - a for a, b in zip(r["step_ends"], r["step_ends"][1:])][options.warmup - 1:])
             for r in records]
    step = statistics.median(steps)
    device = records[0]["device"]
    peak = options.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device), None)
    return {"step_s": step, "tokens_per_s": tokens_per_step / step, "peak_gib": max(r["peak_bytes"] for r in
                                                                                   records) / 2**30,
            "mfu": per_token * tokens_per_step / step / (peak * 1e12) if peak else None, "device": device,
            "params": params, "peak_tflops": peak, "steps_per_repeat": [round(s, 5) for s in steps]}


def print_tables(a: dict, c: dict, generation: list[dict], options) -> None:
    mfu = lambda r: f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (unknown GPU: --peak-tflops)"  # noqa: E731
    print(f"\nGPU: {a['device']}; GPT-2 {a['params'] / 1e6:.0f}M parameters (without the position table), sequence "
          f"{options.seq}, batch {options.batch}, {'bf16' if a['device'] != 'cpu' else 'fp32 (CPU smoke run)'}; {options.steps} steps after {options.warmup} of warm-up, "
          f"medians of {options.repeats}; bf16 peak {a['peak_tflops']} TFLOP/s\n")
    print("| variant | step time (s) | tokens/s | peak GPU memory (GiB) | MFU |")
    print("|---|---|---|---|---|")
    for name, row in (("(a) transformers.Trainer, in-process", a), ("(c) raytrainer, 1 GPU worker", c)):
        print(f"| {name} | {row['step_s']:.4f} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f} | {mfu(row)} |")
    ratio = c["step_s"] / a["step_s"]
    print(f"| (c) / (a) | {ratio:.3f} | {c['tokens_per_s'] / a['tokens_per_s']:.3f} | "
          f"{c['peak_gib'] / max(a['peak_gib'], 1e-9):.3f} | |")
    print(f"\ngoal (c) / (a) step time <= 1.03: {'met' if ratio <= 1.03 else 'NOT met'} ({ratio:.3f}); per repeat: "
          f"(a) {a['steps_per_repeat']}, (c) {c['steps_per_repeat']}")
    print("\n| generator (iterative SFT example model), sampling | batch 1 | batch 16 | batch 64 |")
    print("|---|---|---|---|")
    cells = []
    for batch in (1, 16, 64):
        rows = [r for r in generation if r["batch"] == batch]
        cells.append(f"{statistics.median(r['sequences'] * r['new_tokens'] / r['seconds'] for r in rows):,.0f}")
    print(f"| new tokens/s (median of {options.repeats}) | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", choices=["a", "c", "generator"])
    parser.add_argument("--record")
    options = parser.parse_args()
    if options.smoke:
        options.seq, options.steps, options.warmup, options.batch = min(options.seq, 64), min(options.steps, 6), 2, 4
    options.passthrough = [f"--repeats={options.repeats}", f"--steps={options.steps}", f"--warmup={options.warmup}",
                           f"--batch={options.batch}", f"--seq={options.seq}"] + (["--smoke"] if options.smoke else [])
    if options.child == "generator":
        return run_generator_child(options, options.record)
    if options.child:
        return run_training_child(options.child, options, options.record)

    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    started = time.time()
    a = summarize_training(run_child("a", options, root), options, model_config(options))
    c = summarize_training(run_child("c", options, root), options, model_config(options))
    generation = run_child("generator", options, root)
    print_tables(a, c, generation, options)
    print(f"\n(bench wall time {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
