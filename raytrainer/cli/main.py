"""`raytrainer train CONFIG.yaml`: train a model described by a YAML/JSON file on Ray workers.

This is what `ray job submit -- raytrainer train job.yaml` runs on a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from raytrainer.cli.config import ConfigError, JobConfig, load_job_config

FILE_FORMAT = """\
config file (YAML or JSON), three sections:

  model:
    config: {model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 128}
                              # build a new model from a transformers config, or instead:
    # path: ./my-model        # load a local folder written by save_pretrained
    task: causal-lm           # causal-lm (default), masked-lm or sequence-classification
    tokenizer: ./tokenizer    # a local tokenizer folder (default: model.path if it holds one)
  data:
    train: data/train.jsonl   # parquet/json/jsonl/csv/arrow/txt file(s), a glob, a list,
    eval: data/eval.jsonl     #   or a datasets save_to_disk folder
    text_column: text         # tokenized with the tokenizer (default text); data that
    max_length: 128           #   already has input_ids is used as it is
    # label_column: label     # sequence-classification labels (default label)
  training:                   # any raytrainer.TrainingArguments field
    output_dir: /shared/runs/tiny-gpt2
    num_workers: 2
    max_steps: 50
    learning_rate: 1.0e-3
    save_steps: 10
    # resume_from_checkpoint: true   # continue from the latest checkpoint in output_dir

Paths in model and data are relative to the config file's folder; output_dir and the other
training paths are relative to the working directory, as in transformers.

--set overrides any key with dotted names; values are parsed as YAML:
  raytrainer train job.yaml --set training.max_steps=10 --set model.config.n_layer=4
  raytrainer train job.yaml --set learning_rate=3e-4     # a bare TrainingArguments field

Errors in the file (bad YAML, unknown keys, missing paths, invalid arguments) are reported with the
line or key before Ray starts. Ray: RAY_ADDRESS (or training.ray_address) selects a cluster; inside
`ray job submit` the job's cluster is used; otherwise a local Ray is started on this machine.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrainer",
                                     description="Train Hugging Face models on Ray Train workers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train the model described by a YAML/JSON config file",
                                description="Train the model described by a YAML/JSON config file on Ray workers.",
                                epilog=FILE_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", metavar="CONFIG", help="the YAML or JSON config file")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. training.max_steps=10 (repeatable)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config and load model and data, then stop before starting Ray")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `raytrainer` console script and `python -m raytrainer`."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if not sys.stderr.isatty():  # in `ray job logs` and CI, per-example progress bars are noise
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        config = load_job_config(options.config, options.overrides)
        from raytrainer.cli.build import build_training_job

        job = build_training_job(config)
    except ConfigError as error:
        print(f"raytrainer: error: {error}", file=sys.stderr)
        return 2
    _print_summary(config, job)
    if options.dry_run:
        print("raytrainer: config OK (--dry-run: not training).")
        return 0
    return _train(config, job)


def _print_summary(config: JobConfig, job) -> None:
    parameters = sum(p.numel() for p in job.model.parameters())
    evaluation = f", {len(job.eval_dataset)} eval examples" if job.eval_dataset is not None else ""
    print(f"raytrainer: {config.source}: {type(job.model).__name__} ({parameters:,} parameters), "
          f"{len(job.train_dataset)} train examples{evaluation}, {job.args.num_workers} worker(s), "
          f"output_dir={job.args.output_dir}", flush=True)


def _train(config: JobConfig, job) -> int:
    from raytrainer import Trainer

    trainer = Trainer(model=job.model, args=job.args, data_collator=job.data_collator,
                      train_dataset=job.train_dataset, eval_dataset=job.eval_dataset,
                      processing_class=job.tokenizer)
    result = trainer.train(resume_from_checkpoint=config.training.get("resume_from_checkpoint"))
    trainer.save_model(job.args.output_dir)
    output_dir = Path(job.args.output_dir)
    _write_json(output_dir / "train_results.json", result.metrics)
    if job.eval_dataset is not None and job.args.do_eval:
        _write_json(output_dir / "eval_results.json", _final_eval_metrics(trainer, job.args, result.global_step))
    print(f"raytrainer: trained {result.global_step} steps, training loss {result.training_loss:.4f}; "
          f"model saved to {output_dir}", flush=True)
    return 0


def _final_eval_metrics(trainer, args, global_step: int) -> dict:
    """Metrics of the final model: those of an evaluation at the last step if training ran one, else evaluate()."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == global_step and not args.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def _write_json(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
