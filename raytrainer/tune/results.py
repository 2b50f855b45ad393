"""What a hyperparameter search shows and returns: one line per finished trial, the final table, the best run."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

from raytrainer.tune.trial_config import CHECKPOINT_PATH, OBJECTIVE, apply_hyperparameters

SCHEDULE = "hyperparameter_schedule"  # the key of a recorded result's schedule (driver-side records only)
Schedule = tuple  # ((step, hyperparameters), ...): from each step on (its next optimizer step) the run used these


class BestRun(NamedTuple):
    """The best run of `Trainer.hyperparameter_search`, as in transformers, plus its checkpoint.

    Args:
        run_id: the Tune trial id of the best run.
        objective: its objective: the last evaluation's (`scope="last"`) or the best one's (`scope="all"`).
        hyperparameters: the trial's values from the search space; `trainer.train(trial=hyperparameters)`
            trains with them.
        run_summary: the `ray.tune.ExperimentAnalysis` of the whole search.
        checkpoint: the transformers-layout checkpoint directory saved at the evaluation that gave `objective`
            (`best_run.load_model(trainer)` loads it into `trainer.model`); None if none was saved.
        hyperparameter_schedule: `[(step, hyperparameters), ...]`, the configs the model that gave `objective` was
            trained with: from `step` on (its next optimizer step) with `hyperparameters`. One entry `(0, ...)`
            without PBT; with PBT, the configs of the trials it was cloned from up to each exploit, then its own,
            since its final config alone does not reproduce it. `hyperparameters` is the last entry's.
    """

    run_id: str
    objective: float
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None
    checkpoint: str | None = None
    hyperparameter_schedule: list[tuple[int, dict[str, Any]]] | None = None

    def load_model(self, trainer: Any) -> Any:
        """Set `trainer.model` to the best trial's model: `model_init(hyperparameters)` with the weights of
        `checkpoint`. `trainer.evaluate()` then scores it (its eval loss is `objective` by default)."""
        from ray.train import Checkpoint

        folder = self.checkpoint
        if folder is not None and "://" in folder:  # persisted to remote storage (storage_path="s3://...")
            folder = Checkpoint(folder).to_directory()
        if folder is None or not os.path.isdir(folder):
            raise ValueError(f"The best run's checkpoint {self.checkpoint!r} does not exist (deleted, or on another "
                             "machine's disk): set storage_path to shared storage to keep trial checkpoints.")
        model = trainer.call_model_init(self.hyperparameters)
        trainer._load_from_checkpoint(folder, model=model)  # transformers' own loader (safetensors, shards, PEFT)
        trainer.model = trainer.model_wrapped = model
        return model

    def apply_to(self, trainer: Any) -> None:
        """Set the best hyperparameters on `trainer.args`, so that `trainer.train(trial=best_run.hyperparameters)`
        (the trial dict reaches a one-argument `model_init`) trains the best configuration again."""
        trainer.args = apply_hyperparameters(trainer.args, self.hyperparameters)


def trial_score(results: list[dict[str, Any]], mode: str, scope: str) -> dict[str, Any] | None:
    """The result that scores a trial: its last evaluation, or its best one with scope="all"."""
    scored = [r for r in results if isinstance(r.get(OBJECTIVE), (int, float)) and not math.isnan(r[OBJECTIVE])]
    if not scored:
        return None
    if scope == "last":
        return scored[-1]
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r[OBJECTIVE])


def format_hyperparameters(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def trial_status(trial: Any, stopped: set[str], results: dict[str, list[dict]]) -> str:
    """error / stopped early / completed. Tune flags the result it stops a trial on (`done`), also when a scheduler
    stops a trial at its last evaluation (ASHA's max_t), so "early" also needs fewer evaluations than another trial."""
    if trial.status == "ERROR":
        return "error"
    evaluations = len(results.get(trial.trial_id, []))
    most = max((len(r) for r in results.values()), default=0)
    return "stopped early" if trial.trial_id in stopped and evaluations < most else "completed"


def results_table(trials: list[Any], results: dict[str, list[dict]], stopped: set[str], mode: str,
                  scope: str) -> str:
    """A markdown table of all trials, best objective first (trials without an objective last)."""
    rows = []
    for trial in trials:
        best = trial_score(results.get(trial.trial_id, []), mode, scope)
        objective = best[OBJECTIVE] if best else None
        rows.append((objective, trial.trial_id, trial_status(trial, stopped, results), len(results.get(trial.trial_id, [])),
                     format_hyperparameters(trial.config)))
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda row: (row[0] is None, sign * row[0] if row[0] is not None else 0))
    lines = ["| trial | status | objective | evaluations | hyperparameters |", "|---|---|---|---|---|"]
    for objective, trial_id, status, evaluations, hyperparameters in rows:
        shown = f"{objective:.6g}" if objective is not None else "-"
        lines.append(f"| {trial_id} | {status} | {shown} | {evaluations} | {hyperparameters} |")
    return "\n".join(lines)


def continue_schedule(made: tuple[int, Schedule] | None, config: dict[str, Any]) -> Schedule:
    """The schedule of a run that starts from a checkpoint (`made`: its step and the schedule that made it, None
    for a fresh start) with `config`."""
    if made is None:
        return ((0, config),)
    step, schedule = made
    kept = tuple(entry for entry in schedule if entry[0] < step) or schedule[:1]
    return kept if kept[-1][1] == config else (*kept, (step, config))


def make_progress_callback(mode: str, scope: str, print_fn: Callable[[str], None] = print) -> Any:
    """A Tune callback that keeps every trial's evaluations on the driver and prints one line per finished trial.

    It also follows the hyperparameter schedule of each trial's model: a trial that (re)starts from a checkpoint
    (PBT's exploit restores another trial's) continues the schedule that made that checkpoint.
    """
    from ray import tune

    class SearchProgress(tune.Callback):
        def __init__(self):
            self.results: dict[str, list[dict[str, Any]]] = {}
            self.stopped: set[str] = set()  # trials a scheduler or stopper ended before their training did
            self.schedules: dict[str, Schedule] = {}  # trial id -> the schedule of its current model
            self.steps: dict[str, int] = {}  # trial id -> the step of its last result
            self.made: dict[str, tuple[int, Schedule]] = {}  # Tune checkpoint path -> (step, schedule)

        def on_trial_start(self, iteration, trials, trial, **info):
            checkpoint = trial.checkpoint  # after an exploit: the donor's
            made = self.made.get(checkpoint.path) if checkpoint is not None else None
            self.schedules[trial.trial_id] = continue_schedule(made, dict(trial.config))

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            self.made[checkpoint.path] = (self.steps.get(trial.trial_id, 0), self._schedule(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if OBJECTIVE in result:
                self.results.setdefault(trial.trial_id, []).append({**result, SCHEDULE: self._schedule(trial)})
                self.steps[trial.trial_id] = result.get("step", 0)
            if result.get("done"):  # Tune marks the result it stops a trial on; a finished run's last is not
                self.stopped.add(trial.trial_id)

        def _schedule(self, trial) -> Schedule:
            return self.schedules.setdefault(trial.trial_id, ((0, dict(trial.config)),))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._print(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._print(trial)

        def _print(self, trial):
            best = trial_score(self.results.get(trial.trial_id, []), mode, scope)
            objective = f"{best[OBJECTIVE]:.6g}" if best else "-"
            print_fn(f"[hyperparameter_search] trial {trial.trial_id} {trial_status(trial, self.stopped, self.results)}: objective={objective} "
                     f"evaluations={len(self.results.get(trial.trial_id, []))} "
                     f"({format_hyperparameters(trial.config)})")

    return SearchProgress()


def summarize_search(analysis: Any, results: dict[str, list[dict]], stopped: set[str], mode: str, scope: str,
                     print_fn: Callable[[str], None] = print) -> BestRun:
    """Pick the best trial, print the table of all trials, and return the BestRun."""
    trials = list(analysis.trials)
    print_fn(results_table(trials, results, stopped, mode, scope))
    scored = [(trial, trial_score(results.get(trial.trial_id, []), mode, scope)) for trial in trials]
    scored = [(trial, result) for trial, result in scored if result is not None]
    if not scored:
        errors = [f"{trial.trial_id}: {trial.error_file or trial.status}" for trial in trials]
        raise RuntimeError("No trial reported an objective, so there is no best run. Trial outcomes: "
                           + "; ".join(errors))
    pick = min if mode == "min" else max
    trial, result = pick(scored, key=lambda pair: pair[1][OBJECTIVE])
    schedule = [(step, dict(config)) for step, config in result.get(SCHEDULE) or ((0, trial.config),)]
    return BestRun(run_id=trial.trial_id, objective=result[OBJECTIVE], hyperparameters=dict(schedule[-1][1]),
                   run_summary=analysis, checkpoint=result.get(CHECKPOINT_PATH), hyperparameter_schedule=schedule)
