"""TRL's trainers on Ray: `from raytrainer.trl import SFTTrainer, SFTConfig` instead of `from trl import ...`.

Every trainer and config class the installed TRL exports (`SFTTrainer`/`SFTConfig`, `DPOTrainer`/`DPOConfig`,
`GRPOTrainer`/`GRPOConfig`, `RewardTrainer`, `KTOTrainer`, `RLOOTrainer`, ...) is here as `raytrainer.on_ray` of it:
TRL's own class, constructed on the driver as TRL constructs it (tokenising the dataset, building the reference
model, wrapping PEFT), with `train()`/`evaluate()`/`predict()` run on Ray Train workers, each of which builds the
same class from the same constructor call, as each process of an `accelerate launch` does. Each config class has
raytrainer's Ray fields (`num_workers`, `use_gpu`, `resources_per_worker`, ...).

TRL is an optional dependency: `pip install "raytrainer[trl]"`.
"""

from __future__ import annotations

from typing import Any

try:
    import trl as _trl
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("raytrainer.trl needs TRL, which is not installed: pip install 'raytrainer[trl]' (or "
                      "pip install trl).") from _error

from transformers import Trainer as _TransformersTrainer
from transformers import TrainingArguments as _TransformersTrainingArguments

from raytrainer.subclasses import on_ray



def _is_config(name: str) -> bool:
    value = getattr(_trl, name, None)
    return isinstance(value, type) and issubclass(value, _TransformersTrainingArguments)


# The trainers TRL exports (imported on first use: TRL's trainer modules take seconds to import) and their configs.
_CANDIDATES = sorted(name for name in dir(_trl) if not name.startswith("_") and (
    name.endswith("Trainer") or name.endswith("Config") and _is_config(name)))


def __getattr__(name: str) -> Any:
    if name in _CANDIDATES:
        original = getattr(_trl, name)
        if isinstance(original, type) and issubclass(original, (_TransformersTrainer, _TransformersTrainingArguments)):
            made = on_ray(original)
            made.__module__ = __name__  # importable by name here (pickled by reference)
            globals()[name] = made
            return made
    raise AttributeError(f"module 'raytrainer.trl' has no attribute {name!r}: it has TRL {_trl.__version__}'s "
                         f"trainers and their configs ({', '.join(_CANDIDATES)}), each on Ray.")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CANDIDATES})

__all__ = list(_CANDIDATES)
