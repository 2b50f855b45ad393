"""Which process this is: the user's driver, or a Ray Train worker running transformers' own Trainer.

`raytrainer.Trainer` reads this on every call: on the driver its `train()`, `evaluate()` and `predict()` go to
the workers; inside a worker, where the user's own Trainer class is built again, they are transformers' own.
"""

_role = {"worker": False}


def in_worker() -> bool:
    """True inside a Ray Train worker of raytrainer (set once per worker process, never on a driver)."""
    return _role["worker"]


def mark_worker() -> None:
    _role["worker"] = True
