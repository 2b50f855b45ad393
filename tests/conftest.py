"""One Ray instance per test session (real local cluster), shared by every Ray test."""

import os
import sys

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_background_ray_start() -> None:
    """The session's Ray is started by the `ray_session` fixture; a Trainer built by a test before it (one that only
    checks arguments) must not start an embedded Ray in the background (`raytrainer.backend.early_start`). Scripts
    the tests run in subprocesses start theirs as users' scripts do."""
    from raytrainer.backend.early_start import never_start_early

    never_start_early()


_no_background_ray_start()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # A RAY_ADDRESS of the shell that runs the tests would name another cluster than the session's own, which
        # every Trainer of the suite refuses (tests that need it set it for their subprocesses).
        os.environ.pop("RAY_ADDRESS", None)
        # Ray Train's placement-group cleaner asks the State API whether a run's controller still lives, and frees
        # the workers' resources when it does not (e.g. trials Tune stopped). Point it at this session's own
        # dashboard, so that it never asks another Ray cluster on the machine (the job-submit tests' head). Only
        # Ray's processes get this setting: in this process it would redirect job-submission clients.
        for attempt in range(3):  # the dashboard port may be taken between choosing and binding it: choose again
            try:
                _start_session_ray(ray)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    yield ray
    ray.shutdown()


def _start_session_ray(ray) -> None:
    from helpers import free_port

    port = free_port()
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        # address="local": the session's own Ray even where a stale `ray start` record or RAY_ADDRESS names another.
        # num_gpus=0: on a GPU machine every test keeps its CPU (gloo) path; the GPU set (tests/test_gpu.py, run by
        # bench/gpu_check.sh) asks for GPUs with RAYTRAINER_TEST_GPUS.
        ray.init(address="local", num_cpus=8, num_gpus=int(os.environ.get("RAYTRAINER_TEST_GPUS", "0")),
                 logging_level="WARNING", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


@pytest.fixture(autouse=True, scope="module")
def release_warm_workers():
    """A module's Trainers release their warm worker groups when the module ends (CPUs for the next module); within
    a module, a new Trainer takes over an idle group of the same shape instead of starting one."""
    yield
    worker_group = sys.modules.get("raytrainer.backend.group")
    if worker_group is not None:
        worker_group.close_all_worker_groups()


class StartedRay(AssertionError):
    """Raised by `no_ray_start` / `no_worker_start` when the code under test starts what it must not."""


def _forbid(monkeypatch, owner, name: str, what: str) -> None:
    def refuse(*args, **kwargs):
        raise StartedRay(f"{what} was called: this check must fail before anything starts on Ray")

    monkeypatch.setattr(owner, name, refuse)


@pytest.fixture
def no_worker_start(monkeypatch):
    """Makes starting or calling any worker group, Tune search or iterative actor raise `StartedRay` for one test:
    a test of an error raised "before any worker starts" then fails if the code got as far as the workers, whether
    or not an earlier test left Ray (or an idle group) running."""
    import ray.tune

    from raytrainer.backend.group import WorkerGroup
    from raytrainer.iterative.trainer import IterativeSFTTrainer

    _forbid(monkeypatch, WorkerGroup, "start", "WorkerGroup.start")
    _forbid(monkeypatch, WorkerGroup, "run", "WorkerGroup.run")  # an idle group taken over from an earlier test
    _forbid(monkeypatch, ray.tune, "run", "ray.tune.run")
    _forbid(monkeypatch, IterativeSFTTrainer, "_start", "IterativeSFTTrainer._start")


@pytest.fixture
def no_ray_start(no_worker_start, monkeypatch):
    """`no_worker_start`, and connecting to or starting Ray raises too (ray.init and raytrainer's ensure_ray)."""
    import ray

    from raytrainer.backend import cluster, session
    from raytrainer.iterative import trainer

    _forbid(monkeypatch, ray, "init", "ray.init")
    for module in (cluster, session, trainer):
        _forbid(monkeypatch, module, "ensure_ray", "ensure_ray")
