"""Checkpoints and Ray Train, in a worker: report each checkpoint transformers saved, and find the one a restarted
group resumes from.

transformers writes `checkpoint-<step>` itself; we only tell Ray Train about it. Without `storage_path` the folder
in `output_dir` is the record and Ray Train stores a pointer to it (no copy); with `storage_path` Ray Train copies it
there (shared storage or s3://). The command channel (on the driver's node) remembers where each command's latest
checkpoint is, as soon as rank 0 reported it: a restarted command resumes from its own checkpoint (a warm group also
holds the checkpoints of earlier commands), even when Ray Train's controller had not collected that report yet.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import ray
import ray.train
from ray.train import Checkpoint

POINTER_NAME = "raytrainer_checkpoint_pointer.json"


class CheckpointReporter:
    """Reports one command's checkpoints (every rank calls `report` at the same points: it is a barrier).

    Args:
        on_report: called on rank 0 with the metrics and the checkpoint's location after each report (search
            trials send it to Tune).
        checkpoint_prefix: prefixes persisted checkpoint names (trials of one group keep theirs apart).
        to_ray_train: False for a search trial whose checkpoints stay in its output_dir: a Ray Train report would
            record nothing new and costs an actor barrier plus a wait for the controller's next poll at every
            evaluation; its restart point is kept by the channel instead.
    """

    def __init__(self, channel: Any, seq: int, rank: int, persist_checkpoints: bool, *,
                 on_report: Callable[[dict, str | None], None] | None = None, checkpoint_prefix: str = "",
                 to_ray_train: bool = True):
        self.channel, self.seq, self.rank = channel, seq, rank
        self.persist_checkpoints = persist_checkpoints
        self.on_report, self.checkpoint_prefix = on_report, checkpoint_prefix
        self.to_ray_train = to_ray_train or persist_checkpoints

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and self.rank == 0 else None
        location = os.path.abspath(checkpoint_dir) if checkpoint is not None else None
        if self.to_ray_train:
            location = self._report_to_ray_train(metrics, checkpoint, checkpoint_dir) or location
        if checkpoint is not None:  # from now on a restart of this command resumes from this checkpoint
            ray.get(self.channel.note_checkpoint.remote(self.seq, location))
        if self.on_report is not None and self.rank == 0:
            self.on_report(metrics, location)

    def _report_to_ray_train(self, metrics: dict, checkpoint: Checkpoint | None, checkpoint_dir: str | None
                             ) -> str | None:
        """Report on every rank; the checkpoint's persisted location when storage_path copied it."""
        if checkpoint is None or self.persist_checkpoints:
            name = self.checkpoint_prefix + os.path.basename(checkpoint_dir) if checkpoint is not None else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             delete_local_checkpoint_after_upload=False)
            return _persisted_location(name) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False,
                         checkpoint_upload_fn=_store_pointer)
        return None

    def latest_checkpoint(self) -> str | None:
        """After a worker-group restart, the checkpoint this command saved last; None on a first attempt."""
        location = ray.get(self.channel.checkpoint_of.remote(self.seq))
        return None if location is None else restore_point(location)


def restore_point(location: str) -> str:
    """The local folder to resume from, on this node, for a checkpoint reported at `location`: the folder itself
    (output_dir, or a storage_path every node mounts), or a local copy of a URI (s3://, gs://, ...)."""
    if "://" in location:
        return transformers_checkpoint(Checkpoint(path=location).to_directory())
    if not os.path.isdir(location):
        raise FileNotFoundError(
            f"The checkpoint to resume from after the worker-group restart, {location}, is not on this node "
            f"({ray.util.get_node_ip_address()}): rank 0 of the attempt before wrote it on another node, in a folder "
            "this node does not see. Without storage_path, checkpoints stay in output_dir on the node that wrote "
            "them. Set storage_path to a folder every node mounts (or s3://...), so that a group restarted on "
            "other nodes resumes from its last checkpoint.")
    return transformers_checkpoint(location)


def transformers_checkpoint(folder: str) -> str:
    """The transformers-layout checkpoint in `folder` (itself, or its one `checkpoint-*` subfolder)."""
    from transformers.trainer_utils import get_last_checkpoint

    if os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return folder
    found = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if found is None:
        raise ValueError(f"{folder} holds no transformers checkpoint (trainer_state.json and the weights).")
    return found


def _persisted_location(dir_name: str) -> str:
    """Where Ray Train persisted a reported checkpoint: a local path, or a URI (s3://, gs://, ...)."""
    storage = ray.train.get_context().get_storage()
    path = os.path.join(storage.experiment_fs_path, dir_name)
    kind = storage.storage_filesystem.type_name
    return path if kind == "local" else f"{kind}://{path}"


def _store_pointer(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
    """Register a local checkpoint with Ray Train without copying it: store only its path."""
    storage = ray.train.get_context().get_storage()
    destination = os.path.join(storage.experiment_fs_path, dir_name)
    storage.storage_filesystem.create_dir(destination)
    with storage.storage_filesystem.open_output_stream(os.path.join(destination, POINTER_NAME)) as stream:
        stream.write(json.dumps({"path": os.path.abspath(checkpoint.path)}).encode())
    return Checkpoint(path=destination, filesystem=storage.storage_filesystem)
