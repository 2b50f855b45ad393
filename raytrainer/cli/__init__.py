"""`raytrainer train job.yaml`: a Trainer run described by a config file (what `ray job submit` runs)."""

from raytrainer.cli.main import main

__all__ = ["main"]
