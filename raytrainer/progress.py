"""What the driver shows while the workers run: a progress bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


def format_logs(logs: dict) -> dict:
    """transformers' display format: 4 significant digits, epoch rounded, no total_flos."""
    shown = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if key == "epoch" and isinstance(value, float):
            value = round(value, 2)
        shown[key] = format(value, ".4g") if isinstance(value, float) else value
    return shown


class DriverProgress:
    """Consumes the workers' events: ("progress", step, max_steps) and ("log", entry)."""

    def __init__(self, disable_tqdm: bool, description: str = "train", stream: Any = None,
                 line_interval_s: float = 30.0):
        self.stream = stream or sys.stdout
        self.disable_tqdm = disable_tqdm
        self.is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.description = description
        self.bar: tqdm | None = None
        self.line_interval_s = line_interval_s
        self.last_line = 0.0
        self.last_fraction = 0.0
        self.last_loss: float | None = None

    def __call__(self, event: tuple) -> None:
        if event[0] == "progress":
            self.on_progress(event[1], event[2])
        elif event[0] == "log":
            self.on_log(event[1])

    def on_progress(self, step: int, max_steps: int) -> None:
        if self.disable_tqdm:
            return
        if self.is_terminal:
            if self.bar is None:
                self.bar = tqdm(total=max_steps, desc=self.description, dynamic_ncols=True)
            self.bar.update(step - self.bar.n)
            if self.last_loss is not None:
                self.bar.set_postfix(loss=f"{self.last_loss:.4g}", refresh=False)
            return
        fraction = step / max(max_steps, 1)
        now = time.monotonic()
        if fraction - self.last_fraction >= 0.1 or now - self.last_line >= self.line_interval_s or step == max_steps:
            self.last_fraction, self.last_line = fraction, now
            loss = f" loss={self.last_loss:.4g}" if self.last_loss is not None else ""
            print(f"[raytrainer] {self.description} step {step}/{max_steps} ({fraction:.0%}){loss}",
                  file=self.stream, flush=True)

    def on_log(self, entry: dict) -> None:
        logs = {k: v for k, v in entry.items() if k != "step"}
        if isinstance(logs.get("loss"), (int, float)):
            self.last_loss = float(logs["loss"])
        text = str(format_logs(logs))
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
