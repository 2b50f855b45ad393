"""What a hyperparameter search shows and returns: one line per finished trial, the final table, the best run."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

from raytrainer.tune.trial_config import CHECKPOINT_PATH, OBJECTIVE, apply_hyperparameters


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
    """

    run_id: str
    objective: float
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None
    checkpoint: str | None = None

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


def make_progress_callback(mode: str, scope: str, print_fn: Callable[[str], None] = print) -> Any:
    """A Tune callback that keeps every trial's evaluations on the driver and prints one line per finished trial."""
    from ray import tune

    class SearchProgress(tune.Callback):
        def __init__(self):
            self.results: dict[str, list[dict[str, Any]]] = {}
            self.stopped: set[str] = set()  # trials a scheduler or stopper ended before their training did

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if OBJECTIVE in result:
                self.results.setdefault(trial.trial_id, []).append(dict(result))
            if result.get("done"):  # Tune marks the result it stops a trial on; a finished run's last is not
                self.stopped.add(trial.trial_id)

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
    return BestRun(run_id=trial.trial_id, objective=result[OBJECTIVE], hyperparameters=dict(trial.config),
                   run_summary=analysis, checkpoint=result.get(CHECKPOINT_PATH))
