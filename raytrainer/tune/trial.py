"""One hyperparameter-search trial as Tune runs it: a thin relay to a warm worker group of the search's pool.

The trial borrows a running Ray Train worker group from the search's `GroupLender` (tune/pool.py), sends it the
search's shared Trainer recipe with its own `TrialCommand`, and passes every evaluation the workers send back to
`ray.tune.report`, so that schedulers (ASHA, PBT, ...) act mid-training. Nothing here imports torch or
transformers: a reused trial actor starts the next trial in milliseconds, and the workers stay warm between trials.
When Tune stops or pauses the trial, the command is cancelled (training stops at its next step) and the group goes
back to the lender; a PBT restart passes the checkpoint Tune restored to the workers.
"""

from __future__ import annotations

from typing import Any

import ray

from raytrainer.backend.channel import CommandFinished, CommandRequest, GroupStopped, Superseded, TrialReport
from raytrainer.tune.trial_command import TrialCommand
from raytrainer.tune.trial_config import CHECKPOINT_PATH, finished_run


def run_trial(config: dict, pool: Any, shared: list, report_checkpoints: bool) -> None:
    """The Tune function trainable. `shared` is `[recipe ref, callbacks ref, settings ref]` of the search (never
    unpickled here)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    restored = tune.get_checkpoint()  # set when PBT restarts this trial from another trial's checkpoint
    if restored is not None and finished_run(restored.path):
        return  # PBT paused the trial at its last evaluation: its training is over, the trial ends here
    command = TrialCommand(trial_id=trial_id, config=dict(config), settings=[shared[2]],
                           restored_from=restored.path if restored is not None else None)
    request = CommandRequest(recipe=[shared[0]], callbacks=[shared[1]], command=[ray.put(command)])
    while True:  # a group whose run failed since it was lent takes no command: borrow another
        loan, channel = ray.get(pool.acquire.remote(trial_id))
        seq = ray.get(pool.submit.remote(loan, request))
        if seq is not None:
            break
        pool.release.remote(loan, failed=True)
    finished = failed = False
    try:
        while not finished:
            for event in ray.get(channel.drain_for.remote(seq, 0.5)):
                if isinstance(event, TrialReport):
                    path = event.result.get(CHECKPOINT_PATH)
                    checkpoint = tune.Checkpoint(path) if report_checkpoints and path else None
                    tune.report(event.result, checkpoint=checkpoint)
                elif isinstance(event, CommandFinished):
                    finished = True
                elif isinstance(event, GroupStopped):
                    failed = True
                    raise RuntimeError(event.why)
                elif isinstance(event, Superseded):
                    return  # Tune ended this trial and the lender handed its group on
    finally:
        if not finished:
            channel.cancel.remote(seq)  # Tune stopped the trial: training stops at its next step
        pool.release.remote(loan, failed=failed)
