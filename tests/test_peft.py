"""A PEFT (LoRA) model trains on 2 workers; the driver holds the trained adapter, saves it, and resumes from it."""

import copy

import pytest
import torch
import transformers

from helpers import lm_dataset, tiny_gpt2, training_settings
from parity import assert_logs_close, assert_weights_close, run_transformers
from raytrainer import Trainer, TrainingArguments

peft = pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'raytrainer[peft]'")
pytestmark = pytest.mark.usefixtures("ray_session")


def lora_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_gpt2(), config)


def settings(tmp_path, name, **overrides):
    return training_settings(tmp_path, name, **{"learning_rate": 5e-3, "max_steps": 8, "save_strategy": "steps",
                                                "save_steps": 4, **overrides})


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_lora_trains_on_two_workers_saves_its_adapter_and_resumes(tmp_path):
    data = lm_dataset(64)
    model = lora_model()
    before = adapter_weights(model)
    theirs, _ = run_transformers(copy.deepcopy(model), transformers.TrainingArguments(**settings(tmp_path, "hf")),
                                 train_dataset=data)
    ours = Trainer(model=model, args=TrainingArguments(**settings(
        tmp_path, "rt", num_workers=2, per_device_train_batch_size=4)), train_dataset=data)
    ours.train()
    assert isinstance(ours.model, peft.PeftModel) and ours.model is model
    trained = adapter_weights(ours.model)
    assert any((trained[k] - before[k]).abs().max() > 1e-4 for k in trained)  # the adapter learned
    assert_logs_close(theirs.state.log_history, ours.state.log_history, rel=1e-4)
    assert_weights_close(theirs.model, ours.model, tol=1e-5)

    ours.save_model(str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter"))
    for name, value in adapter_weights(loaded).items():
        assert torch.equal(value, trained[name]), name

    resumed = Trainer(model=lora_model(), args=TrainingArguments(**settings(
        tmp_path, "rt", num_workers=2, per_device_train_batch_size=4)), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "rt" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert_weights_close(ours.model, resumed.model, tol=1e-6)
