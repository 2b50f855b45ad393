"""TRL's trainers on Ray (`raytrainer.trl`, `raytrainer.on_ray`): the numbers TRL gives in one process."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import trl
from transformers import TrainerCallback

from _iterative_fixtures import gpt2, tokenizer
from _trl_fixtures import additions, digits, grpo_prompts, sft_data
from helpers import free_port
from parity import assert_logs_close, assert_weights_close
from raytrainer import on_ray
from raytrainer.trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RewardConfig,
                            RewardTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer)

pytestmark = pytest.mark.usefixtures("ray_session")


def preference_data(n: int = 16) -> datasets.Dataset:
    rows = additions(n, seed=1)
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "chosen": [str(s) for _, s in rows],
                                       "rejected": [str(s + 1) for _, s in rows]})


def settings(tmp_path, name: str, **overrides) -> dict:
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                  learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, bf16=False,
                  gradient_checkpointing=False, max_length=16)
    values.update(overrides)
    return values


class WorkerThreads(TrainerCallback):
    """Records the torch thread count the Trainer trained with (on a worker: its share of the node's cores)."""

    def __init__(self):
        self.threads = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.threads = torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(count: int):
    """TRL in-process with the worker's thread count: the test process runs with 1 thread (tests/_iterative_fixtures.py)
    while a lone worker takes the node's cores, and float sums over 1 or 2 threads differ in their last bits (the
    reward model's weights by 1.5e-4 after 3 steps); with the same count the runs are bit-equal."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory) -> dict:
    """TRL itself under `torchrun --nproc_per_node 2` (tests/_trl_torchrun.py), the SFT and the GRPO reference in one
    start of the two processes: per kind, the log history, the final weights, the world size. use_cpu=True: without
    it, each CPU process of torchrun trains on its own."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    runs = {"sft": settings(tmp_path, "sft", use_cpu=True),
            "grpo": grpo_settings(tmp_path, "grpo", **GRPO_PER_PROCESS)}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    script = Path(__file__).with_name("_trl_torchrun.py")
    # Each process with the thread count of each of 2 workers on this node (their share of its cores; the tests
    # check that they trained with it): float sums differ in their last bits between thread counts.
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(script), str(tmp_path / "runs.json"),
                          str(tmp_path / "results.json")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": threads})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(result["world_size"] == 2 for result in results.values())  # two processes trained together
    return results


def weights_of(result: dict) -> torch.nn.Module:
    model = gpt2()
    model.load_state_dict({name: torch.tensor(value) for name, value in result["weights"].items()})
    return model


class PrintCaptured(TrainerCallback):
    """Prints into a redirected stdout on the worker (as dill does for datasets' fingerprints) and records whether the
    line escaped to the root logger (Ray Train's print patch sends it there, and so to the driver's console)."""

    def __init__(self):
        self.escaped = None

    def on_train_begin(self, args, state, control, **kwargs):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger().addHandler(handler)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                print("captured line")
        finally:
            logging.getLogger().removeHandler(handler)
        self.escaped = [record.getMessage() for record in records]


def test_sft_on_one_worker_equals_trl_in_process(tmp_path):
    data, tok = sft_data(), tokenizer()
    theirs = trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings(tmp_path, "trl")), train_dataset=data,
                            processing_class=tok)
    theirs.train()
    printed = PrintCaptured()
    ours = SFTTrainer(model=gpt2(), args=SFTConfig(**settings(tmp_path, "rt")), train_dataset=data,
                      processing_class=tok, callbacks=[printed])
    assert isinstance(ours, trl.SFTTrainer) and isinstance(ours.args, trl.SFTConfig)
    ours.train()
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # loss, entropy, token accuracy, num_tokens
    assert_weights_close(theirs.model, ours.model, tol=1e-6)
    assert printed.escaped == []  # a line printed into a captured stream stays there


class DoubledLossSFT(trl.SFTTrainer):
    """A user's subclass of TRL's trainer: the loss (and its gradients) doubled."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        return (loss[0] * 2, loss[1]) if return_outputs else loss * 2


def test_on_ray_of_a_users_sft_subclass_runs_its_override_on_the_workers(tmp_path):
    data, tok = sft_data(16), tokenizer()
    kwargs = dict(train_dataset=data, processing_class=tok)
    theirs = DoubledLossSFT(model=gpt2(), args=trl.SFTConfig(**settings(tmp_path, "trl", max_steps=3)), **kwargs)
    theirs.train()
    ours = on_ray(DoubledLossSFT)(model=gpt2(), args=on_ray(trl.SFTConfig)(**settings(tmp_path, "rt", max_steps=3)),
                                  **kwargs)
    assert isinstance(ours, DoubledLossSFT) and on_ray(DoubledLossSFT) is type(ours)
    ours.train()
    assert_logs_close(theirs.state.log_history, ours.state.log_history)
    plain = trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings(tmp_path, "plain", max_steps=1)), **kwargs)
    plain.train()
    first = [entry["loss"] for entry in ours.state.log_history if "loss" in entry][0]
    assert first == pytest.approx(2 * plain.state.log_history[0]["loss"], rel=1e-5)


def test_sft_on_two_workers_equals_trl_under_torchrun_with_two_processes(tmp_path, torchrun):
    """2 workers x batch 4 against TRL itself under `torchrun --nproc_per_node 2` x 4 (not one process x 8: TRL's
    token-level losses differ there by about 1%)."""
    theirs = torchrun["sft"]
    threads = WorkerThreads()
    ours = SFTTrainer(model=gpt2(), args=SFTConfig(**settings(tmp_path, "rt", num_workers=2, use_cpu=True)),
                      train_dataset=sft_data(), processing_class=tokenizer(), callbacks=[threads])
    ours.train()
    assert threads.threads == theirs["threads"]
    assert len([entry for entry in ours.state.log_history if "loss" in entry]) == 6
    assert_logs_close(theirs["log_history"], ours.state.log_history)  # per step: loss, entropy, accuracy, num_tokens
    assert_weights_close(weights_of(theirs), ours.model, tol=1e-6)


def test_dpo_on_one_worker_equals_trl_in_process(tmp_path):
    data, tok = preference_data(), tokenizer()
    extra = dict(max_steps=3, per_device_train_batch_size=4)
    theirs = trl.DPOTrainer(model=gpt2(), ref_model=gpt2(seed=1), args=trl.DPOConfig(**settings(tmp_path, "trl", **extra)),
                            train_dataset=data, processing_class=tok)
    theirs.train()
    ours = DPOTrainer(model=gpt2(), ref_model=gpt2(seed=1), args=DPOConfig(**settings(tmp_path, "rt", **extra)),
                      train_dataset=data, processing_class=tok)
    ours.train()
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # loss, rewards/*, logps/*
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


def saved_gpt2(folder: Path) -> str:
    """gpt2() saved to `folder`, for TRL to load the model (and its reference model) from the path; the loaded
    model keeps dropout off, as gpt2() has it."""
    model = gpt2()
    model.config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # what gpt2() switches off
    model.save_pretrained(folder)
    return str(folder)


def test_dpo_without_ref_model_on_one_worker_equals_trl_in_process(tmp_path):
    """ref_model=None with the model given as a path: TRL loads the reference model from it, on the driver and on the
    worker (the path must be readable by every worker, as by every process of `accelerate launch`)."""
    kwargs = dict(model=saved_gpt2(tmp_path / "model"), train_dataset=preference_data(), processing_class=tokenizer())
    extra = dict(max_steps=3, per_device_train_batch_size=4)
    threads = WorkerThreads()
    ours = DPOTrainer(args=DPOConfig(**settings(tmp_path, "rt", **extra)), callbacks=[threads], **kwargs)
    ours.train()
    with torch_threads(threads.threads):
        theirs = trl.DPOTrainer(args=trl.DPOConfig(**settings(tmp_path, "trl", **extra)), **kwargs)
        theirs.train()
    assert theirs.ref_model is not None and ours.ref_model is not None  # TRL made the reference model
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # rewards/* are log-ratios to the reference
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


def reward_model(seed: int = 0):
    """The fixtures' tiny GPT-2 with a one-output score head (a reward model), dropout off."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = gpt2().config
    config.num_labels, config.resid_pdrop, config.embd_pdrop, config.attn_pdrop = 1, 0.0, 0.0, 0.0
    return GPT2ForSequenceClassification(config)


def test_reward_on_one_worker_equals_trl_in_process(tmp_path):
    data, tok = preference_data(), tokenizer()
    extra = dict(max_steps=3, per_device_train_batch_size=4)
    threads = WorkerThreads()
    ours = RewardTrainer(model=reward_model(), args=RewardConfig(**settings(tmp_path, "rt", **extra)),
                         train_dataset=data, processing_class=tok, callbacks=[threads])
    assert isinstance(ours, trl.RewardTrainer)
    ours.train()
    with torch_threads(threads.threads):
        theirs = trl.RewardTrainer(model=reward_model(), args=trl.RewardConfig(**settings(tmp_path, "trl", **extra)),
                                   train_dataset=data, processing_class=tok)
        theirs.train()
    losses = [entry["loss"] for entry in ours.state.log_history if "loss" in entry]
    assert len(losses) == 3 and "accuracy" in ours.state.log_history[0]  # TRL's reward metrics came back
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # loss, accuracy, margin, rewards
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


GRPO_PER_PROCESS = dict(per_device_train_batch_size=2, use_cpu=True)  # 2 workers and torchrun's 2 processes


def grpo_settings(tmp_path, name: str, **overrides) -> dict:
    values = settings(tmp_path, name, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      max_steps=2, learning_rate=1e-2, use_vllm=False, temperature=1.0)
    values.update(overrides)
    del values["max_length"]  # GRPO bounds the completion (max_completion_length) instead
    return values


def test_grpo_on_two_workers_equals_trl_under_torchrun_and_brings_back_the_weights(tmp_path, torchrun):
    """GRPO with a Python reward function and transformers' generate on 2 workers x 2 prompts-completions: per step
    TRL's reward metrics and losses equal TRL itself under `torchrun --nproc_per_node 2`, and so do the weights."""
    theirs = torchrun["grpo"]
    assert theirs["generation_batch_size"] == 4  # what the workers must use: 2 processes x 2
    threads = WorkerThreads()
    trainer = GRPOTrainer(model=gpt2(), reward_funcs=digits, train_dataset=grpo_prompts(), processing_class=tokenizer(),
                          args=GRPOConfig(**grpo_settings(tmp_path, "rt", num_workers=2, save_strategy="steps",
                                                          save_steps=2, **GRPO_PER_PROCESS)), callbacks=[threads])
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.train()
    assert threads.threads == theirs["threads"]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:  # TRL's reward metrics, from the workers
        assert 0.0 <= entry["rewards/digits/mean"] <= 1.0
        assert entry["reward"] == pytest.approx(entry["rewards/digits/mean"])
        assert {"reward_std", "completions/mean_length", "entropy"} <= set(entry)
    assert_logs_close(theirs["log_history"], trainer.state.log_history)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in after)  # it trained
    assert_weights_close(weights_of(theirs), trainer.model, tol=1e-6)
    saved = type(trainer.model).from_pretrained(str(tmp_path / "rt" / "checkpoint-2")).state_dict()
    for name, tensor in saved.items():  # what the workers ended with
        assert torch.equal(tensor, after[name]), name


def test_grpo_on_one_worker_equals_trl_in_process(tmp_path):
    kwargs = dict(reward_funcs=digits, train_dataset=grpo_prompts(), processing_class=tokenizer())
    threads = WorkerThreads()
    ours = GRPOTrainer(model=gpt2(), args=GRPOConfig(**grpo_settings(tmp_path, "rt")), callbacks=[threads], **kwargs)
    ours.train()
    with torch_threads(threads.threads):
        theirs = trl.GRPOTrainer(model=gpt2(), args=trl.GRPOConfig(**grpo_settings(tmp_path, "trl")), **kwargs)
        theirs.train()
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # the sampled completions' rewards too
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


def unpaired_preference_data(n: int = 16) -> datasets.Dataset:
    """KTO's data: each completion with its own desirable/undesirable label (the right sum, or one off)."""
    rows = additions(n, seed=3)
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows],
                                       "completion": [str(s + i % 2) for i, (_, s) in enumerate(rows)],
                                       "label": [i % 2 == 0 for i in range(n)]})


def test_kto_on_one_worker_equals_trl_in_process(tmp_path):
    data, tok = unpaired_preference_data(), tokenizer()
    extra = dict(max_steps=3, per_device_train_batch_size=4)
    threads = WorkerThreads()
    ours = KTOTrainer(model=gpt2(), ref_model=gpt2(seed=1), args=KTOConfig(**settings(tmp_path, "rt", **extra)),
                      train_dataset=data, processing_class=tok, callbacks=[threads])
    ours.train()
    with torch_threads(threads.threads):
        theirs = trl.KTOTrainer(model=gpt2(), ref_model=gpt2(seed=1),
                                args=trl.KTOConfig(**settings(tmp_path, "trl", **extra)), train_dataset=data,
                                processing_class=tok)
        theirs.train()
    assert len([entry for entry in ours.state.log_history if "loss" in entry]) == 3
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # loss, kl, rewards/*, logps/*
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


def test_rloo_on_one_worker_equals_trl_in_process(tmp_path):
    """RLOO with a KL term to its reference model, which TRL loads from the model's path (on the driver and on the
    worker, as in each process of `accelerate launch`)."""
    kwargs = dict(model=saved_gpt2(tmp_path / "model"), reward_funcs=digits, train_dataset=grpo_prompts(),
                  processing_class=tokenizer())
    threads = WorkerThreads()
    ours = RLOOTrainer(args=RLOOConfig(**grpo_settings(tmp_path, "rt", beta=0.05)), callbacks=[threads], **kwargs)
    ours.train()
    with torch_threads(threads.threads):
        theirs = trl.RLOOTrainer(args=trl.RLOOConfig(**grpo_settings(tmp_path, "trl", beta=0.05)), **kwargs)
        theirs.train()
    assert "rewards/digits/mean" in next(entry for entry in ours.state.log_history if "loss" in entry)
    assert_logs_close(theirs.state.log_history, ours.state.log_history)  # the sampled completions' rewards too
    assert_weights_close(theirs.model, ours.model, tol=1e-6)


def test_without_trl_the_import_says_how_to_install_it():
    code = "import sys; sys.modules['trl'] = None\ntry:\n import raytrainer.trl\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pip install 'raytrainer[trl]'" in out


def test_peft_through_trl_trains_the_adapter_on_two_workers_and_saves_it(tmp_path):
    from peft import LoraConfig, PeftModel

    trainer = SFTTrainer(model=gpt2(), args=SFTConfig(**settings(tmp_path, "rt", num_workers=2, max_steps=4)),
                         train_dataset=sft_data(), processing_class=tokenizer(),
                         peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, PeftModel)  # TRL wrapped the model on the driver, as in-process
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    adapter = [name for name in after if "lora_" in name]
    assert adapter and all(not torch.equal(before[name], after[name]) for name in adapter if "lora_B" in name)
    assert all(torch.equal(before[name], after[name]) for name in after if "lora_" not in name)  # base frozen
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(gpt2(), str(tmp_path / "adapter")).state_dict()
    for name in adapter:
        assert torch.equal(loaded[name], after[name]), name
