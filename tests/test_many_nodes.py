"""Many nodes: the workers spread over nodes, a lost node (its raylet and every process on it) is survived from the
last checkpoint, and raytrainer's own actors live on the driver's node.

The cluster (a head with 0 CPUs and three nodes of 2 CPUs, each a raylet with its own object store) and its driver
run in a process of their own (`_multinode_driver.py`): the test session's Ray stays untouched. Nodes have 2 CPUs
so that SPREAD is what puts the two workers on two nodes (PACK would put both on one).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import transformers

from helpers import RegressionModel, regression_dataset
from parity import run_transformers
from raytrainer.backend.reporting import restore_point
from raytrainer.tune.checks import plan_trial_resources

TESTS = Path(__file__).parent
STALL_STEP, SAVE_STEPS, MAX_STEPS = 6, 4, 16


def processes_of(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or ()) and proc.pid != os.getpid():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def run_cluster_driver(folder: Path, *options: str, timeout: float = 900) -> dict:
    """Run the multi-node driver in its own session, with its own Ray temp dir; assert it left no process."""
    ray_tmp = tempfile.mkdtemp(prefix="rtn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(TESTS / "_multinode_driver.py"), str(folder), *options],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    deadline = time.monotonic() + 30
    while processes_of(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_of(ray_tmp)
    for proc in left:  # only this cluster's processes: their command lines name its private temp dir
        proc.kill()
    assert process.returncode == 0, "\n".join(line for line in stderr.splitlines()
                                              if "PlacementGroupCleaner" not in line)[-6000:]
    assert not left, f"the cluster left processes behind: {[p.info['cmdline'][:2] for p in left]}"
    assert not os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def attempts(scenario: dict) -> tuple[dict, dict]:
    """Each attempt's worker records by rank ({rank: [events]}): the processes that began at step 0, and those
    Ray Train started after the node was removed (by process: a slow survivor may record after the kill)."""
    first = {e["pid"] for e in scenario["events"] if e["event"] == "begin" and e["step"] == 0}
    before, after = {}, {}
    for event in scenario["events"]:
        if "rank" in event:
            (before if event["pid"] in first else after).setdefault(event["rank"], []).append(event)
    return before, after


def node_of(events: list[dict]) -> str:
    nodes = {event["node"] for event in events}
    assert len(nodes) == 1, nodes
    return nodes.pop()


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> tuple[dict, Path]:
    """Every scenario on one cluster, in one driver process (a cluster start costs more than most scenarios):
    the two spread runs, then the search and the generator, each on three live worker nodes."""
    folder = tmp_path_factory.mktemp("many-nodes")
    scenarios = "spread_storage,spread_local,search,generator"
    return run_cluster_driver(folder, "--scenarios", scenarios, "--health-check-ms", "500"), folder


def test_spread_workers_survive_losing_a_node_and_our_actors_stay_on_the_driver_node(cluster_run):
    result, tmp_path = cluster_run
    theirs, _ = run_transformers(
        RegressionModel(), transformers.TrainingArguments(
            str(tmp_path / "hf"), per_device_train_batch_size=8, learning_rate=0.05, logging_steps=1,
            max_steps=MAX_STEPS, save_steps=SAVE_STEPS, report_to=[], disable_tqdm=True),
        train_dataset=regression_dataset(48))
    expected = {name: value.item() for name, value in theirs.model.state_dict().items()}
    driver_node, worker_nodes = result["driver_node"], result["worker_nodes"]
    # raytrainer's own actors run where the driver runs, never on a worker's node
    assert result["lender_node"] == driver_node
    removed = []
    for name in ("spread_storage", "spread_local"):
        scenario = result[name]
        assert scenario["channel_node"] == driver_node, name  # and it outlived the lost node
        before, after = attempts(scenario)
        assert sorted(before) == sorted(after) == [0, 1], name
        first_nodes = [node_of(before[rank]) for rank in (0, 1)]
        assert len(set(first_nodes)) == 2 and set(first_nodes) <= set(worker_nodes), name  # SPREAD
        assert scenario["removed_node"] == first_nodes[1]  # the node of worker 1, removed at step 6
        removed.append(scenario["removed_node"])
        assert [e["step"] for e in before[1] if e["event"] == "step"] == list(range(1, STALL_STEP + 1))
        # the restarted group runs on the nodes left and resumes from the last checkpoint (step 4), never from 0
        second_nodes = [node_of(after[rank]) for rank in (0, 1)]
        assert not set(second_nodes) & set(removed), name
        for rank in (0, 1):
            train, begin = (next(e for e in after[rank] if e["event"] == kind) for kind in ("train", "begin"))
            assert begin["step"] == SAVE_STEPS, name
            assert [e["step"] for e in after[rank] if e["event"] == "step"] == list(range(SAVE_STEPS + 1,
                                                                                          MAX_STEPS + 1))
            assert os.path.basename(train["resume"]) == f"checkpoint-{SAVE_STEPS}", train
            where = scenario["storage_path"] or str(tmp_path / name / "out")
            assert train["resume"].startswith(where + os.sep), (train["resume"], where)
        assert scenario["global_step"] == MAX_STEPS
        assert scenario["weights"] == pytest.approx(expected, abs=1e-6), name
        assert_one_dataset_copy_per_node(scenario, driver_node, removed)
    # storage_path: SPREAD again over the two nodes left; without it, both workers on the one node left
    assert len({node_of(e) for e in attempts(result["spread_storage"])[1].values()}) == 2
    assert len({node_of(e) for e in attempts(result["spread_local"])[1].values()}) == 1
    assert sorted(result["alive_nodes"]) == sorted(set(worker_nodes) - set(removed) | {driver_node})


def assert_one_dataset_copy_per_node(scenario: dict, driver_node: str, removed: list[str]) -> None:
    """Every worker read the training set's Arrow table in place, in its node's object store (a shared-memory file
    of its own per node): the workers of one node share one copy, and the object is on each node that read it
    (and the driver's, where it was put) once."""
    trains = [event for event in scenario["events"] if event["event"] == "train"]
    by_node: dict[str, set] = {}
    for train in trains:
        memory = train["dataset_memory"]
        assert memory is not None and "plasma" in memory["path"] and memory["mode"].endswith("s"), memory
        by_node.setdefault(train["node"], set()).add(tuple(memory["file"]))
    assert all(len(files) == 1 for files in by_node.values()), by_node
    assert len({file for files in by_node.values() for file in files}) == len(by_node)
    shared = [node for node in by_node if len({t["pid"] for t in trains if t["node"] == node}) >= 2]
    assert shared or scenario["storage_path"], by_node  # spread_local's restart: both workers on one node
    (located,) = scenario["dataset_locations"].values()
    assert sorted(located["node_ids"]) == sorted({driver_node, *by_node} - set(removed))


def test_a_checkpoint_missing_on_the_restarted_workers_node_is_a_clear_error(tmp_path):
    """What a group restarted on other machines meets without a shared storage_path: the last checkpoint stayed in
    output_dir on the lost node. It fails with the fix, instead of silently training from step 0."""
    with pytest.raises(FileNotFoundError, match=r"(?s)checkpoint-8.*not on this node.*storage_path"):
        restore_point(str(tmp_path / "out" / "checkpoint-8"))


def first_attempts(events: list[dict]) -> dict[str, set]:
    """The worker processes of each run (a search trial's output folder) that began at step 0, by run."""
    runs: dict[str, set] = {}
    for event in events:
        if event["event"] == "begin" and event["step"] == 0:
            runs.setdefault(event["run"], set()).add(event["pid"])
    return runs


def transformers_eval_losses(folder: Path, learning_rate: float) -> list[float]:
    """transformers' own eval losses at steps 4, 8, 12, 16 of the trial's configuration (one process, batch 8)."""
    theirs, _ = run_transformers(
        RegressionModel(), transformers.TrainingArguments(
            str(folder), per_device_train_batch_size=8, learning_rate=learning_rate, logging_steps=1,
            max_steps=MAX_STEPS, eval_strategy="steps", eval_steps=SAVE_STEPS, save_strategy="no", report_to=[],
            disable_tqdm=True),
        train_dataset=regression_dataset(48), eval_dataset=regression_dataset(16, seed=1))
    return [entry["eval_loss"] for entry in theirs.state.log_history if "eval_loss" in entry]


def test_search_trials_spread_over_nodes_and_a_trial_whose_node_dies_resumes_from_its_checkpoint(cluster_run,
                                                                                                  tmp_path):
    """Two trials side by side (PACK: each trial's 2 workers on one node), `storage_path`, `max_failures=1`; the
    node of the first trial to reach step 6 is removed. That trial's group restarts on the node left free and
    resumes from the trial's own checkpoint-4; the other trial runs on untouched; both end with transformers'
    eval losses; Tune's trial actors, the lender and the channels ran on the driver's node."""
    result = cluster_run[0]
    search, driver_node = result["search"], result["driver_node"]
    trials = search["trials"]
    assert sorted(trial["status"] for trial in trials.values()) == ["TERMINATED", "TERMINATED"]
    events = search["events"]
    first = first_attempts(events)
    assert sorted(first) == sorted(f"run-{trial_id}" for trial_id in trials)
    first_nodes = {run: node_of([e for e in events if e["pid"] in pids]) for run, pids in first.items()}
    assert len(set(first_nodes.values())) == 2  # the two trials ran on two nodes (each on one: PACK)
    killed = next(run for run, node in first_nodes.items() if node == search["removed_node"])
    survivor = next(run for run in first if run != killed)
    steps = {run: {} for run in first}
    for event in events:
        if event["event"] == "step":
            steps[event["run"]].setdefault(event["pid"], []).append(event["step"])
    # the survivor: one attempt, every step once
    assert [steps[survivor][pid] for pid in sorted(first[survivor])] == [list(range(1, MAX_STEPS + 1))] * 2
    # the killed trial: its first attempt reached step 6; the restart began at its own checkpoint-4, elsewhere
    restarted = [e for e in events if e.get("run") == killed and e["pid"] not in first[killed]]
    begins = [e for e in restarted if e["event"] == "begin"]
    assert sorted(e["rank"] for e in begins) == [0, 1] and {e["step"] for e in begins} == {SAVE_STEPS}
    assert node_of(restarted) not in first_nodes.values()
    assert {tuple(steps[killed][e["pid"]]) for e in begins} == {tuple(range(SAVE_STEPS + 1, MAX_STEPS + 1))}
    trial_id = killed[len("run-"):]
    for train in (e for e in restarted if e["event"] == "train"):
        assert train["resume"].startswith(search["storage_path"] + os.sep), train
        assert os.path.basename(train["resume"]) == f"{trial_id}-checkpoint-{SAVE_STEPS}", train
    # what Tune got: every evaluation once, in order (no second series from step 4), transformers' eval losses
    for trial_id, trial in trials.items():
        reported = search["reported"][trial_id]
        assert [r["step"] for r in reported] == [4, 8, 12, 16], (trial_id, reported)
        expected = transformers_eval_losses(tmp_path / f"hf-{trial_id}", trial["config"]["learning_rate"])
        assert [r["objective"] for r in reported] == pytest.approx(expected, rel=1e-5), trial_id
        assert trial["objective"] == pytest.approx(expected[-1], rel=1e-5)
    # raytrainer's and Tune's own actors ran where the driver runs
    by_class: dict[str, set] = {}
    for actor in search["actors"]:
        by_class.setdefault(actor["class"], set()).add(actor["node"])
    for name in ("ImplicitFunc", "GroupLender", "CommandChannel"):
        assert by_class[name] == {driver_node}, (name, by_class)


def test_losing_the_generators_node_restarts_it_elsewhere_with_the_latest_weights(cluster_run):
    """Iterative SFT with the trainer actor and the generator on nodes of their own (2 CPUs each): the
    generator's node is removed while it scores round 1. A new generator starts on the node left, with the
    latest weights (version 1), samples round 1 again, and the run ends as an uninterrupted one does: the same
    rewards, losses and final weights."""
    result = cluster_run[0]
    scenario = result["generator"]
    interrupted, uninterrupted = scenario["interrupted"], scenario["uninterrupted"]
    removed, trainer_node = scenario["removed_node"], interrupted["trainer_node"]
    assert removed != trainer_node and removed in result["worker_nodes"] + result["added_nodes"]
    assert interrupted["generator_node"] not in (removed, trainer_node)
    assert [h["generator_restarts"] for h in interrupted["history"]] == [0, 1, 1]
    assert [h["rollout_weight_version"] for h in interrupted["history"]] == [0, 1, 2]  # the latest weights
    for key in ("reward_mean", "kept", "loss", "weight_version"):
        assert [h[key] for h in interrupted["history"]] == [h[key] for h in uninterrupted["history"]], key
    assert interrupted["weights"] == uninterrupted["weights"]


def test_trial_actors_ask_for_the_driver_nodes_resource():
    kwargs = {}
    plan_trial_resources(kwargs, {"CPU": 2}, {"CPU": 8}, driver_node_resource="node:__internal_head__")
    assert kwargs["resources_per_trial"] == {"cpu": 0, "memory": 1, "node:__internal_head__": 0.001}
    kwargs = {"resources_per_trial": {"cpu": 1}}  # the user's own choice stays
    plan_trial_resources(kwargs, {"CPU": 2}, {"CPU": 8}, driver_node_resource="node:__internal_head__")
    assert kwargs["resources_per_trial"] == {"cpu": 1}
