"""What the driver prints: a bar on a terminal, periodic lines otherwise, transformers-style log dicts."""

import io

import pytest

from raytrainer.progress import DriverProgress, format_logs

pytestmark = pytest.mark.quick  # pure logic: part of `make test-quick`


class Terminal(io.StringIO):
    def isatty(self):
        return True


def feed(progress, max_steps=100):
    for step in range(1, max_steps + 1):
        progress(("progress", step, max_steps))
        if step % 25 == 0:
            progress(("log", {"loss": 1.0 / step, "learning_rate": 0.001, "epoch": step / 50, "step": step}))
    progress.close()


def test_not_a_terminal_gives_periodic_lines_and_logs():
    stream = io.StringIO()
    feed(DriverProgress(disable_tqdm=False, stream=stream))
    lines = stream.getvalue().splitlines()
    step_lines = [line for line in lines if line.startswith("[raytrainer] train step")]
    assert 9 <= len(step_lines) <= 11 and step_lines[-1].startswith("[raytrainer] train step 100/100 (100%)")
    assert "loss=0.01" in step_lines[-1]
    assert "{'loss': '0.04', 'learning_rate': '0.001', 'epoch': '0.5'}" in lines


def test_disable_tqdm_prints_only_the_logs():
    stream = io.StringIO()
    feed(DriverProgress(disable_tqdm=True, stream=stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("{'loss'") for line in lines)


def test_terminal_gets_a_progress_bar(capsys):
    stream = Terminal()
    progress = DriverProgress(disable_tqdm=False, stream=stream)
    progress(("progress", 1, 10))
    progress(("progress", 4, 10))
    assert progress.bar is not None and (progress.bar.n, progress.bar.total) == (4, 10)
    progress(("log", {"loss": 0.5, "step": 4}))
    progress.close()
    bar = capsys.readouterr().err  # tqdm draws on stderr, as transformers' own bar does
    assert "train" in bar and "4/10" in bar, bar
    assert stream.getvalue() == "{'loss': '0.5'}\n"  # logs go above the bar; no periodic step lines


def test_format_logs_like_transformers():
    assert format_logs({"loss": 1.23456789, "epoch": 1.23456, "total_flos": 5.0, "step": 3}) == {
        "loss": "1.235", "epoch": "1.235", "step": 3}
