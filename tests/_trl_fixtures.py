"""The data of the TRL tests, shared by tests/test_trl.py and its torchrun reference (tests/_trl_torchrun.py)."""

import datasets
import torch


def additions(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 50, (n, 2), generator=rng).tolist()
    return [(f"{a}+{b}=", a + b) for a, b in pairs]


def sft_data(n: int = 32) -> datasets.Dataset:
    rows = additions(n)
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [str(s) for _, s in rows]})


def grpo_prompts(n: int = 8) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in additions(n, seed=2)]})


def digits(completions, **kwargs) -> list[float]:
    """A Python reward function: the share of a completion's characters that are digits."""
    return [sum(c.isdigit() for c in completion) / max(len(completion), 1) for completion in completions]
