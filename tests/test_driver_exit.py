"""Ctrl-C and the driver's exit release the Ray Train workers: a driver script in a subprocess, attached to this
session's Ray (which outlives it), is interrupted mid-train and then exits without `close()`; the worker processes
it started are counted and must be gone each time."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import process_gone

pytestmark = pytest.mark.usefixtures("ray_session")
TESTS = Path(__file__).resolve().parent

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from transformers import TrainerCallback
    from helpers import RegressionModel, process_identity, regression_dataset, training_settings
    from raytrainer import Trainer, TrainingArguments

    folder = sys.argv[2]

    class Workers(TrainerCallback):
        # every rank writes its process at each call; rank 0 steps slowly once the driver asks for it
        def record(self, args, name):
            with open(os.path.join(folder, f"{name}-rank{args.process_index}.json"), "w") as file:
                json.dump(process_identity(), file)

        def on_train_begin(self, args, state, control, **kwargs):
            self.record(args, "train")

        def on_evaluate(self, args, state, control, **kwargs):
            self.record(args, "evaluate")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                open(os.path.join(folder, "training"), "w").close()
            time.sleep(0.2)

    args = TrainingArguments(**training_settings(__import__("pathlib").Path(folder), "out", max_steps=10000,
                                                 num_workers=2, per_device_train_batch_size=4))
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(64),
                      eval_dataset=regression_dataset(8), callbacks=[Workers()])
    try:
        trainer.train()  # interrupted by the test (SIGINT, as Ctrl-C sends)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    input()  # the driver lives on until the test has counted the workers
    trainer.evaluate()  # a new group, then the script ends without close()
    print("exiting", flush=True)
""")


def workers(folder: Path, call: str) -> list[tuple[int, float]]:
    return [tuple(json.loads((folder / f"{call}-rank{rank}.json").read_text())) for rank in (0, 1)]


def wait_for(path: Path, driver: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert driver.poll() is None, (path.parent / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout_s} s"
        time.sleep(0.2)


def test_ctrl_c_and_driver_exit_release_the_workers(ray_session, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")  # a file, not a pipe: Ray's forwarded worker logs never block it
    # Ctrl-C as in a terminal: a test run started in the background by a non-interactive shell (`make test &`,
    # nohup) ignores SIGINT, and a child inherits that, so the driver starts with SIGINT's default disposition.
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(TESTS), str(tmp_path)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(tmp_path / "training", driver)
        trained_on = workers(tmp_path, "train")
        assert all(not process_gone(*worker, timeout_s=0) for worker in trained_on)  # two live workers
        driver.send_signal(signal.SIGINT)
        assert all(process_gone(*worker) for worker in trained_on), "Ctrl-C left the workers running"
        assert driver.poll() is None  # the driver itself lives on
        driver.communicate("\n", timeout=300)
        output = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0 and "interrupted" in output and "exiting" in output, output[-3000:]
        evaluated_on = workers(tmp_path, "evaluate")
        assert not set(evaluated_on) & set(trained_on)
        assert all(process_gone(*worker) for worker in evaluated_on), "the driver's exit left the workers running"
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
