"""One Ray instance per test session (real local cluster), shared by every Ray test."""

import os
import socket
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # Ray Train's placement-group cleaner asks the State API whether a run's controller still lives, and frees
        # the workers' resources when it does not (e.g. trials Tune stopped). Point it at this session's own
        # dashboard, so that it never asks another Ray cluster on the machine (the job-submit tests' head). Only
        # Ray's processes get this setting: in this process it would redirect job-submission clients.
        port = _free_port()
        previous = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            # num_gpus=0: on a GPU machine every test keeps its CPU (gloo) path; the GPU set (tests/test_gpu.py,
            # run by bench/gpu_check.sh) asks for GPUs with RAYTRAINER_TEST_GPUS.
            ray.init(num_cpus=8, num_gpus=int(os.environ.get("RAYTRAINER_TEST_GPUS", "0")), logging_level="WARNING", include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port)
        finally:
            if previous is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = previous
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def release_warm_workers():
    """A module's Trainers release their warm worker groups when the module ends (CPUs for the next module); within
    a module, a new Trainer takes over an idle group of the same shape instead of starting one."""
    yield
    worker_group = sys.modules.get("raytrainer.backend.group")
    if worker_group is not None:
        worker_group.close_all_worker_groups()
