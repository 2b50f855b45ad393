"""Which Ray a driver uses and how its first call starts: a stale record of a local cluster (wrong addresses:
tests/test_cluster_address.py), the embedded Ray (no dashboard, loopback only), and Ray plus the workers
started in the background at construction (used by the first call, stopped by a driver-side error or when the
Trainer is dropped)."""

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import weakref
from pathlib import Path

import psutil
import pytest
import ray

from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.early_start import EarlyStart, starts_early
from raytrainer.backend.session import _close_later, _connect, _start_group

TESTS = Path(__file__).resolve().parent


def small_args(path, **overrides):
    values = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=0.1, report_to=[], save_strategy="no",
                  disable_tqdm=True, logging_steps=1)
    return TrainingArguments(str(path), **{**values, **overrides})


def test_only_a_scripts_first_trainer_that_can_train_starts_early():
    first = dict(can_train=True, in_worker=False, ray_connected=False, already_taken=False, setting=None)
    assert starts_early(**first)
    assert not starts_early(**{**first, "can_train": False})  # nothing to train or evaluate on
    assert not starts_early(**{**first, "in_worker": True})  # the user's Trainer built again on a worker
    assert not starts_early(**{**first, "ray_connected": True})  # test suites, trials, notebooks' later Trainers
    assert not starts_early(**{**first, "already_taken": True})  # the script's second Trainer
    assert not starts_early(**{**first, "setting": "0"})  # RAYTRAINER_START_EARLY=0


def train_workers() -> set[int]:
    """This process's Ray Train worker processes (children of the session's raylet)."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(_cmdline(p))}


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def wait_until(condition, timeout_s=300.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def start_early_now(trainer):
    """What construction does for a script's first Trainer (here Ray is already connected, so it is done by hand)."""
    session = trainer._raytrainer_workers
    session._early = EarlyStart(trainer.args, _connect, _start_group)
    session._early_release = weakref.finalize(session, _close_later, session._early)
    return session._early


def started_workers(early, before: set[int]) -> set[int]:
    assert early.done.wait(timeout=300)
    assert early.error is None, early.error
    assert ray.get(early.group.channel.wait_ready.remote(), timeout=600)  # rank 0 waits for its first command
    assert wait_until(lambda: train_workers() - before)
    return train_workers() - before


@pytest.mark.usefixtures("ray_session")
def test_a_driver_side_error_stops_the_early_group_and_a_dropped_trainer_releases_it(tmp_path):
    before = train_workers()
    unlabeled = regression_dataset(16).remove_columns("labels")
    trainer = Trainer(model=RegressionModel(), args=small_args(tmp_path), train_dataset=unlabeled)
    workers = started_workers(start_early_now(trainer), before)
    with pytest.raises(ValueError, match="have no label"):  # the driver's check, before any worker is used
        trainer.train()
    assert wait_until(lambda: not (workers & train_workers())), "the early group outlived the driver's error"
    assert trainer._raytrainer_workers.group is None

    dropped = Trainer(model=RegressionModel(), args=small_args(tmp_path), train_dataset=regression_dataset(16))
    workers = started_workers(start_early_now(dropped), before)
    del dropped
    gc.collect()
    assert wait_until(lambda: not (workers & train_workers())), "a dropped Trainer left its early workers running"


DRIVER = textwrap.dedent("""
    import glob, json, os, socket, sys, time
    import psutil, ray, transformers
    sys.path.insert(0, {tests!r})
    from helpers import RegressionModel, regression_dataset
    from raytrainer import Trainer, TrainingArguments

    with socket.socket() as probe:  # a port nothing listens on: the record of a cluster that is gone
        probe.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % probe.getsockname()[1]
    record = os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    open(record, "w").write(dead)

    values = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=0.1, report_to=[], save_strategy="no",
                  disable_tqdm=True, logging_steps=1, seed=5)
    trainer = Trainer(model=RegressionModel(), args=TrainingArguments({out!r}, **values),
                      train_dataset=regression_dataset(32))
    session = trainer._raytrainer_workers
    started_early = session._early is not None
    # another Trainer's call while the background start is still inside ray.init(): it waits, then trains there
    connecting = not ray.is_initialized()
    second = Trainer(model=RegressionModel(), args=TrainingArguments({out!r} + "-second", **values),
                     train_dataset=regression_dataset(32)).train()
    session._finish_early_start()  # (what train() does first) to see which group the background start made
    early_group = session._early_group
    ours = trainer.train()
    used_early_group = early_group is not None and session.group is early_group
    hf_args = transformers.TrainingArguments({out!r} + "-hf", **values)
    theirs = transformers.Trainer(model=RegressionModel(), args=hf_args, train_dataset=regression_dataset(32)).train()

    node = ray._private.worker._global_node
    children = psutil.Process().children(recursive=True)
    listening = sorted({{c.laddr.ip for p in children if p.name() in ("gcs_server", "raylet")
                        for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}})
    actors = sorted({{line.split(":actor_name:")[1].strip() for path in glob.glob(node.get_logs_dir_path() + "/worker-*.out")
                      for line in open(path) if ":actor_name:" in line}})
    idle = [path for path in glob.glob(node.get_logs_dir_path() + "/worker-*-ffffffff-*.out")]  # of no job
    print("DRIVER " + json.dumps({{"actors": actors, "connecting": connecting, "second": second.training_loss, "idle_workers": len(idle),
        "dead": dead, "started_early": started_early, "used_early_group": used_early_group,
        "ours": ours.training_loss, "theirs": theirs.training_loss, "gcs": ray.get_runtime_context().gcs_address,
        "session_dir": node.get_session_dir_path(), "webui_url": node.address_info.get("webui_url"),
        "dashboard": [p.cmdline() for p in children if any(a.endswith("dashboard/dashboard.py") for a in p.cmdline())],
        "listening": listening}}),
        flush=True)
""")


def test_first_trainer_starts_an_embedded_ray_early_past_a_stale_record(tmp_path):
    """A script whose machine has a stale `ray start` record: the driver says so and starts its own Ray (no
    dashboard, loopback only) in the background at construction; the first train() uses that group and trains
    as transformers does; nothing is left running after the script."""
    private_tmp = tempfile.mkdtemp(prefix="rtst-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", OPT_OUT)}
    env.update(RAY_TMPDIR=private_tmp, PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]))
    try:
        script = DRIVER.format(tests=str(TESTS), out=str(tmp_path / "out"))
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        line = next(line for line in result.stdout.splitlines() if line.startswith("DRIVER "))
        report = json.loads(line[len("DRIVER "):])
        assert f"names {report['dead']}, which does not answer" in result.stderr
        assert "run `ray stop` to clear the record" in result.stderr
        assert report["session_dir"].startswith(private_tmp) and report["gcs"].startswith("127.0.0.1:")
        assert report["started_early"] and report["used_early_group"]
        assert report["ours"] == pytest.approx(report["theirs"], rel=1e-6)
        assert report["connecting"] and report["second"] == pytest.approx(report["theirs"], rel=1e-6)
        # Ray still runs its API server process, with the dashboard's modules and frontend left out
        assert not report["webui_url"] and report["dashboard"]
        assert all("--disable-frontend" in command for command in report["dashboard"]), report["dashboard"]
        assert report["listening"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in report["listening"])
        assert "SIGTERM handler is not set" not in result.stderr
        # Ray Train's run on the embedded Ray starts no actor for long-lived or autoscaling clusters, nor Ray Data's
        assert {"TrainController", "RayTrainWorker", "CommandChannel"} <= set(report["actors"]), report["actors"]
        assert not {"PlacementGroupCleaner", "_AutoscalingCoordinatorActor", "DatasetManager",
                    "PreemptionWatcher"} & set(report["actors"]), report["actors"]
        assert report["idle_workers"] == 0  # no worker processes prestarted for no one
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if private_tmp in " ".join(p.info["cmdline"] or ())]
        assert wait_until(lambda: not [p for p in leftovers if p.is_running()], 30), "Ray outlived the script"
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


OPT_OUT = "RAYTRAINER_START_EARLY"
