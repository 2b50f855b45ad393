"""One Ray instance per test session (real local cluster), shared by every Ray test."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # Ray Train's placement-group cleaner must not ask another Ray cluster on this machine (e.g. the job-submit
        # tests' head) about our controller. Only Ray's own processes get this setting: in this process it would
        # also redirect job-submission clients.
        previous = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"
        try:
            ray.init(num_cpus=8, logging_level="WARNING", include_dashboard=False)
        finally:
            if previous is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = previous
    yield ray
    ray.shutdown()
