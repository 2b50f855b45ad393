"""Ray's part of a script's first call, started while the driver does its own.

Connecting to Ray (or starting the embedded one) and starting a Ray Train worker group take seconds; the driver's
checks, its datasets' trip into the object store, the model's serialization and the user's own code between
`Trainer(...)` and `train()` take seconds too. So the first Trainer of a driver process that can train (it has a
train or eval dataset) starts both in a background thread at construction; its first call takes the group if
the arguments still need that layout, and any call waits for the start to finish first. Nothing else changes: a
driver-side error stops the unused group before any worker is used, a Trainer dropped before its first call
closes it, and the driver's exit waits for the start before it releases the workers and Ray.

Only the first Trainer of a process, and only while this process is not connected to Ray yet: a script's later
Trainers, test suites, search trials and workers (which all run with Ray already connected) start their groups
at their first call as before, so which warm group a call takes over is unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any, Callable

OPT_OUT_VARIABLE = "RAYTRAINER_START_EARLY"  # "0": start Ray and the workers at the first call, as transformers would

_first = {"taken": False}
_lock = threading.Lock()


def starts_early(*, can_train: bool, in_worker: bool, ray_connected: bool, already_taken: bool,
                 setting: str | None) -> bool:
    """Whether a new Trainer starts Ray and its workers in the background (decided, not acted on)."""
    return can_train and not in_worker and not ray_connected and not already_taken and setting != "0"


def take_first_start(can_train: bool) -> bool:
    """Decide for a Trainer built now, and claim the process's one early start when it gets it."""
    import ray

    from raytrainer.backend.role import in_worker

    with _lock:
        decision = starts_early(can_train=can_train, in_worker=in_worker(), ray_connected=ray.is_initialized(),
                                already_taken=_first["taken"], setting=os.environ.get(OPT_OUT_VARIABLE))
        if decision:
            _first["taken"] = True
        return decision


def never_start_early() -> None:
    """No Trainer of this process starts Ray in the background (a test session starts its own Ray in a fixture,
    which a Trainer built before it must not race)."""
    with _lock:
        _first["taken"] = True


class EarlyStart:
    """A background thread that connects to Ray and starts the worker group `start_group` builds.

    `start_group(args)` runs in the thread once Ray is up and returns the started group (or None); `wait()`
    returns it on the caller's thread, raising what the start raised (the same error the call would have met).

    The thread never ends before the process: Ray starts its processes (GCS, raylet) with a parent-death signal,
    which Linux sends when the *thread* that started them exits, so the embedded Ray lives as long as its thread.
    """

    def __init__(self, args: Any, connect: Callable[[Any], None], start_group: Callable[[Any], Any]):
        self.group: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._connect, self._start_group = connect, start_group
        _keep_sigterm_exit()
        self.thread = threading.Thread(target=self._run, args=(args,), name="raytrainer-early-start", daemon=True)
        self.thread.start()
        atexit.register(self._at_exit)  # registered after group's and cluster's hooks: runs before them

    def _run(self, args: Any) -> None:
        connect, start_group, self._connect, self._start_group = self._connect, self._start_group, None, None
        try:
            with _quiet_thread_warning():
                connect(args)
            if not self.cancelled:
                self.group = start_group(args)
            if self.cancelled and self.group is not None:  # dropped or closed meanwhile
                self.group.close()
                self.group = None
        except BaseException as error:  # noqa: BLE001 - handed to the caller by wait()
            self.error = error
        finally:
            self.done.set()
        del args, connect, start_group
        _process_end.wait()  # keeps the Ray processes this thread started alive (see the class docstring)

    def wait(self) -> Any:
        """The started group (None when none was started); raises the start's error."""
        self.done.wait()
        atexit.unregister(self._at_exit)
        if self.error is not None:
            error, self.error = self.error, None
            if not isinstance(error, Exception):  # SystemExit, KeyboardInterrupt in the thread: not the caller's
                raise RuntimeError(f"Starting Ray in the background was interrupted: {error!r}") from error
            raise error
        group, self.group = self.group, None
        return group

    def cancel(self) -> None:
        """Stop what was started (waits for a Ray start in progress, then closes the group)."""
        self.cancelled = True
        try:
            group = self.wait()
        except BaseException:  # noqa: BLE001 - the start failed: nothing to stop
            return
        if group is not None:
            group.close()

    close = cancel  # what the session's closing thread calls for a garbage-collected Trainer's start

    def _at_exit(self) -> None:
        self.cancelled = True
        self.done.wait(timeout=300)


_process_end = threading.Event()  # never set: the background start's thread lives as long as the process


class _ThreadWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class _quiet_thread_warning:
    """ray.init() warns that it cannot install its SIGTERM handler outside the main thread: the main thread
    installed the same handler already (`_keep_sigterm_exit`)."""

    def __enter__(self):
        self.logger, self.filter = logging.getLogger("ray._private.worker"), _ThreadWarningFilter()
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc_info):
        self.logger.removeFilter(self.filter)


def _keep_sigterm_exit() -> None:
    """What ray.init() does on the main thread: SIGTERM exits through the exit hooks (workers and Ray released)."""
    import signal

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
