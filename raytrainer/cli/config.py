"""The `raytrainer train` config file: YAML/JSON parsing, `--set` overrides, validation.

Every problem is reported as a `ConfigError` naming the file and line (or the `--set` option), the bad
key or value, and the fix — before anything is loaded and before Ray starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("causal-lm", "masked-lm", "sequence-classification")
MODEL_KEYS = {
    "path": "a local model directory, loaded with AutoModelFor<task>.from_pretrained",
    "config": "a transformers config to build a fresh model from, e.g. {model_type: gpt2, n_layer: 2}",
    "task": f"what the model is trained for: {', '.join(TASKS)} (default causal-lm)",
    "tokenizer": "a local tokenizer directory (default: model.path when it holds a tokenizer)",
}
DATA_KEYS = {
    "train": "training data: a file, a glob, a list of files, or a datasets save_to_disk folder",
    "eval": "evaluation data, same forms as train",
    "format": "parquet, json, csv, arrow or text (default: from the file extension)",
    "text_column": "the column tokenized with the tokenizer (default text)",
    "label_column": "sequence-classification labels (default label)",
    "max_length": "tokens kept per example; longer texts are truncated (default 512)",
}
SECTIONS = ("model", "data", "training")


class ConfigError(ValueError):
    """A mistake in the config file or a `--set` override; the message says where and how to fix it."""


@dataclass
class JobConfig:
    """A validated config: the three sections, with data/model paths resolved against the config file."""

    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    source: Path
    key_lines: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)


def training_argument_fields() -> dict[str, dataclasses.Field]:
    """The settable fields of raytrainer.TrainingArguments (transformers' fields plus the Ray ones)."""
    from raytrainer.arguments import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def load_job_config(path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a config file. Raises ConfigError naming the line or key at fault."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"config file {str(source)!r} does not exist. Pass the path of a YAML or JSON file.")
    text = source.read_text()
    if source.suffix.lower() == ".json":
        try:
            json.loads(text)  # JSON's own parser names the line of a JSON syntax error
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source} line {error.lineno}, column {error.colno}: not valid JSON: "
                              f"{error.msg}.") from None
    try:
        raw = yaml.safe_load(text)  # YAML 1.2 reads JSON too; the node tree gives every key's line
        node = yaml.compose(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source} line {mark.line + 1}, column {mark.column + 1}" if mark else str(source)
        raise ConfigError(f"{where}: not valid YAML/JSON: {error.problem or error.context}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must be a mapping with the sections {', '.join(SECTIONS)}; "
                          f"found a {type(raw).__name__}.")
    key_lines = _key_lines(node)
    for override in overrides:
        _apply_override(raw, override, key_lines)
    config = JobConfig(model=raw.get("model") or {}, data=raw.get("data") or {},
                       training=raw.get("training") or {}, source=source, key_lines=key_lines)
    _check_keys(raw, config)
    _check_model(config)
    _check_data(config)
    config.training = _coerce_training_values(config)
    return config


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path, e.g. ('training', 'learning_rate'), to its 1-based line in the file."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key))
    return lines


def _where(config: JobConfig, *key: str) -> str:
    line = config.key_lines.get(key)
    if line is None:
        return f"--set {'.'.join(key)}" if key else str(config.source)
    return f"{config.source} line {line}"


def _apply_override(raw: dict, override: str, key_lines: dict) -> None:
    """Apply one `--set dotted.key=value`; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: use the form key=value, e.g. --set training.max_steps=10.")
    dotted, _, text = override.partition("=")
    keys = dotted.strip().split(".")
    if len(keys) == 1 and keys[0] not in SECTIONS and keys[0] in training_argument_fields():
        keys = ["training", keys[0]]  # a bare TrainingArguments field is a shortcut for training.<field>
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    target = raw
    for depth, key in enumerate(keys[:-1]):
        child = target.setdefault(key, {})
        if child is None:
            child = target[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is {child!r}, not a mapping.")
        target = child
    target[keys[-1]] = value
    key_lines.pop(tuple(keys), None)  # the value now comes from the command line, not the file


def _unknown_key(config: JobConfig, path: tuple[str, ...], known: typing.Iterable[str], what: str) -> ConfigError:
    suggestions = difflib.get_close_matches(path[-1], list(known), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return ConfigError(f"{_where(config, *path)}: unknown key {path[-1]!r} in {what}.{hint}")


def _check_keys(raw: dict, config: JobConfig) -> None:
    for key in raw:
        if key not in SECTIONS:
            raise _unknown_key(config, (key,), SECTIONS, f"the top level (sections: {', '.join(SECTIONS)})")
    for section, known in (("model", MODEL_KEYS), ("data", DATA_KEYS), ("training", training_argument_fields())):
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(config, section)}: {section!r} must be a mapping of keys, got {value!r}.")
        for key in value:
            if key not in known:
                what = "training (the TrainingArguments fields)" if section == "training" else section
                raise _unknown_key(config, (section, str(key)), known, what)


def resolve_path(config: JobConfig, value: str) -> Path:
    """A path from the file: `~` expanded, relative paths taken from the config file's folder."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else config.source.resolve().parent / path


def _check_model(config: JobConfig) -> None:
    model = config.model
    if not model:
        raise ConfigError(f"{config.source}: missing the 'model' section. Add model.path (a local model folder) "
                          "or model.config (e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}).")
    if ("path" in model) == ("config" in model):
        raise ConfigError(f"{_where(config, 'model')}: set exactly one of model.path (load a local model) and "
                          "model.config (build a new model from a transformers config).")
    task = model.setdefault("task", "causal-lm")
    if task not in TASKS:
        raise ConfigError(f"{_where(config, 'model', 'task')}: model.task={task!r} is not supported; "
                          f"use one of {', '.join(TASKS)}.")
    if "config" in model:
        built = model["config"]
        if not isinstance(built, dict) or "model_type" not in built:
            raise ConfigError(f"{_where(config, 'model', 'config')}: model.config must be a mapping with a "
                              "model_type, e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}.")
    for key in ("path", "tokenizer"):
        if key in model:
            model[key] = _existing_path(config, ("model", key), model[key], want_dir=True)
    if "tokenizer" not in model and "path" in model and _has_tokenizer(model["path"]):
        model["tokenizer"] = model["path"]


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _existing_path(config: JobConfig, key: tuple[str, ...], value: Any, want_dir: bool = False) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{_where(config, *key)}: {'.'.join(key)} must be a path, got {value!r}.")
    path = resolve_path(config, value)
    if not path.exists():
        raise ConfigError(f"{_where(config, *key)}: {'.'.join(key)}={str(value)!r} does not exist "
                          f"(looked for {path}). Fix the path; relative paths start at the config file's folder.")
    if want_dir and not path.is_dir():
        raise ConfigError(f"{_where(config, *key)}: {'.'.join(key)}={str(value)!r} is a file; it must be a folder "
                          "as written by save_pretrained.")
    return path


def _check_data(config: JobConfig) -> None:
    data = config.data
    if "train" not in data:
        raise ConfigError(f"{_where(config, 'data')}: missing data.train (a parquet/json/csv/arrow file, a glob, "
                          "a list of files, or a save_to_disk folder).")
    for role in ("train", "eval"):
        if role in data:
            data[role] = _data_files(config, role, data[role])
    fmt = data.get("format")
    if fmt is not None and fmt not in ("parquet", "json", "csv", "arrow", "text"):
        raise ConfigError(f"{_where(config, 'data', 'format')}: data.format={fmt!r} is not supported; use "
                          "parquet, json, csv, arrow or text.")
    max_length = data.get("max_length", 512)
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"{_where(config, 'data', 'max_length')}: data.max_length={max_length!r} must be a "
                          "positive whole number.")


def _data_files(config: JobConfig, role: str, value: Any) -> list[Path]:
    """Expand a data entry (file, glob, folder or list of them) to existing paths; error if any is missing."""
    entries = value if isinstance(value, list) else [value]
    paths = []
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise ConfigError(f"{_where(config, 'data', role)}: data.{role} entries must be paths, got {entry!r}.")
        pattern = resolve_path(config, entry)
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        existing = [Path(m) for m in matches if os.path.exists(m)]
        if not existing:
            raise ConfigError(f"{_where(config, 'data', role)}: data.{role}={str(entry)!r} does not exist (looked "
                              f"for {pattern}). Fix the path; relative paths start at the config file's folder.")
        paths.extend(existing)
    return paths


def _coerce_training_values(config: JobConfig) -> dict[str, Any]:
    """Convert strings to the field's type where YAML left one (`1e-4` is a string in YAML 1.1)."""
    from raytrainer.arguments import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    coerced = {}
    for name, value in config.training.items():
        if isinstance(value, str):
            value = _coerce(value, hints.get(name), lambda: _where(config, "training", name), name)
        coerced[name] = value
    return coerced


def _coerce(value: str, hint: Any, where: typing.Callable[[], str], name: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if str in options or any(isinstance(o, type) and issubclass(o, str) for o in options):
        return value  # a str (or str-enum) field takes the text as it is
    if value.strip().lower() in ("none", "null") and type(None) in options:
        return None
    for target in (bool, int, float):
        if target not in options:
            continue
        if target is bool:
            if value.strip().lower() in ("true", "false", "yes", "no"):
                return value.strip().lower() in ("true", "yes")
            continue
        try:
            return target(value)
        except ValueError:
            continue
    if any(t in options for t in (bool, int, float)):
        expected = " or ".join(t.__name__ for t in (bool, int, float) if t in options)
        raise ConfigError(f"{where()}: training.{name}={value!r} is not a valid {expected}.")
    return value
