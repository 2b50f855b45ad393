"""Worker output lines carry the worker's rank."""

import io
import logging
import sys

import pytest

from raytrainer.backend.worker_logs import RankPrefixedStream, tag_worker_output

pytestmark = pytest.mark.quick  # pure logic: part of `make test-quick`


def test_every_line_gets_the_rank_prefix_once():
    target = io.StringIO()
    stream = RankPrefixedStream(target, "[rank 1] ")
    stream.write("loss 1.0\nloss")
    stream.write(" 0.5\n")
    stream.write("a\nb\n")
    assert target.getvalue() == "[rank 1] loss 1.0\n[rank 1] loss 0.5\n[rank 1] a\n[rank 1] b\n"
    assert not stream.isatty()


def test_tag_worker_output_wraps_stdout_and_stderr_once(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    import datasets
    import transformers
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(logging.INFO)
    try:
        tag_worker_output(0)
        tag_worker_output(3)  # a reused worker process: re-tagged, not prefixed twice
        print("hello")
        print("oops", file=sys.stderr)
        handler = logging.StreamHandler(err)  # made before tagging, like transformers' own handler
        logger = logging.getLogger("raytrainer.test_worker_logs")
        logger.addHandler(handler)
        tag_worker_output(3)
        logger.warning("careful")
        logger.removeHandler(handler)
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not train_context.logger.isEnabledFor(logging.INFO)  # no line per Ray Train report
    finally:  # this test process is not a worker: give its progress bars and loggers back
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        train_context.logger.setLevel(logging.NOTSET)
    assert out.getvalue() == "[rank 3] hello\n" and err.getvalue() == "[rank 3] oops\n[rank 3] careful\n"
