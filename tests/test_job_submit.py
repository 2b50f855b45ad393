"""`ray job submit` against a real local Ray head with token authentication.

One head serves the module: a training job submitted with the `ray job submit` CLI, one with the
Python `JobSubmissionClient`, a job stopped mid-run and resumed from its last checkpoint, and driver
scripts that must join the job's cluster (or RAY_ADDRESS's) instead of starting a second Ray.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _cluster_fixtures import LocalRayHead, example_job_folder, start_local_ray_head, wait_for_job


DRIVER = """
import json, ray
from raytrainer.backend.cluster import ensure_ray
ensure_ray()
ensure_ray()  # a second call must reuse the same Ray
context = ray.get_runtime_context()
print("DRIVER " + json.dumps({"gcs_address": context.gcs_address,
      "session_dir": ray._private.worker._global_node.get_session_dir_path()}), flush=True)
"""


@pytest.fixture(scope="module")
def head():
    head = start_local_ray_head(num_cpus=4)
    try:
        yield head
    finally:
        head.stop()
        assert head.owned_processes() == [], "the Ray head left processes behind"


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory):
    """The example folder with its data and tokenizer, as a user would submit it."""
    return example_job_folder(tmp_path_factory.mktemp("job"))


def client(head: LocalRayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)


def checkpoints(output_dir: Path) -> dict[int, Path]:
    found = {}
    for path in output_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def assert_complete_checkpoint(path: Path, step: int) -> dict:
    """A checkpoint in the transformers layout whose files all load; returns its trainer state."""
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["global_step"] == step
    weights = load_file(path / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "scheduler.pt", weights_only=True)
    assert (path / "config.json").is_file()
    return state


def submitted_job_id(cli_output: str) -> str:
    return re.search(r"Job '(raysubmit_\w+)' submitted", cli_output).group(1)


def test_job_submit_stop_and_resume(head, working_dir, tmp_path, ray_session):
    """`ray job submit` a run, `ray job stop` it mid-run, resume it with JobSubmissionClient to SUCCEEDED, with the
    weights of an uninterrupted run of the same job (the same `raytrainer train` command, run after the resumed one
    in this process, on the test session's Ray: a third job would only add a driver's start-up). A constant
    learning rate: the resumed run's max_steps differs from the stopped one's, and a decaying schedule depends on
    max_steps."""
    from ray.job_submission import JobStatus

    from raytrainer.cli.main import main as raytrainer_cli

    jobs = client(head)
    output_dir = tmp_path / "run"
    common = ["--set", "save_steps=2", "--set", "eval_steps=4", "--set", "logging_steps=1", "--set",
              "save_total_limit=3", "--set", "lr_scheduler_type=constant"]
    settings = ["--set", f"output_dir={output_dir}", *common]
    submitted = head.ray("job", "submit", "--no-wait", "--working-dir", str(working_dir), "--",
                         "raytrainer", "train", "job.yaml", *settings, "--set", "max_steps=1000", check=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted_job_id(submitted.stdout + submitted.stderr)
    deadline = time.monotonic() + 240
    while len(checkpoints(output_dir)) < 2:  # stop once a checkpoint is surely complete and more are coming
        assert time.monotonic() < deadline, jobs.get_job_logs(job_id)[-3000:]
        assert not jobs.get_job_status(job_id).is_terminal(), jobs.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    stop = head.ray("job", "stop", job_id, check=False)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_for_job(jobs, job_id, {JobStatus.STOPPED}, timeout=120) == JobStatus.STOPPED

    saved = checkpoints(output_dir)
    last_step = max(saved)
    assert last_step < 1000 and not (output_dir / "train_results.json").exists()
    for step, path in saved.items():  # a stop never leaves a checkpoint that looks complete but is not
        assert_complete_checkpoint(path, step)

    entrypoint = " ".join(["raytrainer", "train", "job.yaml", *settings, "--set", f"max_steps={last_step + 4}",
                           "--set", "resume_from_checkpoint=true"])
    resumed = jobs.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(working_dir)})
    assert wait_for_job(jobs, resumed, {JobStatus.SUCCEEDED}) == JobStatus.SUCCEEDED, jobs.get_job_logs(resumed)
    reference_dir = tmp_path / "uninterrupted"
    assert raytrainer_cli(["train", str(working_dir / "job.yaml"), "--set", f"output_dir={reference_dir}", *common,
                           "--set", f"max_steps={last_step + 4}"]) == 0
    ours, theirs = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=lambda text: f"{name}: {text}")

    final = assert_complete_checkpoint(checkpoints(output_dir)[last_step + 4], last_step + 4)
    logged_steps = [entry["step"] for entry in final["log_history"] if "loss" in entry]
    assert logged_steps[:last_step] == list(range(1, last_step + 1))  # the history before the stop is kept
    assert logged_steps[-4:] == list(range(last_step + 1, last_step + 5))
    assert any("eval_loss" in entry for entry in final["log_history"])
    metrics = json.loads((output_dir / "train_results.json").read_text())
    assert metrics["train_loss"] > 0 and "train_runtime" in metrics
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()

    logs = re.sub(r"\x1b\[[0-9;]*m", "", head.ray("job", "logs", resumed).stdout)  # without terminal colours
    (tmp_path / "resumed-job.log").write_text(logs)
    assert f"raytrainer: trained {last_step + 4} steps" in logs
    # It trained the 4 steps after the stop only (logging_steps=1: a loss line a step); a run from scratch, whose
    # weights would equal the uninterrupted run's too, trains them all.
    assert logs.count("{'loss': ") == 4, logs[-3000:]
    reference_state = json.loads((checkpoints(reference_dir)[last_step + 4] / "trainer_state.json").read_text())
    assert [entry["step"] for entry in reference_state["log_history"] if "loss" in entry] == \
        list(range(1, last_step + 5))  # the reference trained every step
    assert re.search(r"\(RayTrainWorker pid=\d+[^)]*\) \[rank [01]\] ", logs), "worker lines need rank prefixes"
    assert "[raytrainer] train step" in logs, "progress must become log lines outside a terminal"
    assert "\r" not in logs, "no terminal progress bars in job logs"


def driver_report(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("DRIVER "))
    return json.loads(line[len("DRIVER "):])


def test_driver_inside_a_job_uses_the_job_cluster(head):
    from ray.job_submission import JobStatus

    jobs = client(head)
    job_id = jobs.submit_job(entrypoint=f"python -c '{DRIVER}'")
    assert wait_for_job(jobs, job_id, {JobStatus.SUCCEEDED}) == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)
    report = driver_report(jobs.get_job_logs(job_id))
    assert report["gcs_address"].endswith(f":{head.gcs_address.rsplit(':', 1)[1]}")  # the host may be the node IP
    assert report["session_dir"].startswith(str(head.root))
    sessions = [p for p in (head.root / "ray").glob("session_*") if p.name != "session_latest"]
    assert len(sessions) == 1, f"a second Ray was started: {sessions}"


def test_driver_with_ray_address_connects_to_that_cluster(head):
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    result = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = driver_report(result.stdout)
    assert report["gcs_address"].endswith(f":{head.gcs_address.rsplit(':', 1)[1]}")
    assert report["session_dir"].startswith(str(head.root))


def test_driver_without_ray_address_finds_the_ray_start_cluster(head):
    """No RAY_ADDRESS: the driver joins the cluster `ray start --head` recorded on this machine (its temp dir)."""
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(head.root)  # where `ray start --temp-dir` wrote its record (ray/ray_current_cluster)
    assert (head.root / "ray" / "ray_current_cluster").is_file()
    result = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = driver_report(result.stdout)
    assert report["gcs_address"].endswith(f":{head.gcs_address.rsplit(':', 1)[1]}")
    assert report["session_dir"].startswith(str(head.root))
    sessions = [p for p in (head.root / "ray").glob("session_*") if p.name != "session_latest"]
    assert len(sessions) == 1, f"a second Ray was started: {sessions}"


def test_driver_without_a_cluster_starts_an_embedded_local_ray():
    """No RAY_ADDRESS and no running cluster: the driver starts its own Ray and takes it down on exit."""
    private_tmp = tempfile.mkdtemp(prefix="rtdrv-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_TMPDIR"] = private_tmp  # where Ray looks for a running cluster and starts its own
    try:
        result = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        report = driver_report(result.stdout)
        assert report["session_dir"].startswith(private_tmp)
        import psutil

        leftovers = [p for p in psutil.process_iter(["cmdline"]) if private_tmp in " ".join(p.info["cmdline"] or ())]
        deadline = time.monotonic() + 30
        while leftovers and time.monotonic() < deadline:
            time.sleep(1)
            leftovers = [p for p in leftovers if p.is_running()]
        assert not leftovers, "the embedded Ray outlived its driver"
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


ADDRESS_DRIVER = """
import json, sys, time
import ray
from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments

def trainer(address=None):
    args = TrainingArguments(sys.argv[1], max_steps=1, report_to=[], ray_address=address)
    return Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(8))

report = {}
for name, address in json.loads(sys.argv[2]).items():
    start = time.monotonic()
    try:
        if name == "through_ray_client":
            # The user's own Ray Client connection; a Trainer must refuse to work through it. Ray Client's proxy
            # starts a server process per connection, which can fail to start on a loaded machine: try again.
            for attempt in range(3):
                try:
                    ray.init(address)
                    break
                except ConnectionError as exc:
                    report.setdefault("ray_client_connect_errors", []).append(repr(exc))
            start = time.monotonic()
            address = None
        trainer(address)
        error = None
    except Exception as exc:
        error = exc
    report[name] = {"seconds": round(time.monotonic() - start, 3), "type": type(error).__name__,
                    "message": str(error), "ray_started": ray.is_initialized() and name != "through_ray_client"}
print("DRIVER " + json.dumps(report), flush=True)
"""


def run_address_cases(head, tmp_path, cases: dict, env: dict) -> dict:
    env = {**{k: v for k, v in env.items() if k != "RAY_ADDRESS"}, "RAYTRAINER_START_EARLY": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    result = subprocess.run([sys.executable, "-c", ADDRESS_DRIVER, str(tmp_path / "out"), json.dumps(cases)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = driver_report(result.stdout)
    if connect_errors := report.pop("ray_client_connect_errors", None):
        print("Ray Client connection attempts that failed:", connect_errors)
        for log in sorted((head.root / "ray" / "session_latest" / "logs").glob("ray_client_server*.err")):
            print(f"--- {log.name}:", log.read_text()[-2000:])
    print(json.dumps({name: case["seconds"] for name, case in report.items()}))  # time to the error, per case
    for name, case in report.items():
        assert case["seconds"] < 1.5 and not case["ray_started"], (name, case)
    return report


def test_a_cluster_that_refuses_the_driver_says_why(head, tmp_path):
    """The head answers but refuses: a wrong token, no token; its dashboard's and Ray Client's ports are not its
    GCS address; Ray Client (ray://, or a connection the script opened itself) is refused with the alternative."""
    port_of = {option: head.process.args[head.process.args.index(option) + 1]
               for option in ("--dashboard-port", "--ray-client-server-port")}
    wrong = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    refused = run_address_cases(head, tmp_path, {"wrong_token": head.gcs_address},
                                {**wrong, "RAY_AUTH_TOKEN": "0" * 32})
    no_token = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    refused.update(run_address_cases(head, tmp_path, {"no_token": head.gcs_address},
                                     {**no_token, "HOME": str(tmp_path)}))
    for name in ("wrong_token", "no_token"):
        case = refused[name]
        assert case["type"] == "ConnectionError", case
        assert re.search(f"ray_address='{head.gcs_address}': the Ray cluster at {head.gcs_address} refused this "
                         "driver: its token authentication rejected this driver's token .*InvalidAuthToken.*"
                         "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=.*RAY_AUTH_TOKEN_PATH.*ray get-auth-token.*"
                         f"ray status --address {head.gcs_address}", case["message"]), case["message"]

    client = f"127.0.0.1:{port_of['--ray-client-server-port']}"
    others = run_address_cases(head, tmp_path, {
        "dashboard_port": f"127.0.0.1:{port_of['--dashboard-port']}", "client_port": client,
        "ray_client": f"ray://{client}", "dashboard_url": head.dashboard_url,
        "through_ray_client": f"ray://{client}"}, head.env)
    assert re.search(r"no Ray cluster answers at .*HTTP server answers", others["dashboard_port"]["message"])
    assert re.search(r"no Ray cluster answers at .*Ray Client's port", others["client_port"]["message"])
    assert re.search(f"ray_address='ray://{client}': Ray Client .*not supported.*ray job submit",
                     others["ray_client"]["message"])
    assert re.search(r"is a URL; .*GCS address.*ray job submit --address", others["dashboard_url"]["message"])
    assert re.search(r"connected to Ray through Ray Client.*not supported.*ray job submit",
                     others["through_ray_client"]["message"]), others["through_ray_client"]
