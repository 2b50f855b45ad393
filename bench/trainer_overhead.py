"""Trainer overhead: one tiny-GPT-2 workload trained by

  (a) transformers.Trainer, in-process
  (b) Ray Train's documented Hugging Face recipe: TorchTrainer + transformers.Trainer
      + RayTrainReportCallback + prepare_trainer, 1 worker
  (c) raytrainer.Trainer, 1 worker
  (d) raytrainer.Trainer, 2 workers (same global batch: half the per-device batch)
  (e) raytrainer.Trainer, 1 worker, built 5 s before train() (a script that tokenizes or loads data in between:
      Ray and the workers start in the background meanwhile)

For each it measures time to first step (from the train()/fit() call on the driver to the end of the
first optimizer step), steady-state seconds per step (median interval between optimizer steps after
warm-up) and end-to-end wall time of the call, then prints a markdown table of medians over repeats
with ratios to (a) and (b).

Every measurement runs in a fresh child process with a private, cold Ray (RAY_TMPDIR is private and
RAY_ADDRESS unset), so Ray start-up counts for (b)-(d) exactly as it does for a user's first call.
Imports, data and model construction happen before the clock starts, in every variant; (b) builds
its model inside the worker, as the recipe does. `--warm` calls train()/fit() a second time in the
same process and adds "second call" columns, and times an evaluate() on the same (warm) trainer — for (b) there is
no trainer left after fit() to evaluate with (issue 6).

Usage: python bench/trainer_overhead.py [--quick] [--repeats 3] [--variants abcde] [--warm]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import tiny_corpus  # noqa: E402  (shared with examples/demo.py)

VARIANT_NAMES = {
    "a": "(a) transformers.Trainer, in-process",
    "b": "(b) Ray Train HF recipe, 1 worker",
    "c": "(c) raytrainer, 1 worker",
    "d": "(d) raytrainer, 2 workers",
    "e": "(e) raytrainer, 1 worker, Trainer built 5 s before train()",
}
PREPARATION_S = 5.0  # (e): the script's own work between Trainer(...) and train()
CHILD_TIMEOUT_S = 900


class StepTimesCallback(TrainerCallback):
    """Records the end of every optimizer step (wall clock, and this process's CPU time, which a busy
    machine disturbs less) and, at the end of each train(), appends one JSON line to `path` (main
    process only). Works on remote workers of this machine: the file is local. With `torch_threads`,
    it sets the process's torch threads at train begin, after any framework chose its own."""

    def __init__(self, path: str, torch_threads: int = 0):
        self.path = path
        self.torch_threads = torch_threads
        self.step_ends: list[float] = []
        self.step_end_cpu_times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_ends, self.step_end_cpu_times = [], []
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.time())
        self.step_end_cpu_times.append(time.process_time())

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record = {"step_ends": self.step_ends, "step_end_cpu_times": self.step_end_cpu_times,
                      "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- workload

def build_workload(options) -> dict:
    """Data, model config and training arguments shared by all variants (built before any clock)."""
    blocks_needed = options.steps * options.batch
    tokens_per_document = 40  # 8 sentences of 6 to 8 tokens, rounded down
    num_documents = blocks_needed * options.seq_len // tokens_per_document + 64
    documents = tiny_corpus.generate_documents(num_documents, seed=options.seed)
    tokenizer = tiny_corpus.train_tokenizer(documents[:2000], vocab_size=options.vocab_size)
    train_dataset = tiny_corpus.token_blocks(documents, tokenizer, options.seq_len)
    if len(train_dataset) < blocks_needed:
        raise RuntimeError(f"generated only {len(train_dataset)} blocks, need {blocks_needed}")
    model_config = GPT2Config(vocab_size=len(tokenizer), n_positions=options.seq_len, n_embd=options.width,
                              n_layer=options.layers, n_head=options.heads, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    training_args = dict(
        max_steps=options.steps, per_device_train_batch_size=options.batch, learning_rate=5e-4,
        seed=options.seed, logging_steps=options.steps, disable_tqdm=True, report_to="none",
        save_strategy="steps" if options.save_checkpoint else "no", save_steps=options.steps,
        dataloader_num_workers=0,
    )
    eval_size = min(len(train_dataset), 16 * options.batch)
    return {"train_dataset": train_dataset.select(range(blocks_needed)), "model_config": model_config,
            "training_args": {**training_args, "per_device_eval_batch_size": options.batch},
            "eval_dataset": train_dataset.select(range(eval_size))}


def new_model(model_config: GPT2Config) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(model_config)


# ----------------------------------------------------------------------------- variants
# Each returns a list of (call_started, call_returned) wall-clock pairs, one per train()/fit() call, and the
# seconds of an evaluate() after them (None where the variant has no trainer to evaluate with, or with one call).

def run_transformers(workload, output_dir, timer, calls):
    args = transformers.TrainingArguments(output_dir=output_dir, **workload["training_args"])
    trainer = transformers.Trainer(model=new_model(workload["model_config"]), args=args,
                                   train_dataset=workload["train_dataset"],
                                   data_collator=default_data_collator, callbacks=[timer])
    return [timed(trainer.train) for _ in range(calls)], timed_evaluate(trainer, workload, calls)


def timed_evaluate(trainer, workload, calls):
    if calls < 2:
        return None
    started, returned = timed(lambda: trainer.evaluate(workload["eval_dataset"]))
    return returned - started


def ray_recipe_train_loop(config):
    """The per-worker function of Ray Train's Hugging Face recipe (runs inside the Ray Train worker)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    args = transformers.TrainingArguments(output_dir=config["output_dir"], **config["training_args"])
    trainer = transformers.Trainer(model=new_model(config["model_config"]), args=args,
                                   train_dataset=config["train_dataset"], data_collator=default_data_collator,
                                   callbacks=[RayTrainReportCallback(), config["timer"]])
    trainer = prepare_trainer(trainer)
    trainer.train()


def run_ray_recipe(workload, output_dir, timer, calls):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def fit_once(call_index):
        started = time.time()
        if not ray.is_initialized():
            ray.init()  # a user's script does this (or fit() does it implicitly): part of the cost
        trainer = TorchTrainer(
            ray_recipe_train_loop,
            train_loop_config={**workload, "output_dir": output_dir, "timer": timer},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
            run_config=RunConfig(storage_path=os.path.join(output_dir, "ray_storage"), name=f"call{call_index}"),
        )
        trainer.fit()
        return started, time.time()

    return [fit_once(index) for index in range(calls)], None


def run_raytrainer(workload, output_dir, timer, calls, num_workers, preparation_s=0.0):
    import raytrainer

    training_args = dict(workload["training_args"])
    training_args["per_device_train_batch_size"] //= num_workers  # same global batch as (a)
    args = raytrainer.TrainingArguments(output_dir=output_dir, num_workers=num_workers, **training_args)
    trainer = raytrainer.Trainer(model=new_model(workload["model_config"]), args=args,
                                 train_dataset=workload["train_dataset"],
                                 data_collator=default_data_collator, callbacks=[timer])
    time.sleep(preparation_s)
    with trainer:  # releases the warm workers at the end
        return [timed(trainer.train) for _ in range(calls)], timed_evaluate(trainer, workload, calls)


def timed(function):
    started = time.time()
    function()
    return started, time.time()


VARIANTS = {
    "a": run_transformers,
    "b": run_ray_recipe,
    "c": functools.partial(run_raytrainer, num_workers=1),
    "d": functools.partial(run_raytrainer, num_workers=2),
    "e": functools.partial(run_raytrainer, num_workers=1, preparation_s=PREPARATION_S),
}


# ----------------------------------------------------------------------------- measuring

def median_interval(times, skip):
    intervals = [later - earlier for earlier, later in zip(times, times[1:])][skip:]
    return statistics.median(intervals) if intervals else float("nan")


def summarize_call(started, returned, step_record, warmup_steps):
    step_ends = step_record["step_ends"]
    return {"first_step_s": step_ends[0] - started,
            "step_s": median_interval(step_ends, warmup_steps),
            "step_cpu_s": median_interval(step_record["step_end_cpu_times"], warmup_steps),
            "end_to_end_s": returned - started, "steps": len(step_ends),
            "torch_threads": step_record["torch_threads"]}


def child_main(options):
    """Run one variant once (in this fresh process) and write its measurements as JSON."""
    workload = build_workload(options)
    with tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
        steps_file = os.path.join(work_dir, "step_times.jsonl")
        calls, evaluate_s = VARIANTS[options.child](workload, os.path.join(work_dir, "out"),
                                                    StepTimesCallback(steps_file, options.torch_threads),
                                                    2 if options.warm else 1)
        records = [json.loads(line) for line in Path(steps_file).read_text().splitlines()]
    if len(records) != len(calls):
        raise RuntimeError(f"expected {len(calls)} step-time records, got {len(records)}")
    result = [summarize_call(*call, record, options.warmup_steps) for call, record in zip(calls, records)]
    result[0]["evaluate_s"] = evaluate_s
    Path(options.result_file).write_text(json.dumps(result))


def workload_flags(options) -> list[str]:
    """The flags that define the workload, as resolved in this process (after `--quick`)."""
    flags = [f"--{name.replace('_', '-')}={getattr(options, name)}" for name in
             ("layers", "width", "heads", "seq_len", "batch", "steps", "vocab_size", "warmup_steps", "seed")]
    flags.append(f"--torch-threads={options.torch_threads}")
    return flags + (["--warm"] if options.warm else []) + ([] if options.save_checkpoint else ["--no-checkpoint"])


def run_child(variant, options):
    """Run one measurement of `variant` in a fresh process with its own cold Ray; return calls or an error."""
    with tempfile.TemporaryDirectory(prefix="rtb", dir="/tmp") as ray_tmp:  # short: Ray socket paths
        result_file = os.path.join(ray_tmp, "result.json")
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0")
        if options.torch_threads:  # read by torch at import, in the child and in the Ray it starts
            env["OMP_NUM_THREADS"] = str(options.torch_threads)
        command = [sys.executable, __file__, *workload_flags(options), "--child", variant, "--result-file", result_file]
        try:
            completed = subprocess.run(command, env=env, capture_output=True, text=True,
                                       timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        if completed.returncode != 0 or not os.path.exists(result_file):
            log = (completed.stdout + completed.stderr).strip().splitlines()
            if options.verbose:
                print("\n".join(log[-60:]), file=sys.stderr)
            last_error = next((line for line in reversed(log) if "Error" in line), log[-1] if log else "")
            return {"error": f"exit {completed.returncode}: {last_error.strip()[:160]}"}
        return {"calls": json.loads(Path(result_file).read_text())}


# ----------------------------------------------------------------------------- reporting

def median_of(results, call_index, key):
    values = [calls[call_index][key] for calls in results
              if len(calls) > call_index and calls[call_index].get(key) is not None]
    return statistics.median(values) if values else None


def format_seconds(value):
    return "–" if value is None else f"{value:.3f}" if value < 1 else f"{value:.2f}"


def format_ratio(value, reference):
    return "–" if value is None or not reference else f"{value / reference:.2f}×"


METRICS = {"first_step_s": "first step", "step_s": "step", "step_cpu_s": "step CPU", "end_to_end_s": "end-to-end"}
RATIOS_TO_A = ["first_step_s", "step_s", "step_cpu_s", "end_to_end_s"]
RATIOS_TO_B = ["first_step_s", "step_s", "end_to_end_s"]
SECOND_CALL = ["first_step_s", "end_to_end_s"]
WARM_EVALUATE = "evaluate_s"


def print_report(measurements, errors, options, workload):
    medians = {variant: {key: median_of(results, 0, key) for key in METRICS}
               for variant, results in measurements.items() if results}
    second = {variant: {**{key: median_of(results, 1, key) for key in SECOND_CALL},
                        WARM_EVALUATE: median_of(results, 0, WARM_EVALUATE)}
              for variant, results in measurements.items() if results}
    config = workload["model_config"]
    print(f"\n### Trainer overhead — GPT-2 {config.n_layer}×{config.n_embd}, vocab {config.vocab_size}, "
          f"seq {options.seq_len}, global batch {options.batch}, {options.steps} steps, dropout off\n")
    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{options.torch_threads or 'default'} torch thread(s); medians of {options.repeats} repeat(s), each in "
          f"a fresh process with a cold Ray; step = median step interval after {options.warmup_steps} warm-up "
          f"steps, step CPU = the same in CPU seconds of the process that runs rank 0 (less disturbed by other "
          f"load); checkpoint at the end: {'yes' if options.save_checkpoint else 'no'}; load average "
          f"before/after: {options.load_before:.1f}/{os.getloadavg()[0]:.1f}.\n")
    header = ["variant"] + [f"{name} s" for name in METRICS.values()]
    header += [f"{METRICS[key]} ÷(a)" for key in RATIOS_TO_A] + [f"{METRICS[key]} ÷(b)" for key in RATIOS_TO_B]
    if options.warm:
        header += [f"2nd call: {METRICS[key]} s" for key in SECOND_CALL] + ["evaluate() after s"]
    header.append("torch threads")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    reference_a, reference_b = medians.get("a", {}), medians.get("b", {})
    for variant in options.variants:
        if variant not in medians:
            print(f"| {VARIANT_NAMES[variant]} | not measured: {errors.get(variant, ['?'])[0]} |")
            continue
        row = medians[variant]
        cells = [VARIANT_NAMES[variant]] + [format_seconds(row[key]) for key in METRICS]
        cells += [format_ratio(row[key], reference_a.get(key)) for key in RATIOS_TO_A]
        cells += [format_ratio(row[key], reference_b.get(key)) for key in RATIOS_TO_B]
        if options.warm:
            cells += [format_seconds(second[variant][key]) for key in [*SECOND_CALL, WARM_EVALUATE]]
        cells.append(str(measurements[variant][0][0]["torch_threads"]))
        print("| " + " | ".join(cells) + " |")
    for variant, messages in errors.items():
        if variant in medians:
            print(f"\n{VARIANT_NAMES[variant]}: {len(messages)} failed repeat(s): {messages[0]}")
    print_targets(medians, second, options)


def print_targets(medians, second, options):
    """The goals of issues 2 and 6, with the figure measured in this run."""
    def check(label, value, limit, unit=""):
        if value is None or limit is None:
            print(f"- {label}: not measured")
        else:
            verdict = "met" if value <= limit else "MISSED"
            print(f"- {label}: {value:.3f}{unit} vs target ≤ {limit:.3f}{unit} — {verdict}")

    a, b, c = medians.get("a"), medians.get("b"), medians.get("c")
    print("\nTargets")
    check("issue 2: step time (c) ÷ (a)", c and a and c["step_s"] / a["step_s"], 1.05)
    check("issue 2: step CPU time (c) ÷ (a) (the same, less disturbed by load)",
          c and a and c["step_cpu_s"] / a["step_cpu_s"], 1.05)
    check("issue 2: end-to-end (c) ÷ (b) (must be below 1)", c and b and c["end_to_end_s"] / b["end_to_end_s"],
          1.0)
    check("issue 6: first step (c), cold, 1 worker", c and c["first_step_s"], 8.0, " s")
    check("issue 13: first step (c) ÷ (b), cold, 1 worker", c and b and c["first_step_s"] / b["first_step_s"], 0.6)
    e = medians.get("e")
    check(f"issue 13: first step (e), Trainer built {PREPARATION_S:g} s before train()", e and e["first_step_s"], 3.0,
          " s")
    if options.warm:
        check("issue 6: first step of a second train() (c)", second.get("c", {}).get("first_step_s"), 3.0, " s")
        a_eval, c_eval = second.get("a", {}).get(WARM_EVALUATE), second.get("c", {}).get(WARM_EVALUATE)
        check("issue 6: evaluate() on a warm trainer, (c) minus (a)",
              None if c_eval is None or a_eval is None else c_eval - a_eval, 1.0, " s")


# ----------------------------------------------------------------------------- main

def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch per optimizer step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="upper bound for the BPE vocabulary (the corpus itself yields ~500)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="step intervals ignored for step time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="abcde", help="subset of abcde, run in this order each repeat")
    parser.add_argument("--warm", action="store_true", help="also time a second train()/fit() per process")
    parser.add_argument("--no-checkpoint", dest="save_checkpoint", action="store_false",
                        help="do not save a checkpoint at the last step (default: save one, in every variant)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads in every variant (OMP_NUM_THREADS, and torch.set_num_threads at "
                             "train begin), so that steps compare like with like (default 1, what Ray gives a "
                             "1-CPU worker; 0 = each framework's own choice: all cores in-process and in "
                             "raytrainer, 1 in Ray's recipe; a busy machine slows 2 threads down many times)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="small smoke run: 2×64 GPT-2, 20 steps, 1 repeat")
    parser.add_argument("--json-out", help="also write every measurement to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print the log of failed runs")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    if parser.parse_known_args(argv)[0].quick:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(layers=2, width=64, heads=2, seq_len=64, batch=4, steps=20, repeats=1, warmup_steps=3)
    options = parser.parse_args(argv)
    unknown = set(options.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants {options.variants!r}: unknown {sorted(unknown)}; choose from 'abcde'")
    if options.batch % 2 and "d" in options.variants:
        parser.error(f"--batch {options.batch} is odd: variant (d) splits it over 2 workers; use an even batch")
    if options.steps <= options.warmup_steps + 1:
        parser.error(f"--steps {options.steps} leaves no step after {options.warmup_steps} warm-up steps")
    return options


def main():
    options = parse_options()
    if options.child:
        child_main(options)
        return
    workload = build_workload(options)
    options.load_before = os.getloadavg()[0]
    measurements = {variant: [] for variant in options.variants}
    errors: dict[str, list[str]] = {}
    for repeat in range(options.repeats):
        for variant in options.variants:  # interleaved, so load from other processes spreads evenly
            outcome = run_child(variant, options)
            if "error" in outcome:
                errors.setdefault(variant, []).append(outcome["error"])
                print(f"repeat {repeat + 1} {VARIANT_NAMES[variant]}: FAILED {outcome['error']}", file=sys.stderr)
                continue
            measurements[variant].append(outcome["calls"])
            first = outcome["calls"][0]
            print(f"repeat {repeat + 1} {VARIANT_NAMES[variant]}: first step {first['first_step_s']:.2f} s, "
                  f"step {first['step_s']:.3f} s, end-to-end {first['end_to_end_s']:.2f} s", file=sys.stderr)
    if options.json_out:
        Path(options.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json_out).write_text(json.dumps({"options": vars(options), "measurements": measurements,
                                                      "errors": errors}, indent=1))
    print_report(measurements, errors, options, workload)


if __name__ == "__main__":
    main()
