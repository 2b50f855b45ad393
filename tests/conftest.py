"""One Ray instance per test session (real local cluster), shared by every Ray test."""

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Ray Train's placement-group cleaner must not ask another Ray cluster on this machine about our controller.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    if not ray.is_initialized():
        ray.init(num_cpus=8, logging_level="WARNING", include_dashboard=False)
    yield ray
    ray.shutdown()
