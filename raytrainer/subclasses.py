"""`on_ray(cls)`: any `transformers.Trainer` subclass (TRL's trainers, `Seq2SeqTrainer`, a library's or the user's
own) trained on Ray workers, and any `TrainingArguments` subclass (TRL's configs, ...) with the Ray fields.

One mechanism for every Trainer: the class made is `class X(raytrainer.Trainer, cls)`, so `raytrainer.Trainer`'s
methods come first in the MRO (`train()`/`evaluate()`/`predict()` go to the workers from the driver; inside a worker
they are `cls`'s own) and everything else is `cls`'s. `raytrainer.Trainer` itself is `on_ray(transformers.Trainer)`.
The arguments class is `class X(cls, raytrainer.TrainingArguments)`: `cls`'s fields keep `cls`'s defaults (TRL's
configs change transformers' defaults), and the Ray fields and their checks come from `raytrainer.TrainingArguments`.
Its `__post_init__` sees `world_size == num_workers`, so what `cls` derives from the world size (TRL's GRPO/RLOO
generation batch) is derived for the workers that will run it (`raytrainer.arguments.workers_world_size`).

A class made here lives in this module, by the name of the class it was made from. It is not importable by that
name: instances of an arguments class pickle as "on_ray(the original class)" (`new_instance`), so `torch.save(args)`
(a checkpoint's training_args.bin) loads wherever the original class imports; a Trainer class travels to the workers
by value (cloudpickle), its bases by reference. `raytrainer.trl` and `raytrainer.seq2seq` give theirs an importable
home.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from transformers.trainer import Trainer as TransformersTrainer
from transformers.training_args import TrainingArguments as TransformersTrainingArguments

_made: dict[type, type] = {}  # original class -> the class on_ray made of it (one per process)


def on_ray(cls: type) -> type:
    """The Ray version of a Trainer or TrainingArguments class.

    Args:
        cls: a `transformers.Trainer` subclass (its `train()`, `evaluate()`, `predict()` and
            `hyperparameter_search()` then run on Ray Train workers, each worker building `cls` from the driver's
            constructor call), or a `transformers.TrainingArguments` subclass (it then has the Ray fields
            `num_workers`, `use_gpu`, `resources_per_worker`, ... of `raytrainer.TrainingArguments`).

    Returns:
        A subclass of `cls` (so `isinstance`/`issubclass` against `cls` hold), the same one on every call. A class that
        is on Ray already (a subclass of `raytrainer.Trainer` or `raytrainer.TrainingArguments`) is returned as it is.

    Example:
        ```python
        import trl
        from raytrainer import on_ray

        class MySFT(trl.SFTTrainer):
            def compute_loss(self, model, inputs, **kwargs): ...

        trainer = on_ray(MySFT)(model=model, args=on_ray(trl.SFTConfig)(output_dir="out", num_workers=2),
                                train_dataset=data)
        trainer.train()  # on 2 Ray workers, each running MySFT's compute_loss
        ```
    """
    from raytrainer.arguments import TrainingArguments
    from raytrainer.trainer import Trainer

    _made.setdefault(TransformersTrainer, Trainer)
    _made.setdefault(TransformersTrainingArguments, TrainingArguments)
    if not isinstance(cls, type) or not issubclass(cls, (TransformersTrainer, TransformersTrainingArguments)):
        what = "a subclass of neither" if isinstance(cls, type) else "not a class"
        raise TypeError(f"on_ray() takes a transformers.Trainer or transformers.TrainingArguments subclass; {cls!r} is "
                        f"{what}: pass the class itself, e.g. on_ray(trl.SFTTrainer) or on_ray(trl.SFTConfig).")
    if issubclass(cls, (Trainer, TrainingArguments)):
        return cls
    made = _made.get(cls)
    if made is None:
        made = _trainer_on_ray(cls, Trainer) if issubclass(cls, TransformersTrainer) else \
            _arguments_on_ray(cls, TrainingArguments)
        _made[cls] = made
    return made


def _namespace(cls: type, what: str) -> dict[str, Any]:
    return {"__module__": __name__, "__qualname__": cls.__qualname__, "_raytrainer_original": cls,
            "__doc__": f"`{cls.__module__}.{cls.__qualname__}` {what} (`raytrainer.on_ray`).\n\n{cls.__doc__ or ''}"}


def _trainer_on_ray(cls: type, ray_trainer: type) -> type:
    def __init__(self, *args, **kwargs):
        ray_trainer.__init__(self, *args, **kwargs)  # constructs `cls` as the user called it (`Trainer.__init__`)

    functools.update_wrapper(__init__, cls.__init__)  # `cls`'s signature and docstring
    __init__._raytrainer_observed = True  # `Trainer.__init__` observes the construction already
    namespace = _namespace(cls, "with train(), evaluate(), predict() and hyperparameter_search() run on Ray Train "
                                "workers")
    return type(cls.__name__, (ray_trainer, cls), {**namespace, "__init__": __init__})


def _arguments_on_ray(cls: type, ray_arguments: type) -> type:
    from raytrainer.arguments import workers_world_size

    def __post_init__(self):
        with workers_world_size(self):  # what `cls` derives from the world size, it derives for the workers
            super(made, self).__post_init__()

    namespace = _namespace(cls, "with raytrainer's Ray fields (num_workers, use_gpu, resources_per_worker, ...)")
    made = type(cls.__name__, (cls, ray_arguments), {**namespace, "__post_init__": __post_init__})
    return dataclasses.dataclass(made)


def original_of(cls: type) -> type | None:
    """The class `on_ray` made `cls` of (None for a class it did not make)."""
    return cls.__dict__.get("_raytrainer_original")


def new_instance(original: type) -> Any:
    """An empty instance of `on_ray(original)`: how an instance of a class made here is unpickled."""
    cls = on_ray(original)
    return cls.__new__(cls)


__all__ = ["on_ray"]
