"""`raytrainer.on_ray`: the Ray subclass of any Trainer or TrainingArguments class (driver side, without Ray)."""

import dataclasses
import inspect
import io

import pytest
import torch
import transformers
import trl

import raytrainer
from raytrainer import on_ray


@dataclasses.dataclass
class ScaledArguments(transformers.TrainingArguments):
    """A user's TrainingArguments subclass with a field of its own."""

    scale: float = 2.0
    logging_steps: float = 7


class ScaledTrainer(transformers.Trainer):
    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale


def test_one_mechanism_for_every_class():
    assert on_ray(transformers.Trainer) is raytrainer.Trainer
    assert on_ray(transformers.TrainingArguments) is raytrainer.TrainingArguments
    assert on_ray(transformers.Seq2SeqTrainer) is raytrainer.Seq2SeqTrainer
    made = on_ray(ScaledTrainer)
    assert on_ray(ScaledTrainer) is made and on_ray(made) is made
    assert issubclass(made, ScaledTrainer) and issubclass(made, raytrainer.Trainer)
    assert made.__mro__[1] is raytrainer.Trainer  # raytrainer's train/evaluate/predict come first
    assert inspect.signature(made) == inspect.signature(ScaledTrainer)
    assert inspect.signature(on_ray(trl.SFTTrainer)) == inspect.signature(trl.SFTTrainer)
    from raytrainer.trl import SFTTrainer

    assert SFTTrainer is on_ray(trl.SFTTrainer)


def test_arguments_keep_their_class_defaults_and_get_the_ray_fields(tmp_path):
    made = on_ray(trl.SFTConfig)
    args = made(output_dir=str(tmp_path), num_workers=2, bf16=False, report_to=[])
    assert isinstance(args, trl.SFTConfig) and isinstance(args, raytrainer.TrainingArguments)
    assert args.num_workers == 2 and args.logging_steps == trl.SFTConfig.logging_steps == 10  # TRL's default
    assert on_ray(ScaledArguments)(output_dir=str(tmp_path)).logging_steps == 7
    with pytest.raises(ValueError, match="num_workers=0 is invalid"):
        made(output_dir=str(tmp_path), num_workers=0, bf16=False)


def test_arguments_of_a_made_class_pickle_as_checkpoints_save_them(tmp_path):
    args = on_ray(ScaledArguments)(output_dir=str(tmp_path), scale=3.0, num_workers=2, report_to=[])
    buffer = io.BytesIO()
    torch.save(args, buffer)  # transformers' training_args.bin: plain pickle, by class name
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is on_ray(ScaledArguments) and loaded == args and loaded.scale == 3.0


def test_a_subclass_constructor_gets_the_call_as_given(tmp_path):
    from helpers import RegressionModel, regression_dataset

    args = raytrainer.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    trainer = on_ray(ScaledTrainer)(RegressionModel(), args, train_dataset=regression_dataset(8), scale=5.0)
    assert trainer.scale == 5.0 and trainer.args is args and isinstance(trainer, ScaledTrainer)
    assert trainer._raytrainer_call.args[1] is args and trainer._raytrainer_call.kwargs["scale"] == 5.0


def test_on_ray_refuses_what_is_no_trainer_or_arguments_class():
    with pytest.raises(TypeError, match=r"on_ray\(trl.SFTTrainer\)"):
        on_ray(transformers.PreTrainedModel)
    with pytest.raises(TypeError, match="not a class"):
        on_ray("trl.SFTTrainer")


def test_trl_configs_derive_the_generation_batch_for_the_workers(tmp_path):
    """TRL's GRPOConfig and RLOOConfig derive the generation batch from the world size in `__post_init__`; built on
    the driver (one process) they would see 1, refuse what is valid on 2 workers and hand the workers a one-process
    generation batch. They derive it for num_workers processes (what TRL derives under torchrun with that many,
    tests/test_trl.py checks the run), and refuse bad settings on the driver with TRL's own message."""
    common = dict(output_dir=str(tmp_path), report_to=[], bf16=False, use_vllm=False, num_generations=4)
    with pytest.raises(ValueError, match=r"generation_batch_size \(2\) must be divisible by num_generations"):
        trl.GRPOConfig(**common, per_device_train_batch_size=2)  # TRL on the driver: world size 1
    for original in (trl.GRPOConfig, trl.RLOOConfig):
        made = on_ray(original)
        args = made(**common, num_workers=2, per_device_train_batch_size=2)
        assert (args.generation_batch_size, args.steps_per_generation) == (4, 1)
        assert args.world_size == 1 and "_raytrainer_building_for" not in vars(args)  # only for __post_init__
        assert made(**common, num_workers=2, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2).generation_batch_size == 8
        with pytest.raises(ValueError, match=r"generation_batch_size \(6\) must be divisible by num_generations "
                                             r"\(4\)"):
            made(**common, num_workers=2, per_device_train_batch_size=3)
        with pytest.raises(ValueError, match=r"must be divisible by the global batch size \(4\)"):
            made(**common, num_workers=2, per_device_train_batch_size=2, generation_batch_size=6)
