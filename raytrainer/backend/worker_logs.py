"""Worker output as it reaches `ray job logs`: each line tagged with the worker's rank, no progress bars.

Ray prefixes worker lines with `(RayTrainWorker pid=...)`, which does not say which rank spoke. Workers
never write to a terminal, so redrawn progress bars would only fill the log with carriage returns.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import TextIO


class RankPrefixedStream(io.TextIOBase):
    """A text stream that writes to `stream`, starting every line with `prefix`."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix = stream, prefix
        self.at_line_start = True
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            pieces = []
            for line in text.splitlines(keepends=True):
                if self.at_line_start:
                    pieces.append(self.prefix)
                pieces.append(line)
                self.at_line_start = line.endswith(("\n", "\r"))
            self.stream.write("".join(pieces))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


# Ray Train logs every report at INFO ("Reporting training result N: TrainingReport(...)", one console line per
# evaluation and checkpoint) from this module's `logger` (its only INFO log); the driver already prints the metrics,
# in transformers' format.
RAY_TRAIN_REPORTING_MODULE = "ray.train.v2._internal.execution.context"


def tag_worker_output(rank: int) -> None:
    """Prefix this worker process's stdout/stderr lines with `[rank N]`; turn off HF progress bars and Ray Train's
    line per report."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    report_logger = getattr(sys.modules.get(RAY_TRAIN_REPORTING_MODULE), "logger", None)  # loaded in a Train worker
    if isinstance(report_logger, logging.Logger):
        report_logger.setLevel(logging.WARNING)
    tagged_by_fd = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RankPrefixedStream):  # a worker process reused for another command
            stream = stream.stream
        tagged = RankPrefixedStream(stream, f"[rank {rank}] ")
        setattr(sys, name, tagged)
        tagged_by_fd[_identity(stream)] = tagged
    # Logging handlers made at import (transformers', Ray's) hold an untagged stream: retarget them.
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler:  # not FileHandler; _StderrHandler follows sys.stderr
                stream = handler.stream
                if isinstance(stream, RankPrefixedStream):
                    stream = stream.stream
                tagged = tagged_by_fd.get(_identity(stream))
                if tagged is not None:
                    handler.setStream(tagged)


def _identity(stream) -> tuple:
    """Streams on the same file descriptor are the same output (Ray wraps fd 1 and 2 more than once)."""
    try:
        return ("fd", stream.fileno())
    except (AttributeError, OSError, ValueError):
        return ("object", id(stream))
