"""Rollout records: which completions to keep, and their Parquet files under `output_dir/rollouts/`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROLLOUT_SCHEMA = pa.schema([
    ("round", pa.int64()), ("prompt_index", pa.int64()), ("sample_index", pa.int64()),
    ("prompt", pa.string()), ("completion", pa.string()), ("reward", pa.float64()),
    ("kept", pa.bool_()), ("weight_version", pa.int64()),
])


@dataclass(frozen=True)
class KeepRule:
    """Which samples train: reward >= `min_reward` (if set) and among the `best_k` best of their prompt
    (if set; ties broken by sample order). With neither set, every sample is kept."""

    min_reward: float | None = None
    best_k: int | None = None

    def __post_init__(self):
        if self.best_k is not None and (not isinstance(self.best_k, int) or self.best_k < 1):
            raise ValueError(f"best_k={self.best_k!r} is invalid: use a whole number >= 1, or None to keep all.")

    def select(self, rewards: list[float], prompt_indices: list[int]) -> list[bool]:
        kept = [self.min_reward is None or r >= self.min_reward for r in rewards]
        if self.best_k is None:
            return kept
        by_prompt: dict[int, list[int]] = {}
        for i, p in enumerate(prompt_indices):
            by_prompt.setdefault(p, []).append(i)
        best = set()
        for members in by_prompt.values():
            ranked = sorted(members, key=lambda i: (-rewards[i], i))
            best.update(ranked[: self.best_k])
        return [k and i in best for i, k in enumerate(kept)]


def rollout_path(output_dir: str | os.PathLike, round_index: int) -> Path:
    return Path(output_dir) / "rollouts" / f"round-{round_index:06d}.parquet"


def write_rollouts(output_dir: str | os.PathLike, round_index: int, records: dict[str, list]) -> Path:
    """Write one round's records (columns of ROLLOUT_SCHEMA) atomically; returns the file's path."""
    path = rollout_path(output_dir, round_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: records[name] for name in ROLLOUT_SCHEMA.names}, schema=ROLLOUT_SCHEMA)
    partial = path.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
    return path


def read_rollouts(output_dir: str | os.PathLike) -> pa.Table:
    """Every round's rollouts written so far, in round order."""
    files = sorted((Path(output_dir) / "rollouts").glob("round-*.parquet"))
    if not files:
        return ROLLOUT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files])
