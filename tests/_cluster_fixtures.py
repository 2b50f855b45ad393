"""A real local Ray head for job-submission tests, isolated from any other Ray on the machine.

The head gets its own temp dir, free ports and auth token (token authentication on, dashboard on
127.0.0.1). It is stopped by signalling only the processes it started — never `ray stop`, which
would kill every Ray instance on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers import free_ports, processes_of, stop_processes_of

# `ray` beside this Python (a virtualenv), else the one on PATH (wheels installed with `pip --target`, as
# bench/gpu_check.sh does on the GPU machine).
_BESIDE = Path(sys.executable).with_name("ray")
RAY = str(_BESIDE) if _BESIDE.exists() else shutil.which("ray") or str(_BESIDE)
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
                "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port", "--metrics-export-port")


@dataclass
class LocalRayHead:
    """A `ray start --head --block` process and how to reach it."""

    root: Path
    process: subprocess.Popen
    gcs_address: str
    dashboard_url: str
    token: str
    env: dict[str, str]  # for ray CLI commands: token auth on, RAY_ADDRESS = the dashboard

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def ray(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this head."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def owned_processes(self) -> list[psutil.Process]:
        """Every live process of this head (see `helpers.processes_of`)."""
        return processes_of(self.process.pid, str(self.root))

    def stop(self) -> None:
        """SIGTERM this head's processes, SIGKILL what is left after a second, remove its files. (Given longer, the
        raylet takes 10 s to exit and the GCS does not exit at all: nothing of a test's head is kept.)"""
        stop_processes_of(self.process.pid, str(self.root), grace_s=1)
        self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_local_ray_head(num_cpus: int = 4, timeout: float = 180, attempts: int = 3, num_gpus: int = 0) -> LocalRayHead:
    """Start a token-authenticated Ray head with a private temp dir and free ports; wait until jobs can run.

    On a busy machine another program can take one of the chosen ports before Ray binds it (Ray then
    exits); the head is started again with fresh ports, up to `attempts` times.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start_local_ray_head(num_cpus, timeout, num_gpus)
        except RuntimeError as error:
            if attempt == attempts:
                raise
            print(f"Ray head start {attempt} failed, retrying with fresh ports: {error}", file=sys.stderr)


def _start_local_ray_head(num_cpus: int, timeout: float, num_gpus: int = 0) -> LocalRayHead:
    # A short path: Ray's unix sockets live under it and must stay below ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="rtjob-", dir="/tmp"))
    # `ray get-auth-token --generate` writes ~/.ray/auth_token; a private HOME keeps the token to this head.
    subprocess.run([RAY, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(root)},
                   capture_output=True, text=True, check=True, timeout=120)
    token_path = root / ".ray" / "auth_token"
    token = token_path.read_text().strip()
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
    dashboard_url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "RAY_ADDRESS": dashboard_url, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           # jobs run `raytrainer`/`python` from this virtualenv, as they would from a cluster's image
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_AUTH_TOKEN", None)
    head_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    command = [RAY, "start", "--head", "--block", "--temp-dir", str(root / "ray"), "--num-cpus", str(num_cpus),
               "--num-gpus", str(num_gpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    for option, port in ports.items():
        command += [option, str(port)]
    log = open(root / "ray-start.log", "w")
    process = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalRayHead(root=root, process=process, gcs_address=f"127.0.0.1:{ports['--port']}",
                        dashboard_url=dashboard_url, token=token, env=env)
    try:
        _wait_for_job_server(head, timeout)
        # Jobs with a runtime env (working_dir) need the node's agents, which start after the job server.
        _wait_for_listeners(head, [ports["--runtime-env-agent-port"], ports["--dashboard-agent-listen-port"]],
                            timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_job_server(head: LocalRayHead, timeout: float) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n"
                               + (head.root / "ray-start.log").read_text()[-4000:])
        try:
            JobSubmissionClient(head.dashboard_url, headers=head.auth_headers).list_jobs()
            return
        except Exception as exc:  # the dashboard is still starting
            error = exc
            time.sleep(1)
    raise TimeoutError(f"the job server at {head.dashboard_url} did not come up in {timeout}s: {error}\n"
                       + (head.root / "ray-start.log").read_text()[-4000:])


def _wait_for_listeners(head: LocalRayHead, ports: list[int], timeout: float) -> None:
    """Wait until something listens on each of `ports` (the head's agents start after its job server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN"}
        if all(port in listening for port in ports):
            return
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n"
                               + (head.root / "ray-start.log").read_text()[-3000:])
        time.sleep(1)
    raise TimeoutError(f"the Ray head's agents did not listen on {ports} within {timeout}s")


def wait_for_job(client, job_id: str, statuses: set, timeout: float = 300) -> str:
    """Poll a job until its status is one of `statuses` (JobStatus values); return the status."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in statuses or (status.is_terminal() and JobStatus(status) not in statuses):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {status} after {timeout}s; logs:\n{client.get_job_logs(job_id)[-4000:]}")


EXAMPLE_JOB = Path(__file__).resolve().parents[1] / "examples" / "job_submit"


def example_job_folder(parent: Path, train_examples: int = 96) -> Path:
    """A copy of examples/job_submit with its data and tokenizer prepared, as a user would submit it."""
    folder = parent / "job_submit"
    shutil.copytree(EXAMPLE_JOB, folder, ignore=shutil.ignore_patterns("data", "tokenizer", "__pycache__"))
    subprocess.run([sys.executable, str(folder / "prepare_data.py"), "--out", str(folder), "--train-examples",
                    str(train_examples)], check=True, capture_output=True)
    return folder
