"""One Ray instance per test session (real local cluster), shared by every Ray test."""

import gc
import os
import sys
import weakref

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


def pytest_collection_finish(session):
    """Out of the garbage collector's walk: what importing the test modules created (torch, transformers, TRL,
    Ray: ~1 M objects, all alive until the session ends). A full collection runs after every test (below), to hand
    the test's dropped Trainers' groups over, and walked them all each time: 0.4 s a test. Objects created later,
    by the tests, are still collected."""
    gc.collect()
    gc.freeze()


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
    warm_group_pool.close_all()
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


class WarmGroupPool:
    """The test session's idle warm worker groups, kept between tests.

    A Trainer's group is released when the Trainer is garbage-collected, so every test would start its own (Ray
    Train's controller, placement group and worker processes: seconds each, most of the suite's time). In the test
    session the pool keeps such a group instead, and the next Trainer of the same worker layout takes it over as it
    takes over another live Trainer's idle group (`raytrainer.backend.session._take_idle_group`). A test that
    checks when groups start or end is marked `own_worker_group`: the pool is emptied before it, and its dropped
    Trainers release their groups as they do outside the tests.

    Not kept: groups whose layout allows failures (Ray Train counts a group's restarts over its whole life, so a
    fault test's group could not serve another one), groups no other test asks for (a `storage_path` under the
    test's own temporary folder, resources other than CPUs), and more than `max_cpus` CPUs of groups (least
    recently used go first): Tune trials and the iterative actors need the session's CPUs too.
    """

    def __init__(self, max_cpus: float = 4):
        self.groups: list = []  # strong references: their Trainers are gone
        self.max_cpus = max_cpus
        self.closing_for_real = False  # inside an `own_worker_group` test

    def install(self) -> None:
        """Route the release of a garbage-collected Trainer's group (`session._close_later`) through the pool."""
        from raytrainer.backend import session

        release = session._close_later

        def keep_or_release(group) -> None:  # runs inside garbage collection: no Ray calls here
            from raytrainer.backend.group import WorkerGroup

            owner = session._owners.get(group)
            if (self.closing_for_real or not isinstance(group, WorkerGroup) or owner is None or group.busy
                    or not group.alive or group.spec.max_failures != 0 or group.spec.storage_path is not None
                    or set(group.spec.total()) - {"CPU"}):
                release(group)
                return
            session._owners[group] = (weakref.ref(self), owner[1])
            self.groups.append(group)

        session._close_later = keep_or_release

    def _give_up(self, group) -> None:
        """Called by `_take_idle_group` when a Trainer takes `group` over."""
        if group in self.groups:
            self.groups.remove(group)

    def trim(self) -> None:
        """One group per layout, within `max_cpus`, the most recently used kept."""
        from raytrainer.backend import session

        kept, keys = [], set()
        for group in sorted(self.groups, key=lambda group: group.last_used, reverse=True):
            key = session._owners.get(group, (None, None))[1]
            cpus = sum(g.spec.total().get("CPU", 0) for g in kept) + group.spec.total().get("CPU", 0)
            if group.alive and key is not None and key not in keys and cpus <= self.max_cpus:
                kept.append(group)
                keys.add(key)
            else:
                self._close(group)
        self.groups = kept

    def close_all(self) -> None:
        for group in list(self.groups):
            self._close(group)
        self.groups = []

    @staticmethod
    def _close(group) -> None:
        from raytrainer.backend import session

        session._owners.pop(group, None)
        group.close()


warm_group_pool = WarmGroupPool()
warm_group_pool.install()


@pytest.fixture(autouse=True)
def keep_idle_groups_warm(request):
    """See `WarmGroupPool`."""
    own_group = request.node.get_closest_marker("own_worker_group") is not None
    if own_group:
        warm_group_pool.close_all()
    warm_group_pool.closing_for_real = own_group
    yield
    gc.collect()  # the test's dropped Trainers hand their groups over now, not inside the next test
    warm_group_pool.closing_for_real = False
    warm_group_pool.trim()


@pytest.fixture(autouse=True, scope="module")
def release_warm_workers():
    """The groups a module's Trainers still hold when the module ends (module-level Trainers) are released; the
    pool's idle groups stay for the next module."""
    yield
    worker_group = sys.modules.get("raytrainer.backend.group")
    if worker_group is not None:
        pooled = set(warm_group_pool.groups)
        for group in list(worker_group._live_groups):
            if group not in pooled:
                group.close()


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
