"""Tiny models and data for the tests, defined here on purpose: workers must get them without extra set-up."""

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

import datasets


class RegressionModel(nn.Module):
    """y = a * x + b, with an MSE loss: two parameters, exact comparisons (accelerate's test model)."""

    def __init__(self, a: float = 0.0, b: float = 0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x, labels=None):
        y = self.a * x + self.b
        if labels is None:
            return (y,)
        return (nn.functional.mse_loss(y, labels), y)


def regression_dataset(n: int = 64, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    y = (2.0 * x + 3.0 + rng.normal(scale=0.1, size=n)).astype(np.float32)
    return datasets.Dataset.from_dict({"x": x, "labels": y, "note": [f"row {i}" for i in range(n)]})


class TorchRegressionDataset(torch.utils.data.Dataset):
    """The same data as a plain torch Dataset of dicts."""

    def __init__(self, n: int = 64, seed: int = 0):
        data = regression_dataset(n, seed)
        self.x, self.y = data["x"], data["labels"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": torch.tensor(self.x[i]), "labels": torch.tensor(self.y[i])}


VOCAB = list("0123456789+= abcdefghijklmnopqrstuvwxyz.")


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB) + 1, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    return GPT2LMHeadModel(config)


def lm_dataset(n: int = 48, seq_len: int = 16, seed: int = 0) -> datasets.Dataset:
    """Character sequences of simple additions, as token ids with labels = input_ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = rng.integers(0, 50, size=2)
        text = f"{a}+{b}={a + b}."
        ids = [VOCAB.index(c) + 1 for c in text][:seq_len]
        ids = ids + [0] * (seq_len - len(ids))
        rows.append(ids)
    ids = np.array(rows, dtype=np.int64)
    labels = np.where(ids == 0, -100, ids)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": (ids != 0).astype(np.int64).tolist(),
                                       "labels": labels.tolist()})


class KillWorkerOnce(TrainerCallback):
    """SIGKILLs its own worker process at `step` on rank 0, the first time only (a marker file remembers)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero and not os.path.exists(self.marker):
            with open(self.marker, "w") as file:
                file.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class StepsRun(TrainerCallback):
    """The steps this attempt ran (the driver gets rank 0's instance from the attempt that finished)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def training_settings(tmp_path, name: str, **overrides) -> dict:
    """TrainingArguments keywords of a small, quiet run in `tmp_path/name`: no saving, no reporting, no bars."""
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, per_device_eval_batch_size=4,
                  learning_rate=0.1, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return values


def training_arguments(tmp_path, name: str = "rt", **overrides):
    """raytrainer's TrainingArguments of `training_settings` (Ray fields such as num_workers go in `overrides`)."""
    from raytrainer import TrainingArguments

    return TrainingArguments(**training_settings(tmp_path, name, **overrides))


def killed_pid(marker: str, timeout_s: float = 30.0) -> int:
    """The pid KillWorkerOnce wrote to `marker`, after checking that the process is really gone."""
    with open(marker) as file:
        pid = int(file.read())
    assert process_gone(pid, timeout_s=timeout_s), f"the killed worker {pid} is still running"
    return pid


def process_gone(pid: int, started: float | None = None, timeout_s: float = 60.0) -> bool:
    """Whether process `pid` ends within `timeout_s` (a pid the system gave to a newer process counts as gone when
    `started`, the create time of the process that was meant, is given)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            process = psutil.Process(pid)
            if _ended(process) or (started is not None and process.create_time() != started):
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def process_identity(pid: int | None = None) -> tuple[int, float]:
    """(pid, create time): names one process even after the system gives its pid to another."""
    import psutil

    process = psutil.Process(pid or os.getpid())
    return process.pid, process.create_time()


class WorkerPids(TrainerCallback):
    """Records rank 0's process at every train/evaluate/predict as (pid, create time); the driver sees rank 0's
    list after each call."""

    def __init__(self):
        self.processes: list[tuple[int, float]] = []

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _ in self.processes]

    def _record(self):
        self.processes.append(process_identity())

    def on_train_begin(self, args, state, control, **kwargs):
        self._record()

    def on_evaluate(self, args, state, control, **kwargs):
        self._record()

    def on_predict(self, args, state, control, **kwargs):
        self._record()


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports that were free a moment ago (bound to port 0 together, then released). Another
    program may take one before the caller binds it: callers retry with fresh ports (`retry_on_taken_port`)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


def retry_on_taken_port(start, attempts: int = 3, taken=("address already in use", "eaddrinuse")):
    """`start(port)` with a fresh free port, again (up to `attempts` times) when it fails because the port was
    taken in the meantime; any other error is raised at once."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except Exception as error:  # noqa: BLE001 - only a taken port is retried
            if attempt == attempts - 1 or not any(text in str(error).lower() for text in taken):
                raise


def processes_of(root_pid: int, marker: str) -> list:
    """Every live process of a Ray node this test started: `root_pid` (the `ray start` process), its descendants,
    and anything whose command line names `marker`, the node's private temp dir (Ray re-parents some daemons)."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid == root_pid or marker in " ".join(process.info["cmdline"] or ()):
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _ended(process) -> bool:
    """Whether `process` has exited. An exited process whose parent was stopped too stays a zombie until init
    reaps it (a container's init may never): it has ended."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until_ended(processes: list, timeout_s: float) -> list:
    """Wait up to `timeout_s` for every process of `processes` to end; returns those still running."""
    deadline = time.monotonic() + timeout_s
    while not all(_ended(process) for process in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [process for process in processes if not _ended(process)]


def stop_processes_of(root_pid: int, marker: str, grace_s: float) -> None:
    """SIGTERM `processes_of(root_pid, marker)`, then SIGKILL what is left (or appeared) after `grace_s`."""
    import psutil

    processes = processes_of(root_pid, marker)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    alive = _wait_until_ended(processes, grace_s) + processes_of(root_pid, marker)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_until_ended(alive, 10)
