"""RAYTRAINER_CLUSTER_AUTOSCALES: a worker group the cluster cannot hold is refused at once on a fixed cluster, and
waits for the node an autoscaler adds on a cluster that grows (here a real node joins the test session's Ray)."""

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from _cluster_fixtures import RAY
from helpers import RegressionModel, regression_dataset, stop_processes_of, training_settings
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend import group as worker_group

pytestmark = pytest.mark.usefixtures("ray_session")

SLOT = "autoscaled_slot"  # a resource only the added node has, as a GPU type only a scaled-up node group has


def arguments(tmp_path):
    return TrainingArguments(**training_settings(tmp_path, "rt", max_steps=2, num_workers=2,
                                                 per_device_train_batch_size=4,
                                                 resources_per_worker={"CPU": 1, SLOT: 1}))


def pending_groups_asking_for_the_slot(ray) -> list:
    return [group for group in ray.util.placement_group_table().values()
            if group["state"] == "PENDING" and any(SLOT in bundle for bundle in group["bundles"].values())]


def train_in_thread(trainer) -> tuple[threading.Thread, dict]:
    """trainer.train() in a thread; the dict gets its "output" or its "error"."""
    outcome = {}

    def train():
        try:
            outcome["output"] = trainer.train()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, outcome


def test_a_group_the_cluster_cannot_hold_fails_at_once_unless_the_cluster_autoscales(tmp_path, monkeypatch,
                                                                                     ray_session):
    ray = ray_session
    data = regression_dataset(16)
    # Another Trainer's idle warm workers: waiting for a resource they do not hold, the group must not close them.
    idle_trainer = Trainer(model=RegressionModel(), args=TrainingArguments(**training_settings(tmp_path, "idle",
                           max_steps=1, num_workers=1)), eval_dataset=data)
    idle_trainer.evaluate()
    idle_group = idle_trainer._raytrainer_workers.group
    groups_before = set(worker_group._live_groups)  # the session's idle groups, on nodes that stay
    monkeypatch.delenv("RAYTRAINER_CLUSTER_AUTOSCALES", raising=False)
    thread, outcome = train_in_thread(Trainer(model=RegressionModel(), args=arguments(tmp_path), train_dataset=data))
    thread.join(timeout=60)
    assert not thread.is_alive(), "on a cluster that does not grow, the group waited instead of being refused"
    assert isinstance(outcome.get("error"), ValueError), outcome
    assert str(outcome["error"]).startswith(f"2 workers x 1 {SLOT} = 2 {SLOT}, but the Ray cluster has 0. Lower "
                                            "num_workers or resources_per_worker"), outcome["error"]
    assert not pending_groups_asking_for_the_slot(ray)  # refused before any resource was asked for

    monkeypatch.setenv("RAYTRAINER_CLUSTER_AUTOSCALES", "1")
    thread, outcome = train_in_thread(Trainer(model=RegressionModel(), args=arguments(tmp_path), train_dataset=data))
    node, node_dir, address_file = None, None, Path("/tmp/ray/ray_current_cluster")
    address_before = address_file.read_text() if address_file.exists() else None
    try:
        deadline = time.monotonic() + 120
        while not pending_groups_asking_for_the_slot(ray):  # the group waits for resources instead of failing
            assert thread.is_alive(), outcome
            assert time.monotonic() < deadline, "no placement group asked the cluster for the workers"
            time.sleep(0.5)
        time.sleep(3)
        assert thread.is_alive() and not outcome, outcome
        # The "autoscaler": a node with the resource joins the cluster, and the waiting group starts on it. Its own
        # temp dir: `ray start` writes the address it joined there, not to /tmp/ray/ray_current_cluster, where every
        # later ray.init() on this machine would take it for the cluster to connect to.
        node_dir = tempfile.mkdtemp(prefix="rtas-", dir="/tmp")  # short: Ray's socket paths live under it
        node = subprocess.Popen([RAY, "start", "--address", ray.get_runtime_context().gcs_address, "--block",
                                 "--temp-dir", node_dir, "--num-cpus", "2", "--resources", f'{{"{SLOT}": 2}}',
                                 "--disable-usage-stats"], env={**os.environ, "RAY_TMPDIR": node_dir},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        thread.join(timeout=300)
        assert not thread.is_alive(), "training did not finish on the added node"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["output"].global_step == 2
        assert idle_group.alive and idle_trainer._raytrainer_workers.group is idle_group
    finally:
        for group in set(worker_group._live_groups) - groups_before:  # the workers on the added node go first,
            group.close()  # then the node
        if node is not None:
            stop_node(node, node_dir)
        thread.join(timeout=60)
    assert (address_file.read_text() if address_file.exists() else None) == address_before


def stop_node(node: subprocess.Popen, node_dir: str) -> None:
    """Stop the `ray start --block` process this test started and every process of its node (their command lines
    name the node's private temp dir; SIGKILL after a second: its raylet takes 10 s to exit on SIGTERM); remove the
    temp dir."""
    stop_processes_of(node.pid, node_dir, grace_s=1)
    node.wait(timeout=20)
    shutil.rmtree(node_dir, ignore_errors=True)
