"""Run the same set-up through transformers.Trainer and compare with ours."""

from __future__ import annotations

import math

import torch
import transformers

TIMING_KEYS = ("runtime", "per_second", "total_flos", "step_time")  # step_time: TRL (GRPO)


def run_transformers(model, args, **kwargs):
    trainer = transformers.Trainer(model=model, args=args, **kwargs)
    output = trainer.train()
    return trainer, output


def comparable(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not any(t in k for t in TIMING_KEYS)}


def assert_logs_close(expected: list[dict], actual: list[dict], rel: float = 1e-4) -> None:
    assert len(expected) == len(actual), (len(expected), len(actual), expected[-3:], actual[-3:])
    for ours, theirs in zip(actual, expected):
        theirs, ours = comparable(theirs), comparable(ours)
        assert set(theirs) == set(ours), (theirs, ours)
        for key, value in theirs.items():
            if isinstance(value, float):
                assert math.isclose(ours[key], value, rel_tol=rel, abs_tol=1e-7), (key, ours[key], value, theirs)
            else:
                assert ours[key] == value, (key, ours[key], value)


def assert_weights_close(expected: torch.nn.Module, actual: torch.nn.Module, tol: float = 1e-4) -> None:
    theirs, ours = expected.state_dict(), actual.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        diff = (theirs[name].float() - ours[name].float()).abs().max().item()
        assert diff <= tol, (name, diff)


def run_raytrainer(model, args, trainer_class=None, **kwargs):
    """The same set-up through raytrainer.Trainer (or a subclass of it): trained by the Ray Train workers."""
    from raytrainer import Trainer

    trainer = (trainer_class or Trainer)(model=model, args=args, **kwargs)
    output = trainer.train()
    return trainer, output
