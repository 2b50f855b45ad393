"""One hyperparameter-search trial as Tune runs it: a thin relay to a warm worker group of the search's pool.

The trial borrows a running Ray Train worker group from the search's `GroupLender` (trial_pool.py), hands it
the search's shared job plus its own hyperparameters (`TrialRun`), and passes every evaluation the workers send back to
`ray.tune.report`, so that schedulers (ASHA, PBT, ...) act mid-training. Nothing here imports torch or
transformers: a reused trial actor starts the next trial in milliseconds, and the workers stay warm between
trials. When Tune stops or pauses the trial, the command is cancelled (training stops at its next step) and the
group goes back to the lender; a PBT restart passes the checkpoint Tune restored to the workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

CHECKPOINT_PATH = "checkpoint_path"  # the result key Ray's own Tune+Train integration uses (tuning.py's too)


@dataclasses.dataclass
class TrialRun:
    """What one trial adds to the search's shared job."""

    trial_id: str
    config: dict
    restored_from: str | None = None  # the checkpoint Tune restored (PBT exploit), resumed by the workers


def run_trial(config: dict, pool: Any, trial_job: list, report_checkpoints: bool) -> None:
    """The Tune function trainable. `trial_job` is `[ObjectRef]` of the shared `TrialJob` (never unpickled here)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    restored = tune.get_checkpoint()  # set when PBT restarts this trial from another trial's checkpoint
    run = TrialRun(trial_id, dict(config), restored.path if restored is not None else None)
    payload = {"job": trial_job[0], "trial": ray.put(run)}
    while True:  # a group whose run failed since it was lent takes no command: borrow another
        loan, channel = ray.get(pool.acquire.remote(trial_id))
        seq = ray.get(pool.submit.remote(loan, payload))
        if seq is not None:
            break
        pool.release.remote(loan, failed=True)
    finished = failed = False
    try:
        while not finished:
            for event in ray.get(channel.drain_for.remote(seq, 0.5)):
                if event[0] == "trial_result":
                    result = event[2]
                    path = result.get(CHECKPOINT_PATH)
                    checkpoint = tune.Checkpoint(path) if report_checkpoints and path else None
                    tune.report(result, checkpoint=checkpoint)
                elif event[0] == "result":
                    finished = True
                elif event[0] == "stopped":
                    failed = True
                    raise RuntimeError(event[1])
                elif event[0] == "superseded":
                    return  # Tune ended this trial and the lender handed its group on
    finally:
        if not finished:
            channel.cancel.remote(seq)  # Tune stopped the trial: training stops at its next step
        pool.release.remote(loan, failed=failed)
