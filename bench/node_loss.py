"""What a lost node costs: the time from removing the node of worker 1 to the first training step after Ray Train
restarted the group, and how it splits, next to a cold start of the same group on the same cluster.

Each repeat runs tests/_multinode_driver.py (a local cluster: a head with 0 CPUs, three nodes of 2 CPUs, each a
raylet with its own object store; 2 workers, SPREAD, storage_path, max_failures=1) in a process of its own; at step 6
the node of worker 1 is removed (SIGKILL of its raylet and every process on it) and the group resumes from
checkpoint-4 on the nodes left. Phases, from what the driver and each worker process recorded:

  detect + reschedule   the kill -> the restarted group's worker processes exist (Ray Train saw the failure,
                        released the old group, placed a new one on the nodes left)
  worker start-up       -> the last new worker enters the user's Trainer.train() (Ray Train's worker set-up,
                        imports, the process group, the command fetched, the user's Trainer built)
  checkpoint load       transformers loading the model, optimizer and scheduler from storage_path (rank 0)
  to the first step     the rest until rank 0 ends its first step after the restart (data loader, DDP wrap,
                        the step itself)
The cold start is the first attempt: train() called on the driver -> rank 0's first step.

    python bench/node_loss.py [--repeats 3] [--health-check-ms 0]   (0: Ray's default node health check)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "_multinode_driver.py"


def run_once(health_check_ms: int) -> dict:
    folder = tempfile.mkdtemp(prefix="node-loss-")
    ray_tmp = tempfile.mkdtemp(prefix="rtn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(DRIVER), folder, "--scenarios", "spread_storage",
                           "--health-check-ms", str(health_check_ms)], env=env, capture_output=True, text=True,
                          timeout=900)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["spread_storage"]


def phases(scenario: dict) -> dict[str, float]:
    kill = scenario["kill"]
    first = {e["pid"] for e in scenario["events"] if e["event"] == "begin" and e["step"] == 0}
    before = [e for e in scenario["events"] if e["pid"] in first]  # by process: a survivor may record after the kill
    after = [e for e in scenario["events"] if e["pid"] not in first]
    trains = [e for e in after if e["event"] == "train"]
    rank0_pid = next(e["pid"] for e in trains if e["rank"] == 0)
    load = sum(e["seconds"] for e in after if e["pid"] == rank0_pid and e["event"] in ("load_model", "load_optimizer"))
    first_step = min(e["time"] for e in after if e["event"] == "step" and e["rank"] == 0)
    created, entered = min(e["created"] for e in trains), max(e["time"] for e in trains)
    steps = sorted(e["time"] for e in before if e["event"] == "step" and e["rank"] == 0)
    return {
        "detect + reschedule": created - kill,
        "worker start-up": entered - created,
        "checkpoint load": load,
        "to the first step": first_step - entered - load,
        "kill -> first step after the restart": first_step - kill,
        "cold start: train() -> first step": steps[0] - scenario["started"],
        "one training step": (steps[-1] - steps[0]) / max(1, len(steps) - 1),
        "GCS marks the node dead (not waited for)": scenario["node_dead"] - kill,
        "old group's workers gone (not waited for)": scenario["old_group_gone"] - kill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--health-check-ms", type=int, default=0)
    options = parser.parse_args()
    runs = []
    for repeat in range(options.repeats):
        runs.append(phases(run_once(options.health_check_ms)))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[-1].items()), file=sys.stderr)
    median = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    total = median["kill -> first step after the restart"]
    print(f"Node loss on a local 3-node cluster, 2 workers, median of {options.repeats} "
          f"(health check: {options.health_check_ms or 'Ray default'}):\n")
    print("| phase | seconds | share of kill -> first step |\n|---|---|---|")
    for name, value in median.items():
        share = f"{value / total:.0%}" if name in list(median)[:4] else ""
        print(f"| {name} | {value:.2f} | {share} |")
    cold = median["cold start: train() -> first step"]
    print(f"\nrestart / cold start: {total / cold:.2f}; steps redone: 2 (the kill at step 6, the last checkpoint at 4)")


if __name__ == "__main__":
    main()
