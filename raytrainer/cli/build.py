"""Build what a `raytrainer train` config names: tokenizer, model, tokenized datasets, collator, arguments.

Everything here runs on the driver before Ray starts, so a bad file, column or setting fails fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrainer.cli.config import ConfigError, JobConfig

DATA_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow",
                ".txt": "text"}
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class ConfiguredJob:
    """The components a config describes, ready for `raytrainer.Trainer`."""

    model: Any
    args: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any


def build_training_job(config: JobConfig) -> ConfiguredJob:
    """Load/build the tokenizer, model, datasets and arguments a validated config names."""
    args = build_training_arguments(config)
    tokenizer = load_tokenizer(config)
    task = config.model["task"]
    train = tokenize(config, load_split(config, "train"), tokenizer, "train")
    evaluation = tokenize(config, load_split(config, "eval"), tokenizer, "eval") if "eval" in config.data else None
    # A model built from model.config starts from random weights: seeded with training.seed first, as transformers'
    # example scripts do, so that the same job gives the same run (a resumed job matches an uninterrupted one).
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    model = build_model(config, tokenizer, train)
    return ConfiguredJob(model=model, args=args, tokenizer=tokenizer, train_dataset=train, eval_dataset=evaluation,
                       data_collator=build_collator(task, tokenizer))


def build_training_arguments(config: JobConfig):
    """raytrainer.TrainingArguments from the `training` section; its own checks become ConfigErrors."""
    from raytrainer.arguments import TrainingArguments

    settings = {k: v for k, v in config.training.items() if k != "resume_from_checkpoint"}
    try:
        args = TrainingArguments(**settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{config.source}: the training section is not valid: {error}") from None
    _check_resume(config.training.get("resume_from_checkpoint"), args.output_dir)
    return args


def _check_resume(resume: Any, output_dir: str) -> None:
    """Fail before Ray starts when the checkpoint to resume from is not there."""
    from raytrainer.checks import last_complete_checkpoint

    if resume is True:
        if last_complete_checkpoint(output_dir) is None:
            raise ConfigError(f"training.resume_from_checkpoint=true, but output_dir={output_dir!r} holds no "
                              "complete checkpoint-<step> folder. Point output_dir at the earlier run, or remove "
                              "resume_from_checkpoint to start from scratch.")
    elif resume not in (None, False) and not Path(str(resume)).is_dir():
        raise ConfigError(f"training.resume_from_checkpoint={resume!r} is not a checkpoint folder. Use true (the "
                          "latest checkpoint in output_dir) or the path of a checkpoint-<step> folder.")


def load_tokenizer(config: JobConfig):
    if "tokenizer" not in config.model:
        return None
    from transformers import AutoTokenizer

    folder = config.model["tokenizer"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.tokenizer={str(folder)!r} could not be loaded as a tokenizer: {error}. Point it at "
                          "a folder written by tokenizer.save_pretrained(...).") from None
    if tokenizer.pad_token is None and config.model["task"] == "causal-lm":
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {folder} has neither a pad nor an eos token; batches of different "
                              "lengths cannot be padded. Add a pad token and save the tokenizer again.")
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice for causal LMs; padded labels are ignored
    return tokenizer


def _data_format(config: JobConfig, files: list[Path], role: str) -> str:
    if config.data.get("format"):
        return config.data["format"]
    formats = {DATA_FORMATS.get(f.suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise ConfigError(f"data.{role}: cannot tell the format of {[str(f) for f in files]}; use files ending in "
                          f"{', '.join(sorted(DATA_FORMATS))} (one kind per split) or set data.format.")
    return formats.pop()


def load_split(config: JobConfig, role: str):
    """A datasets.Dataset from local files or a save_to_disk folder (its 'train' / 'validation' split)."""
    import datasets

    paths: list[Path] = config.data[role]
    if len(paths) == 1 and paths[0].is_dir() and any((paths[0] / m).exists() for m in SAVE_TO_DISK_MARKERS):
        loaded = datasets.load_from_disk(str(paths[0]))
        if isinstance(loaded, datasets.DatasetDict):
            wanted = ["train"] if role == "train" else ["validation", "eval", "test"]
            split = next((s for s in wanted if s in loaded), None)
            if split is None:
                raise ConfigError(f"data.{role}={str(paths[0])!r} holds the splits {sorted(loaded)}, none named "
                                  f"{' or '.join(wanted)}. Save that split with Dataset.save_to_disk and point to it.")
            loaded = loaded[split]
        return loaded
    files = [f for p in paths for f in (sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p])]
    fmt = _data_format(config, files, role)
    return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")


def tokenize(config: JobConfig, dataset, tokenizer, role: str):
    """Tokenize the text column (truncated to data.max_length); pre-tokenized data passes through."""
    columns = dataset.column_names
    text_column = config.data.get("text_column", "text")
    label_column = config.data.get("label_column", "label")
    task = config.model["task"]
    if task == "sequence-classification" and "labels" not in columns:
        if label_column not in columns:
            raise ConfigError(f"data.{role} has no label column {label_column!r} (columns: {columns}). Set "
                              "data.label_column.")
        dataset = dataset.rename_column(label_column, "labels")
    if "input_ids" in columns:
        return dataset
    if text_column not in columns:
        raise ConfigError(f"data.{role} has no text column {text_column!r} and no input_ids (columns: {columns}). "
                          "Set data.text_column to the column holding the text.")
    if tokenizer is None:
        raise ConfigError(f"data.{role} holds text in {text_column!r} but no tokenizer is named: set "
                          "model.tokenizer to a local tokenizer folder.")
    max_length = config.data.get("max_length", 512)
    keep = {"labels"} if task == "sequence-classification" else set()
    return dataset.map(lambda batch: tokenizer(batch[text_column], truncation=True, max_length=max_length),
                       batched=True, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc=f"tokenizing {role}")


def _auto_model_class(task: str):
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM, "masked-lm": transformers.AutoModelForMaskedLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def build_model(config: JobConfig, tokenizer, train_dataset):
    """Load model.path, or build a fresh model from model.config sized to the tokenizer (and labels)."""
    import transformers

    model_class = _auto_model_class(config.model["task"])
    if "path" in config.model:
        try:
            return model_class.from_pretrained(str(config.model["path"]), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.path={str(config.model['path'])!r} could not be loaded as a "
                              f"{config.model['task']} model: {error}") from None
    settings = dict(config.model["config"])
    model_type = settings.pop("model_type")
    if tokenizer is not None:
        settings.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                settings.setdefault(name, getattr(tokenizer, name))
    if config.model["task"] == "sequence-classification" and "num_labels" not in settings:
        settings["num_labels"] = _count_labels(train_dataset)
    try:
        model_config = transformers.AutoConfig.for_model(model_type, **settings)
        return model_class.from_config(model_config)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"model.config could not build a {model_type!r} {config.model['task']} model: "
                          f"{error}") from None


def _count_labels(dataset) -> int:
    feature = dataset.features.get("labels")
    if hasattr(feature, "num_classes"):
        return feature.num_classes
    return len(set(dataset["labels"]))


def build_collator(task: str, tokenizer):
    """Pads batches and builds labels: LM collators for (masked) LMs, transformers' default otherwise."""
    if tokenizer is None or task == "sequence-classification":
        return None  # the Trainer picks DataCollatorWithPadding / default_data_collator, as transformers does
    from transformers import DataCollatorForLanguageModeling

    if task == "masked-lm" and tokenizer.mask_token is None:
        raise ConfigError("model.task=masked-lm needs a tokenizer with a mask token; this one has none.")
    return DataCollatorForLanguageModeling(tokenizer, mlm=task == "masked-lm")
