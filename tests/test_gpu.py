"""The GPU paths on a real GPU: 1 CUDA worker against transformers.Trainer in-process on the same GPU.

These tests are the `gpu` set. They need a CUDA device *and* a test session whose Ray has GPUs: the suite's Ray
starts with `num_gpus=0` (so that on a GPU machine every other test keeps its CPU/gloo path), and
`bench/gpu_check.sh` runs this file with `RAYTRAINER_TEST_GPUS=1`. Elsewhere each test is skipped with the reason.

What one GPU can and cannot check: the generator and the trainer actor of iterative SFT share it (half a GPU
each), so their weights travel through the object store; the NCCL broadcast path needs a GPU per actor (NCCL
refuses two ranks on one device) and is not run here (its gloo twin runs on CPU in test_iterative_actors.py).
DDP over NCCL needs two GPUs as well.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback

from helpers import lm_dataset, tiny_gpt2, training_settings
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.cluster import resolve_use_gpu

pytestmark = pytest.mark.gpu
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def gpu_session(request):
    """The session's Ray, when it has a GPU to lend; else skip, saying how to run this set."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the GPU set runs on a GPU machine with bench/gpu_check.sh")
    ray_session = request.getfixturevalue("ray_session")
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("this test session's Ray has no GPUs (the suite starts it with num_gpus=0 so that the other "
                    "tests keep their CPU path): run bench/gpu_check.sh, which sets RAYTRAINER_TEST_GPUS=1")
    return ray_session


@pytest.fixture(autouse=True)
def tf32_as_before():
    """transformers switches TF32 on for the process that builds torch_compile arguments: not for the next test."""
    before = getattr(torch.backends, "fp32_precision", None)
    yield
    if before is not None:
        torch.backends.fp32_precision = before


def settings(tmp_path, name: str, **overrides) -> dict:
    return training_settings(tmp_path, name, **{"per_device_train_batch_size": 8, "learning_rate": 1e-3,
                                                "num_train_epochs": 1, "seed": 0, **overrides})


def losses(log_history: list[dict], key: str = "loss") -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


def train_in_process(tmp_path, name: str, **overrides) -> transformers.Trainer:
    """transformers.Trainer in this process, on this process's GPU."""
    trainer = transformers.Trainer(model=tiny_gpt2(), args=transformers.TrainingArguments(
        **settings(tmp_path, name, **overrides)), train_dataset=lm_dataset(64), eval_dataset=lm_dataset(16, seed=1))
    trainer.train()
    return trainer


def train_on_a_gpu_worker(tmp_path, name: str, callbacks=(), **overrides) -> Trainer:
    trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(**settings(tmp_path, name, use_gpu=True, **overrides)),
                      train_dataset=lm_dataset(64), eval_dataset=lm_dataset(16, seed=1), callbacks=list(callbacks))
    trainer.train()
    return trainer


def run_to_run_tolerance(first: list[float], second: list[float], floor: float) -> float:
    """The relative tolerance transformers itself shows between two runs on this GPU (x2), at least `floor`."""
    spread = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(first, second))
    return max(2 * spread, floor)


def assert_close_rel(actual: list[float], expected: list[float], rel: float) -> None:
    assert len(actual) == len(expected) > 0, (actual, expected)
    for step, (ours, theirs) in enumerate(zip(actual, expected), start=1):
        assert ours == pytest.approx(theirs, rel=rel), (step, ours, theirs, rel)


def test_use_gpu_none_follows_the_cluster():
    """Runs everywhere: `use_gpu=None` means GPUs exactly when the cluster has one; `use_cpu` always wins."""
    args = lambda **kw: TrainingArguments(output_dir="unused", report_to=[], **kw)  # noqa: E731
    assert resolve_use_gpu(args(), {"CPU": 8.0, "GPU": 1.0}) is True
    assert resolve_use_gpu(args(), {"CPU": 8.0}) is False
    assert resolve_use_gpu(args(use_gpu=False), {"CPU": 8.0, "GPU": 1.0}) is False
    assert resolve_use_gpu(args(use_cpu=True), {"CPU": 8.0, "GPU": 1.0}) is False
    # use_gpu=True on a cluster without GPUs: refused on the driver (tests/test_validation.py, on CPU).


def test_a_driver_without_a_gpu_builds_bf16_and_tf32_arguments_for_gpu_workers():
    """Runs everywhere: transformers checks bf16/TF32 against the building process's device; with use_gpu=True the
    GPUs are the workers' (a CPU head node), so the driver leaves that check to them. use_gpu=None says what to do."""
    args = TrainingArguments(output_dir="unused", report_to=[], bf16=True, tf32=True, use_gpu=True)
    assert args.bf16 and args.tf32 and args.mixed_precision == "bf16"
    if torch.cuda.is_available():
        return
    import transformers.training_args as transformers_arguments

    assert transformers_arguments.is_torch_bf16_gpu_available() is False  # transformers' own check is back
    with pytest.raises(ValueError, match="support bf16/gpu.*this driver has no GPU.*set use_gpu=True"):
        TrainingArguments(output_dir="unused", report_to=[], bf16=True)


@pytest.mark.parametrize("installed", [True, False])
def test_a_package_installed_outside_site_packages_travels_by_reference(tmp_path, monkeypatch, installed):
    """Runs everywhere: `pip install --target` folders on PYTHONPATH (bench/gpu_check.sh on the GPU machine) hold libraries: their
    modules are importable on the workers, so they are not sent by value; the same package without a .dist-info
    record beside it is the user's own code."""
    import importlib

    from raytrainer.backend.user_code import is_user_module

    name = f"targetlib_{'installed' if installed else 'loose'}"
    (tmp_path / name / "sub").mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "sub" / "__init__.py").write_text("")
    (tmp_path / name / "sub" / "models.py").write_text("class Model:\n    pass\n")
    if installed:
        (tmp_path / f"{name}-1.0.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    package, models = importlib.import_module(name), importlib.import_module(f"{name}.sub.models")
    assert is_user_module(package) is is_user_module(models) is (not installed)


class WorkerDevice(TrainerCallback):
    """Where the worker's model trains (the driver sees rank 0's value after train())."""

    def __init__(self):
        self.device = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.device = str(next(model.parameters()).device)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_one_gpu_worker_matches_transformers(gpu_session, tmp_path, precision):
    """bf16 autocast, and fp16 with transformers' GradScaler: the per-step losses and grad norms of one CUDA
    worker equal transformers' in-process run on the same GPU, within transformers' own run-to-run spread."""
    first = train_in_process(tmp_path, f"hf-{precision}-1", **{precision: True})
    second = train_in_process(tmp_path, f"hf-{precision}-2", **{precision: True})
    theirs = losses(first.state.log_history)
    rel = run_to_run_tolerance(losses(second.state.log_history), theirs, floor=1e-3)
    device = WorkerDevice()
    ours = train_on_a_gpu_worker(tmp_path, f"rt-{precision}", callbacks=[device], **{precision: True})
    assert device.device == "cuda:0"
    assert len(theirs) == 8
    assert_close_rel(losses(ours.state.log_history), theirs, rel)
    assert_close_rel(losses(ours.state.log_history, "grad_norm"), losses(first.state.log_history, "grad_norm"),
                     max(rel, 1e-2))
    # evaluate/predict run on the worker's GPU too, and agree with transformers' on the same weights.
    their_eval, our_eval = first.evaluate(), ours.evaluate()
    assert our_eval["eval_loss"] == pytest.approx(their_eval["eval_loss"], rel=max(rel, 1e-3))
    their_prediction, our_prediction = first.predict(lm_dataset(16, seed=1)), ours.predict(lm_dataset(16, seed=1))
    assert our_prediction.predictions.shape == their_prediction.predictions.shape
    assert (our_prediction.predictions.argmax(-1) == their_prediction.predictions.argmax(-1)).mean() > 0.99
    # The trained model comes back to the driver, on its CPU.
    assert {p.device.type for p in ours.model.parameters()} == {"cpu"}
    for name, tensor in ours.model.state_dict().items():
        torch.testing.assert_close(tensor, first.model.state_dict()[name].cpu(), rtol=max(rel, 1e-2), atol=1e-3)


@pytest.mark.parametrize("option", ["gradient_checkpointing", "torch_compile"])
def test_gradient_checkpointing_and_torch_compile_on_a_gpu_worker(gpu_session, tmp_path, option):
    """Both are transformers' own paths on the worker: the same per-step losses as in-process, fp32."""
    theirs = losses(train_in_process(tmp_path, f"hf-{option}", **{option: True}).state.log_history)
    ours = train_on_a_gpu_worker(tmp_path, f"rt-{option}", **{option: True})
    assert_close_rel(losses(ours.state.log_history), theirs, rel=1e-4)


def test_a_gpu_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(gpu_session, tmp_path):
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=4)
    uninterrupted = train_on_a_gpu_worker(tmp_path, "whole", **common)
    checkpoint = tmp_path / "whole" / "checkpoint-8"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "rng_state.pth").is_file()
    resumed = Trainer(model=tiny_gpt2(seed=1), args=TrainingArguments(**settings(tmp_path, "resumed", use_gpu=True,
                                                                                 **common)),
                      train_dataset=lm_dataset(64))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == uninterrupted.state.global_step == 16
    for name, tensor in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


DRIVER_WITHOUT_A_GPU = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from helpers import lm_dataset, tiny_gpt2
from raytrainer import Trainer, TrainingArguments
args = TrainingArguments(output_dir={output!r}, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                         report_to=[], save_strategy="no", disable_tqdm=True, use_gpu=True, seed=0,
                         num_train_epochs=1)
trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset(64))
trainer.train()
print("RESULT " + json.dumps({{
    "driver_sees_cuda": torch.cuda.is_available(), "driver_initialized_cuda": torch.cuda.is_initialized(),
    "model_devices": sorted({{p.device.type for p in trainer.model.parameters()}}),
    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}}), flush=True)
"""


def test_the_driver_needs_no_gpu_of_its_own(gpu_session, tmp_path):
    """A driver that sees no GPU (CUDA_VISIBLE_DEVICES='') trains on the cluster's GPU and gets the model on CPU."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_WITHOUT_A_GPU.format(tests=str(TESTS), output=str(tmp_path / "driver-run")))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": gpu_session.get_runtime_context().gcs_address}
    completed = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["driver_sees_cuda"] is False and result["driver_initialized_cuda"] is False
    assert result["model_devices"] == ["cpu"]
    theirs = losses(train_in_process(tmp_path, "hf-fp32").state.log_history)
    assert_close_rel(result["losses"], theirs, rel=1e-4)


def test_use_gpu_none_trains_on_the_gpu_when_the_cluster_has_one(gpu_session, tmp_path):
    device = WorkerDevice()
    trainer = Trainer(model=tiny_gpt2(), args=TrainingArguments(**settings(tmp_path, "auto", max_steps=2)),
                      train_dataset=lm_dataset(64), callbacks=[device])
    assert trainer.args.use_gpu is None
    trainer.train()
    assert device.device == "cuda:0"


def test_iterative_sft_generator_and_trainer_share_one_gpu(gpu_session, tmp_path):
    """Half a GPU each: rounds run on the GPU, and after a sync the generator holds the trainer's weights."""
    import ray

    from _iterative_fixtures import arguments, gpt2, tokenizer
    from raytrainer import IterativeSFTTrainer

    trainer = IterativeSFTTrainer(gpt2(), arguments(tmp_path, use_cpu=False, use_gpu=True,
                                                    resources_per_worker={"CPU": 1, "GPU": 0.5}), tokenizer())
    try:
        history = trainer.train(["1+2=", "30+4=", "12+12=", "7+40="], lambda prompts, completions: [
            float(len(c)) for c in completions], 2, samples_per_prompt=2, generation_kwargs={"max_new_tokens": 3})
        assert [h["weight_version"] for h in history] == [1, 2]
        assert trainer._weight_transport == "object_store"  # NCCL needs a GPU per actor
        generated = trainer.generate(["1+2="], do_sample=False, max_new_tokens=3)
        assert generated.weight_version == 2

        def placement(actor):
            return {"gpu_ids": ray.get_gpu_ids(), "device": str(next(actor.model.parameters()).device),
                    "weights": {k: v.detach().cpu() for k, v in actor.model.state_dict().items()}}

        on_generator = ray.get(trainer._generator.__ray_call__.remote(placement))
        on_trainer = ray.get(trainer._trainers[0].__ray_call__.remote(placement))
        assert on_generator["device"].startswith("cuda") and on_trainer["device"].startswith("cuda")
        assert on_generator["gpu_ids"] == on_trainer["gpu_ids"]  # the same GPU, shared
        assert on_generator["weights"].keys() == on_trainer["weights"].keys()
        for name, tensor in on_trainer["weights"].items():
            torch.testing.assert_close(on_generator["weights"][name], tensor, rtol=0, atol=0)
    finally:
        trainer.shutdown()


# ---- FSDP and DeepSpeed: transformers' own paths on GPU workers ---------------------------------------------------

def test_fsdp_trains_through_transformers_own_path(gpu_session, tmp_path):
    trainer = train_on_a_gpu_worker(tmp_path, "fsdp", fsdp=True, fsdp_config={"fsdp_version": 2},
                                    per_device_train_batch_size=4, save_strategy="steps", save_steps=8)
    assert (tmp_path / "fsdp" / "checkpoint-16").is_dir()
    trained = losses(trainer.state.log_history)
    assert len(trained) == 16 and trained[-1] < trained[0]


def test_deepspeed_trains_through_transformers_own_path(gpu_session, tmp_path):
    pytest.importorskip("deepspeed")
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    trainer = train_on_a_gpu_worker(tmp_path, "ds", deepspeed=copy.deepcopy(config), per_device_train_batch_size=4)
    trained = losses(trainer.state.log_history)
    assert len(trained) == 16 and trained[-1] < trained[0]


# ---- ray job submit on a head started with the GPU ----------------------------------------------------------------

def test_ray_job_submit_of_the_example_on_a_gpu_head(gpu_session, tmp_path):
    from _cluster_fixtures import example_job_folder, start_local_ray_head

    folder = example_job_folder(tmp_path)
    output = tmp_path / "gpu-job"
    head = start_local_ray_head(num_cpus=4, num_gpus=1)
    try:
        completed = head.ray("job", "submit", "--working-dir", str(folder), "--", "raytrainer", "train", "job.yaml",
                             "--set", "use_gpu=true", "--set", "num_workers=1", "--set", "bf16=true",
                             "--set", "max_steps=20", "--set", f"output_dir={output}", timeout=600, check=False)
    finally:
        head.stop()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert "SUCCEEDED" in completed.stdout + completed.stderr
    state = json.loads((output / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    trained = losses(state["log_history"])
    assert trained and trained[-1] < trained[0]
