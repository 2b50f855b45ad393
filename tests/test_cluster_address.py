"""A cluster address that cannot work fails in seconds with an error that names it, where it came from, what was
tried and what to check: one that does not answer, something that is not a Ray cluster, Ray Client's ray://, a
malformed one, `auto` with nothing to find, and any form naming another cluster than the connected one. (A real
cluster that refuses this driver's token: tests/test_job_submit.py, which has a token-authenticated head.)"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import ray

from helpers import RegressionModel, regression_dataset
from raytrainer import Trainer, TrainingArguments
from raytrainer.backend.cluster import ensure_ray
from raytrainer.backend.cluster_address import (ClusterAddress, classify_rpc_error, compare_ray_versions,
                                                connection_error, named_cluster)

TESTS = Path(__file__).resolve().parent


def dead_address() -> str:
    """A loopback port nothing listens on (a typo in a port does this)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_the_probes_gRPC_status_says_what_answered():
    assert classify_rpc_error("UNAUTHENTICATED", "InvalidAuthToken: missing or incorrect").outcome == "refused"
    assert classify_rpc_error("DEADLINE_EXCEEDED", "Deadline Exceeded").outcome == "silent"
    assert classify_rpc_error("UNAVAILABLE", "failed to connect to all addresses; Connection refused").outcome \
        == "silent"
    http = classify_rpc_error("UNAVAILABLE", "Trying to connect an http1.x server (HTTP status 400)")
    assert http.outcome == "not_ray" and "HTTP server" in http.detail
    client = classify_rpc_error("UNIMPLEMENTED", "Method not found!")
    assert client.outcome == "not_ray" and "Ray Client's port" in client.detail
    assert compare_ray_versions("2.60.0", "2.60.0").outcome == "answers"
    older = compare_ray_versions("2.59.0", "2.60.0")  # an incompatible Ray: said so, with the fix
    message = str(connection_error(ClusterAddress("10.0.0.5:6379", "ray_address='10.0.0.5:6379'"), older))
    assert older.outcome == "refused" and message.startswith(
        "ray_address='10.0.0.5:6379': the Ray cluster at 10.0.0.5:6379 refused this driver: the cluster runs Ray "
        "2.59.0 and this driver Ray 2.60.0; a driver must run the cluster's Ray version (pip install ray==2.59.0)")


def test_addresses_a_driver_cannot_use_are_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` record
    with pytest.raises(ValueError, match=r"ray_address='ray://h:10001': Ray Client.*not supported.*ray job submit"):
        named_cluster("ray://h:10001")
    with pytest.raises(ValueError, match=r"ray_address='http://h:8265' is a URL.*GCS address.*ray job submit"):
        named_cluster("http://h:8265")
    with pytest.raises(ValueError, match=r"ray_address='h6379' is not a Ray cluster address.*host:port"):
        named_cluster("h6379")
    monkeypatch.setenv("RAY_ADDRESS", "ray://h:10001")
    with pytest.raises(ValueError, match=r"environment variable RAY_ADDRESS='ray://h:10001': Ray Client"):
        named_cluster(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert named_cluster(None).source == "the environment variable RAY_ADDRESS='10.0.0.5:6379'"
    assert named_cluster("auto").address == "10.0.0.5:6379"  # as ray.init: "auto" takes RAY_ADDRESS first
    assert named_cluster("10.0.0.6:6379").address == "10.0.0.6:6379"  # the argument wins over RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    assert named_cluster(None) is None and named_cluster("auto").address == "auto"  # nothing to find
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.7:6379")
    recorded = named_cluster("auto")
    assert recorded.address == "10.0.0.7:6379" and recorded.recorded and recorded.named
    assert "ray_address='auto', which found Ray's record of a `ray start` cluster" in recorded.source


@pytest.mark.usefixtures("ray_session")
def test_every_form_of_another_cluster_than_the_connected_one_is_refused_at_construction(monkeypatch, tmp_path,
                                                                                        no_worker_start):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` record for `auto` to find
    current = ray.get_runtime_context().gcs_address
    for same in (current, "127.0.0.1:" + current.rsplit(":", 1)[1], "auto", "local", None):
        ensure_ray(same)
    monkeypatch.setenv("RAY_ADDRESS", current)
    ensure_ray(None)
    ensure_ray("auto")

    def build(ray_address=None):
        args = TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to=[], ray_address=ray_address)
        return Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(8))

    other = dead_address()
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match=f"ray_address='{other}' names another Ray cluster than the one this "
                                         f"process is already connected to \\({current}\\).*ray.shutdown"):
        build(other)
    with pytest.raises(ValueError, match="ray_address='ray://127.0.0.1:1': Ray Client.*ray job submit"):
        build("ray://127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", other)
    with pytest.raises(ValueError, match=f"environment variable RAY_ADDRESS='{other}' names another Ray cluster"):
        build()
    with pytest.raises(ValueError, match=f"ray_address='auto' with the environment variable RAY_ADDRESS='{other}' "
                                         "names another"):
        build("auto")
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")
    with pytest.raises(ValueError, match="RAY_ADDRESS='ray://127.0.0.1:1': Ray Client"):
        build()
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match=f"ray_address='{other}' names another"):
        ensure_ray(other)  # what train() calls: a Trainer built before the connection is refused there


DRIVER = textwrap.dedent("""
    import json, socket, sys, threading, time, http.server, os
    sys.path.insert(0, {tests!r})
    import ray
    from helpers import RegressionModel, regression_dataset
    from raytrainer import Trainer, TrainingArguments
    from raytrainer.backend.cluster import ensure_ray

    def port_of(server):
        return "127.0.0.1:%d" % server.getsockname()[1]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = port_of(probe)
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # a dashboard-like port
    threading.Thread(target=web.serve_forever, daemon=True).start()
    record = os.path.join(os.environ["RAY_TMPDIR"], "ray", "ray_current_cluster")

    def trainer(address):
        args = TrainingArguments({out!r}, max_steps=1, report_to=[], ray_address=address)
        return Trainer(model=RegressionModel(), args=args, train_dataset=regression_dataset(8))

    def case(name, build, address=None, env=None, record_names=None):
        if env is not None:
            os.environ["RAY_ADDRESS"] = env
        if record_names is not None:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            open(record, "w").write(record_names)
        start = time.monotonic()
        try:
            build(address)
            error = None
        except Exception as exc:
            error = exc
        report[name] = {{"seconds": round(time.monotonic() - start, 3), "type": type(error).__name__,
                        "message": str(error), "address": record_names or address or env,
                        "ray_started": ray.is_initialized()}}
        os.environ.pop("RAY_ADDRESS", None)
        if os.path.exists(record):
            os.remove(record)

    report = {{}}
    # warm the imports (transformers' Trainer, grpc) so that the cases time the checks alone; no dataset: no Ray
    Trainer(model=RegressionModel(), args=TrainingArguments({out!r}, report_to=[]))
    import grpc, ray._private.grpc_utils
    case("argument", trainer, dead)
    case("environment", trainer, env=dead)
    case("ensure_ray", ensure_ray, dead)  # what train() (and IterativeSFTTrainer's start) call
    case("silent", trainer, port_of(silent))
    case("http", trainer, port_of(web.socket))
    case("ray_client", trainer, "ray://127.0.0.1:1")
    case("auto_nothing", trainer, "auto")
    case("auto_stale_record", trainer, "auto", record_names=dead)
    case("no_port", trainer, "127.0.0.1")
    print("DRIVER " + json.dumps(report), flush=True)
""")


def test_an_address_that_does_not_answer_fails_in_seconds_before_ray_starts(tmp_path):
    """In a fresh driver (not connected to Ray): each address form that cannot work raises at the Trainer's
    construction within seconds, naming the address, where it came from and what to check; nothing starts."""
    private_tmp = tempfile.mkdtemp(prefix="rtaddr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=private_tmp, PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]))
    script = DRIVER.format(tests=str(TESTS), out=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("DRIVER "))
    report = json.loads(line[len("DRIVER "):])
    print(json.dumps({name: case["seconds"] for name, case in report.items()}))  # time to the error, per case
    for name, case in report.items():
        assert not case["ray_started"], f"{name}: Ray was started"
        assert case["seconds"] < (4 if name == "silent" else 1.5), (name, case)
    check = "ray status --address {0}`.*6379.*RAY_AUTH_TOKEN"
    for name, source in (("argument", "ray_address='{0}'"), ("environment", "environment variable RAY_ADDRESS='{0}'"),
                         ("ensure_ray", "ray_address='{0}'")):
        case = report[name]
        assert case["type"] == "ConnectionError", case
        assert_matches(case, f"{source}: nothing answers at {{0}} \\(asked its GCS.*Connection refused.*{check}")
    assert_matches(report["silent"], r"nothing answers at {0} .*no answer within 2 s\)")
    assert_matches(report["http"], r"no Ray cluster answers at {0} .*HTTP server answers.*not the dashboard's 8265")
    assert report["ray_client"]["type"] == "ValueError"
    assert_matches(report["ray_client"], r"ray_address='{0}': Ray Client .*not supported.*ray job submit")
    assert_matches(report["auto_nothing"], r"ray_address='auto': found no running Ray cluster.*ray start --head")
    stale = report["auto_stale_record"]  # asked for by `auto`: a stale record is an error, not an embedded Ray
    assert stale["type"] == "ConnectionError"
    assert_matches(stale, r"ray_address='auto', which found Ray's record.*nothing answers at {0}")
    assert_matches(report["no_port"], r"ray_address='{0}' is not a Ray cluster address.*host:port")


def assert_matches(case: dict, pattern: str) -> None:
    import re

    pattern = pattern.format(re.escape(case["address"]))
    assert re.search(pattern, case["message"], re.S), (pattern, case["message"])
