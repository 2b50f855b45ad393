"""raytrainer: the transformers.Trainer API, trained by Ray Train DDP workers."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so that `import raytrainer` stays cheap on workers and in the CLI.
_EXPORTS = {
    "Trainer": "raytrainer.trainer",
    "TrainingArguments": "raytrainer.arguments",
    "on_ray": "raytrainer.subclasses",
    "Seq2SeqTrainer": "raytrainer.seq2seq",
    "Seq2SeqTrainingArguments": "raytrainer.seq2seq",
    "IterativeSFTTrainer": "raytrainer.iterative.trainer",
    "BestRun": "raytrainer.tune.results",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raytrainer' has no attribute {name!r}")
