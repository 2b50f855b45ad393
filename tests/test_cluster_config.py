"""cluster.yaml and cluster-local.yaml pass Ray's own cluster-config validation and are secure by default."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.quick  # pure logic: part of `make test-quick`

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-local.yaml"]
DOCS = ["cluster.yaml", "cluster-local.yaml", "README.md", "docs/cluster.md", "examples/job_submit/README.md"]


def prepared(name: str) -> dict:
    """What `ray up` does before launching anything: merge the provider defaults, then validate."""
    config = prepare_config(yaml.safe_load((ROOT / name).read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_ray_validation(name):
    config = prepared(name)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in command and "raytrainer" in command for command in config["setup_commands"])


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_validation_rejects_a_broken_copy(name):
    """The validation is real: a misspelt key fails it."""
    broken = copy.deepcopy(yaml.safe_load((ROOT / name).read_text()))
    broken["max_worker"] = broken.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cloud_config_autoscales_gpu_workers_with_shared_storage():
    config = prepared("cluster.yaml")
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    gpu_workers = config["available_node_types"]["ray.worker.gpu"]
    assert gpu_workers["resources"]["GPU"] >= 1
    assert gpu_workers["min_workers"] < gpu_workers["max_workers"] <= config["max_workers"]
    assert config["docker"]["image"].startswith("rayproject/ray:") and config["docker"]["image"].endswith("gpu")
    assert any("mount" in command for command in config["initialization_commands"])
    assert any("/mnt/cluster_storage" in option for option in config["docker"]["run_options"])
    # GPU nodes start at 0: the drivers must know the cluster grows, or a GPU job is refused as too big.
    assert any("RAYTRAINER_CLUSTER_AUTOSCALES=1" in c and "--head" in c for c in config["head_start_ray_commands"])


def test_local_config_uses_the_local_provider():
    config = prepared("cluster-local.yaml")
    assert config["provider"]["type"] == "local"
    assert set(config["available_node_types"]) == {"local.cluster.node"}  # filled in by Ray from the IPs


@pytest.mark.parametrize("name", CONFIGS)
def test_every_ray_start_uses_token_auth_and_a_private_dashboard(name):
    config = prepared(name)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in command for command in starts)
    head_start = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", DOCS)
def test_docs_never_expose_the_dashboard_without_token(name):
    text = (ROOT / name).read_text()
    for line in text.splitlines():
        if re.search(r"dashboard-host[ =]0\.0\.0\.0", line):
            assert "RAY_AUTH_MODE=token" in line, f"{name}: {line.strip()}"
    assert "RAY_AUTH_MODE=token" in text
    assert "ray get-auth-token --generate" in text
