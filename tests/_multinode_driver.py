"""A driver on a local Ray cluster of several nodes, run as its own process (by tests/test_many_nodes.py and
bench/node_loss.py): each node is a raylet with its own object store, and removing one is a real node loss.

    python tests/_multinode_driver.py FOLDER [--scenarios spread_storage,spread_local,search,generator]

The cluster: a head with 0 CPUs (the driver's node) and three worker nodes. `spread_storage` and `spread_local`
train the regression model on 2 workers (SPREAD, max_failures=1) and remove the node of worker 1 at step
`STALL_STEP` of the first attempt (its raylet and every process on it, with SIGKILL): `spread_storage` with
`storage_path` on a shared folder, `spread_local` without (the checkpoints stay in `output_dir`); the nodes left
serve the next scenario. `search` runs two trials side by side and removes the node of one of them (`run_search`);
`generator` removes the iterative SFT generator's node (`run_generator`). Each of these two starts with three live
worker nodes: the nodes removed before it are replaced by new ones (`added_nodes`).

Prints one JSON line: per scenario, what every worker process recorded (its node, rank, the step it started from,
the checkpoint it resumed from, timestamps), the node removed, the final weights, and where raytrainer's own
actors ran. Isolated from every other Ray on the machine: the caller sets RAY_TMPDIR to a folder of its own (the
cluster's temp dir and its address file go there, never /tmp/ray), and `Cluster.shutdown()` ends every process
the cluster started.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import sys
import threading
import time

import psutil
import ray
import ray.train
from ray.cluster_utils import Cluster
from transformers import TrainerCallback

from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.role import in_worker

STALL_STEP, SAVE_STEPS, MAX_STEPS = 6, 4, 16


def record(folder: str, event: str, **values) -> None:
    """Append one event of this process to its own file in `folder` (every node sees the same folder here)."""
    values.update(event=event, time=time.time(), pid=os.getpid(), node=ray.get_runtime_context().get_node_id())
    with open(os.path.join(folder, f"events-{os.getpid()}.jsonl"), "a") as file:
        file.write(json.dumps(values) + "\n")


class RecordingTrainer(Trainer):
    """The user's own Trainer subclass: on the workers it records the checkpoint it resumes from and how long
    transformers takes to load it."""

    events_folder = ""

    def train(self, resume_from_checkpoint=None, **kwargs):
        if in_worker():
            context = ray.train.get_context()
            record(self.events_folder, "train", rank=context.get_world_rank(), resume=resume_from_checkpoint,
                   created=psutil.Process().create_time(), run=os.path.basename(self.args.output_dir),
                   dataset_memory=memory_holding(self.train_dataset))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        started = time.time()
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        record(self.events_folder, "load_model", seconds=time.time() - started)

    def _load_optimizer_and_scheduler(self, checkpoint):
        started = time.time()
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            record(self.events_folder, "load_optimizer", seconds=time.time() - started)


def memory_holding(dataset) -> dict | None:
    """Where this process holds the first column of `dataset`'s Arrow table: the memory mapping its buffer lies
    in (a node's object store is one shared-memory file, `/dev/shm/plasma*`; each node has its own)."""
    table = getattr(dataset, "data", None)
    if table is None:
        return None
    address = table.table.column(0).chunks[0].buffers()[1].address
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= address < high:
                return {"mode": fields[1], "file": (fields[3], fields[4]), "path": " ".join(fields[5:])}
    return None


class StallOnce(TrainerCallback):
    """Records each worker's start and steps; worker `rank` stops at `step` of the first attempt and announces its
    node in `marker` (the driver removes that node meanwhile)."""

    def __init__(self, folder: str, marker: str, step: int = STALL_STEP, rank: int = 1):
        self.folder, self.marker, self.step, self.rank = folder, marker, step, rank

    def on_train_begin(self, args, state, control, **kwargs):
        record(self.folder, "begin", rank=ray.train.get_context().get_world_rank(), step=state.global_step,
               run=os.path.basename(args.output_dir))

    def on_step_end(self, args, state, control, **kwargs):
        rank = ray.train.get_context().get_world_rank()
        record(self.folder, "step", rank=rank, step=state.global_step, run=os.path.basename(args.output_dir))
        if rank == self.rank and state.global_step == self.step and not os.path.exists(self.marker):
            announce = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time()}
            with open(self.marker + ".tmp", "w") as file:
                json.dump(announce, file)
            os.replace(self.marker + ".tmp", self.marker)
            time.sleep(600)  # this node is removed now


def remove_announced_node(cluster: Cluster, marker: str, folder: str, seen: dict) -> None:
    """Wait for the marker, then remove the node it names (SIGKILL: the raylet and every process on it); note
    when, and when Ray noticed: the node dead in the GCS, the surviving workers of the old group gone."""
    while not os.path.exists(marker):
        time.sleep(0.02)
    with open(marker) as file:
        announce = json.load(file)
    node_id = announce["node"]
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    events = read_events(folder)
    run = next((e["run"] for e in events if e["pid"] == announce["pid"]), None)  # the stalled group's, if any
    old_pids = {e["pid"] for e in events if e["event"] == "begin" and e["node"] != node_id and e["run"] == run}
    seen.update(removed_node=node_id, kill=time.time())
    cluster.remove_node(node, allow_graceful=False)
    seen["removed"] = time.time()
    while "node_dead" not in seen or "old_group_gone" not in seen:
        if "node_dead" not in seen and not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            seen["node_dead"] = time.time()
        if "old_group_gone" not in seen and not any(psutil.pid_exists(pid) for pid in old_pids):
            seen["old_group_gone"] = time.time()
        time.sleep(0.02)


def read_events(folder: str) -> list[dict]:
    events = []
    for path in glob.glob(os.path.join(folder, "events-*.jsonl")):
        with open(path) as file:
            events += [json.loads(line) for line in file if line.strip()]
    return sorted(events, key=lambda e: e["time"])


def actor_node(actor) -> str:
    """The node an actor runs on, asked of the actor itself."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def run_scenario(cluster: Cluster, folder: str, name: str, storage: bool) -> dict:
    root = os.path.join(folder, name)
    events = os.path.join(root, "events")
    os.makedirs(events)
    RecordingTrainer.events_folder = events
    args = TrainingArguments(os.path.join(root, "out"), num_workers=2, placement_strategy="SPREAD", max_failures=1,
                             storage_path=os.path.join(folder, "shared-storage") if storage else None,
                             per_device_train_batch_size=4, learning_rate=0.05, logging_steps=1,
                             max_steps=MAX_STEPS, save_steps=SAVE_STEPS, report_to=[], disable_tqdm=True)
    marker = os.path.join(root, "stalled.json")
    seen: dict = {}
    remover = threading.Thread(target=remove_announced_node, args=(cluster, marker, events, seen), daemon=True)
    remover.start()
    trainer = RecordingTrainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(48),
                               callbacks=[StallOnce(events, marker)])
    started = time.time()
    trainer.train()
    finished = time.time()
    remover.join(timeout=60)
    session = trainer.__dict__["_raytrainer_workers"]
    channel_node = actor_node(session.group.channel)
    tables = [stand_in.table[0] for _, stand_in in session.datasets._sent.values()]
    locations = {ref.hex(): info for ref, info in ray.experimental.get_object_locations(tables).items()}
    trainer.close()
    return {"started": started, "finished": finished, "events": read_events(events), **seen,
            "channel_node": channel_node, "global_step": trainer.state.global_step, "dataset_locations": locations,
            "weights": {k: v.tolist() for k, v in trainer.model.state_dict().items()},
            "checkpoints": sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "out", "checkpoint-*"))),
            "storage_path": args.storage_path}


class BothTrialsRunning(TrainerCallback):
    """Rank 0 of each trial waits at step 2 of its first attempt until two trials got there: the two trials then
    run side by side, on two worker groups of the search."""

    def __init__(self, folder: str, trials: int = 2, step: int = 2):
        self.folder, self.trials, self.step = folder, trials, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or ray.train.get_context().get_world_rank() != 0:
            return
        with open(os.path.join(self.folder, "began-" + os.path.basename(args.output_dir)), "w"):
            pass
        deadline = time.time() + 300
        while len(glob.glob(os.path.join(self.folder, "began-*"))) < self.trials and time.time() < deadline:
            time.sleep(0.05)


def search_model_init():
    return RegressionModel()


def run_search(cluster: Cluster, folder: str, name: str) -> dict:
    """Two trials (grid over the learning rate) of 2 workers each (PACK: a trial's workers share a node), side by
    side; the node of the first trial to reach step 6 is removed. `storage_path` and `max_failures=1`."""
    from ray import tune

    root = os.path.join(folder, name)
    events = os.path.join(root, "events")
    os.makedirs(events)
    RecordingTrainer.events_folder = events
    args = TrainingArguments(os.path.join(root, "out"), num_workers=2, max_failures=1,
                             storage_path=os.path.join(folder, "shared-storage"), per_device_train_batch_size=4,
                             learning_rate=0.05, logging_steps=1, max_steps=MAX_STEPS, eval_strategy="steps",
                             eval_steps=SAVE_STEPS, report_to=[], disable_tqdm=True)
    marker = os.path.join(root, "stalled.json")
    seen: dict = {}
    remover = threading.Thread(target=remove_announced_node, args=(cluster, marker, events, seen), daemon=True)
    remover.start()
    trainer = RecordingTrainer(model_init=search_model_init, args=args, train_dataset=regression_dataset(48),
                               eval_dataset=regression_dataset(16, seed=1),
                               callbacks=[BothTrialsRunning(root), StallOnce(events, marker)])
    reported: dict = {}

    class Reported(tune.Callback):  # every result Tune got, by trial (on the driver)
        def on_trial_result(self, iteration, trials, trial, result, **info):
            reported.setdefault(trial.trial_id, []).append({"step": result.get("step"),
                                                            "objective": result.get("objective")})

    started = time.time()
    best = trainer.hyperparameter_search(hp_space=lambda _: {"learning_rate": tune.grid_search([0.03, 0.05])},
                                         n_trials=1, callbacks=[Reported()])
    finished = time.time()
    remover.join(timeout=60)
    trials = {trial.trial_id: {"status": trial.status, "objective": (trial.last_result or {}).get("objective"),
                               "config": trial.config} for trial in best.run_summary.trials}
    actors = [{"class": info["ActorClassName"], "node": info["Address"]["NodeID"]}
              for info in ray._private.state.actors().values()]
    trainer.close()
    return {"started": started, "finished": finished, "events": read_events(events), **seen, "trials": trials,
            "reported": reported, "actors": actors, "best_run": best.run_id, "storage_path": args.storage_path}


class StallingReward:
    """A reward function (it runs on the generator actor) that, on `stall_round`'s first try, announces the
    generator's node in `marker` and waits there (the driver removes that node meanwhile)."""

    def __init__(self, marker: str | None, stall_round: int = 1):
        self.marker, self.stall_round, self.calls = marker, stall_round, 0

    def __call__(self, prompts, completions):
        rewards = [float(len(c)) for c in completions]  # every sample earns something: rounds keep examples
        round_index = len(glob.glob(os.path.join(os.path.dirname(self.marker), "round-*"))) if self.marker else 0
        if self.marker and not os.path.exists(self.marker):
            open(os.path.join(os.path.dirname(self.marker), f"round-{os.getpid()}-{time.time()}"), "w").close()
            if round_index == self.stall_round:
                announce = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time()}
                with open(self.marker + ".tmp", "w") as file:
                    json.dump(announce, file)
                os.replace(self.marker + ".tmp", self.marker)
                time.sleep(600)  # this node is removed now
        return rewards


def run_generator(cluster: Cluster, folder: str, name: str) -> dict:
    """Iterative SFT for 3 rounds with the trainer actor and the generator on nodes of their own (2 CPUs each);
    the generator's node is removed while it scores round 1. Then the same run uninterrupted, for reference."""
    from _iterative_fixtures import arguments, gpt2, tokenizer
    from raytrainer import IterativeSFTTrainer

    root = os.path.join(folder, name)
    os.makedirs(root)
    marker = os.path.join(root, "stalled.json")
    seen: dict = {}
    remover = threading.Thread(target=remove_announced_node, args=(cluster, marker, root, seen), daemon=True)
    remover.start()
    outcome = {}
    for run, reward in (("interrupted", StallingReward(marker)), ("uninterrupted", StallingReward(None))):
        trainer = IterativeSFTTrainer(gpt2(), arguments(os.path.join(root, run), resources_per_worker={"CPU": 2}),
                                      tokenizer())
        started = time.time()
        history = trainer.train(["1+2=", "30+4=", "12+12=", "7+40="], reward, 3, samples_per_prompt=2,
                                generation_kwargs={"max_new_tokens": 3})
        outcome[run] = {"started": started, "finished": time.time(), "history": history,
                        "trainer_node": actor_node(trainer._trainers[0]),
                        "generator_node": actor_node(trainer._generator),
                        "weights": {k: v.tolist() for k, v in trainer.model.state_dict().items()}}
        trainer.shutdown()
        if run == "interrupted":
            remover.join(timeout=60)
    return {**outcome, **seen}


def replace_removed_nodes(cluster: Cluster, node_cpus: int, wanted: int = 3) -> list[str]:
    """Add worker nodes until `wanted` of them are alive; return the new nodes' ids."""
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    missing = wanted - sum(node.node_id in alive for node in cluster.worker_nodes)
    added = [cluster.add_node(num_cpus=node_cpus) for _ in range(missing)]
    if added:
        cluster.wait_for_nodes()
    return [node.node_id for node in added]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(node_cpus: int, system_config: dict | None, attempts: int = 3) -> tuple[Cluster, list]:
    """The head (0 CPUs) and three worker nodes. A raylet must register within 30 s (fixed in Ray): on a loaded
    machine it sometimes does not, and the cluster is started again after ending what the failed start left."""
    for attempt in range(1, attempts + 1):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=0, include_dashboard=False, _system_config=system_config)
            nodes = [cluster.add_node(num_cpus=node_cpus) for _ in range(3)]
            cluster.wait_for_nodes()
            return cluster, nodes
        except Exception as error:  # noqa: BLE001 - retried below, raised after the last attempt
            print(f"cluster start {attempt} failed: {error}", file=sys.stderr)
            try:
                cluster.shutdown()
            except Exception:  # noqa: BLE001 - a node that never came up
                pass
            end_own_processes()
            if attempt == attempts:
                raise


def end_own_processes() -> None:
    """Kill what this cluster started (their command lines name its private RAY_TMPDIR), never anything else."""
    marker = os.environ["RAY_TMPDIR"]
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or ()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--scenarios", default="spread_storage,spread_local")
    parser.add_argument("--node-cpus", type=int, default=2)
    parser.add_argument("--health-check-ms", type=int, default=0,
                        help="how often the GCS checks each node (a lost node is dead after 3 misses); 0: Ray's "
                             "default")
    options = parser.parse_args()
    assert os.environ.get("RAY_TMPDIR"), "set RAY_TMPDIR to a folder of this run's own"
    # Ray Train's placement-group cleaner asks the State API (a dashboard) whether a run's controller still lives;
    # this cluster has no dashboard, and the cleaner must never ask another Ray cluster on the machine instead.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{unused_port()}"
    # On a machine shared with other test runs, starting worker processes can take minutes: Ray Train must wait for
    # them rather than fail the attempt (its default waits 60 s).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    system_config = {"health_check_period_ms": options.health_check_ms, "health_check_timeout_ms":
                     options.health_check_ms, "health_check_failure_threshold": 3} if options.health_check_ms else None
    phases = {"process": psutil.Process().create_time(), "main": time.time()}
    cluster, worker_nodes = start_cluster(options.node_cpus, system_config)
    phases["cluster_up"] = time.time()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        phases["connected"] = time.time()
        from raytrainer.tune.pool import _take_lender

        result = {"driver_node": ray.get_runtime_context().get_node_id(),
                  "worker_nodes": [node.node_id for node in worker_nodes], "added_nodes": [],
                  "lender_node": actor_node(_take_lender(one_shot=False))}
        for name in options.scenarios.split(","):
            if name in ("search", "generator"):
                # each wants three live worker nodes: the nodes earlier scenarios removed are replaced by new ones
                result["added_nodes"] += replace_removed_nodes(cluster, options.node_cpus)
                result[name] = {"search": run_search, "generator": run_generator}[name](cluster, options.folder, name)
            else:
                result[name] = run_scenario(cluster, options.folder, name, storage=name.endswith("storage"))
                result["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        result["phases"] = {**phases, "scenarios_done": time.time()}
        with open(os.path.join(options.folder, "result.json"), "w") as file:  # kept for a look after a failure
            json.dump(result, file)
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        print(f"[driver] phases {json.dumps(phases)} shut down {time.time():.1f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
