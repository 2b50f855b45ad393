"""Every check of a hyperparameter search, on the driver before any trial starts, and the resources trials get."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

from transformers.trainer_utils import default_hp_space_ray

from raytrainer.tune.trial_config import OBJECTIVE

DIRECTIONS = {"minimize": "min", "maximize": "max"}
SCOPES = ("last", "all")
# Ray fields that fix the shape of every trial; searching over them would change the resources per trial.
UNSEARCHABLE_FIELDS = frozenset({"num_workers", "use_gpu", "resources_per_worker", "placement_strategy",
                                 "max_failures", "storage_path", "ray_address", "output_dir"})
# TrainingArguments fields a PBT exploit cannot change: the trial goes on from the donor's checkpoint at its step.
_BATCHES = ("a checkpoint's step counts batches of the size it was trained with: resuming with another size would "
            "skip the wrong examples and change the number of steps per epoch and the schedule's length")
_LENGTH = ("the length of training sets the learning-rate schedule's length and where every trial ends: a trial "
           "cloned at step N with another length would jump to another point of its schedule, and PBT compares "
           "trials at the same iteration")
_AT_START = ("it acts only when a run starts (the model's initialization, the data order); an exploited trial "
             "goes on from the donor's weights and random state, so a new value would have no effect")
FIXED_DURING_A_RUN = {
    "per_device_train_batch_size": _BATCHES, "gradient_accumulation_steps": _BATCHES,
    "auto_find_batch_size": _BATCHES, "max_steps": _LENGTH, "num_train_epochs": _LENGTH,
    "seed": _AT_START, "data_seed": _AT_START, "full_determinism": _AT_START,
    "optim": "the optimizer's state (Adam's moments, ...) belongs to one optimizer class, which another cannot "
             "continue from",
}
# Tune kwargs that would break how trials run on Ray Train workers.
REJECTED_TUNE_KWARGS = {
    "config": "the search space comes from `hp_space`",
    "num_samples": "the number of trials is `n_trials`",
    "metric": "the metric is always 'objective' (computed by `compute_objective`); give schedulers their own "
              "`metric` if they should act on another reported metric",
    "mode": "the mode comes from `direction`",
}
# Metrics every evaluation reports besides those of `compute_metrics` (with the `eval_` prefix).
EVAL_METRICS = frozenset({"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"})
REPORTED_METRICS = frozenset({OBJECTIVE, "epoch", "step", "training_iteration", "time_total_s"})


# ---------------------------------------------------------------------------------------------- validation


def check_direction(direction: Any) -> str:
    """Tune's mode ("min"/"max") for transformers' `direction`."""
    if isinstance(direction, str) and direction.lower() in DIRECTIONS:
        return DIRECTIONS[direction.lower()]
    raise ValueError(f"direction={direction!r} is invalid: use 'minimize' or 'maximize' (raytrainer searches "
                     "one objective; combine several metrics into one in `compute_objective`).")


def check_backend(backend: Any) -> None:
    if backend is None or str(getattr(backend, "value", backend)).lower() == "ray":
        return
    raise ValueError(f"backend={backend!r} is not available: raytrainer runs hyperparameter search on Ray Tune "
                     "only. Use backend='ray' (the default), or transformers.Trainer for optuna/sigopt/wandb.")


def check_search_space(hp_space: Callable | None, args: Any) -> dict[str, Any]:
    """Call `hp_space(None)` (as transformers does for Ray) and check every key is a TrainingArguments field."""
    hp_space = hp_space or default_hp_space_ray
    space = hp_space(None)
    if not isinstance(space, dict):
        raise TypeError(f"hp_space returned {type(space).__name__} ({space!r:.80}): it must return a dict from "
                        "TrainingArguments field names to Ray Tune search spaces, e.g. "
                        "{'learning_rate': tune.loguniform(1e-6, 1e-4)}.")
    if not space:
        raise ValueError("hp_space returned an empty dict: give at least one TrainingArguments field to search.")
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    unknown = [key for key in space if key not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"The search space has keys that are not {type(args).__name__} fields: "
                         f"{', '.join(hints)}. Every key is applied to the trial's TrainingArguments; for model "
                         "settings, read them from the arguments or fix them in `model_init`.")
    fixed = sorted(UNSEARCHABLE_FIELDS & set(space))
    if fixed:
        raise ValueError(f"The search space includes {fixed}: these fix where and how every trial runs and cannot "
                         "vary between trials. Set them on TrainingArguments instead.")
    return space


def check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: use 'last' (a trial's score is its last evaluation, as in "
                         "transformers) or 'all' (its best evaluation).")
    return scope


def check_trainer_ready(trainer: Any) -> None:
    """The parts of the Trainer every trial needs."""
    if trainer.model_init is None:
        raise RuntimeError("hyperparameter_search needs `model_init`: pass Trainer(model_init=...) (a function with "
                           "no argument, or one taking the trial's hyperparameters dict) so that every trial "
                           "starts from a fresh model.")
    if trainer.train_dataset is None:
        raise ValueError("hyperparameter_search needs a train_dataset: pass Trainer(train_dataset=...).")
    if trainer.eval_dataset is None:
        raise ValueError("hyperparameter_search needs an eval_dataset: the objective is computed from evaluation "
                         "metrics. Pass Trainer(eval_dataset=...).")


def reported_metric_names(trainer: Any) -> set[str] | None:
    """Names every evaluation reports, or None when `compute_metrics`/several eval sets make them unknowable."""
    if trainer.compute_metrics is not None or isinstance(trainer.eval_dataset, dict):
        return None
    return set(EVAL_METRICS | REPORTED_METRICS)


def fill_metric_and_mode(searcher_or_scheduler: Any, mode: str) -> None:
    """Give a scheduler or search algorithm created without metric/mode `metric="objective"` and `mode`."""
    metric = None if getattr(searcher_or_scheduler, "metric", None) else OBJECTIVE
    own_mode = getattr(searcher_or_scheduler, "_mode", None) or getattr(searcher_or_scheduler, "mode", None)
    if metric is None and own_mode:
        return
    searcher_or_scheduler.set_search_properties(metric, None if own_mode else mode)


def is_search_domain(value: Any) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain) or (isinstance(value, dict) and "grid_search" in value)


def prepare_search_alg(search_alg: Any, param_space: dict[str, Any], mode: str) -> dict[str, Any]:
    """Give a search algorithm without metric/mode the search's; return the `config` to hand to Tune.

    A searcher that accepts the space here owns its distributions from now on, so Tune gets only the constants.
    """
    from ray.tune.search import Searcher

    if search_alg is None:
        return param_space
    if isinstance(search_alg, str):
        raise TypeError(f"search_alg={search_alg!r}: pass a search algorithm object, e.g. "
                        "ray.tune.search.optuna.OptunaSearch().")
    if not isinstance(search_alg, Searcher) or (search_alg.metric and search_alg.mode):
        return param_space
    metric = None if search_alg.metric else OBJECTIVE
    if search_alg.set_search_properties(metric, None if search_alg.mode else mode, param_space):
        return {key: value for key, value in param_space.items() if not is_search_domain(value)}
    raise ValueError(f"{type(search_alg).__name__} was created with its own search space but without "
                     "metric/mode: create it with metric='objective' and mode='min' or 'max' as well.")


def check_scheduler(scheduler: Any, trainer: Any, mode: str) -> None:
    """A scheduler must see results during training, and its metric must be one the trials report."""
    if scheduler is None or type(scheduler).__name__ == "FIFOScheduler":
        return
    if isinstance(scheduler, str):
        raise TypeError(f"scheduler={scheduler!r}: pass a scheduler object, e.g. "
                        "ray.tune.schedulers.ASHAScheduler(max_t=..., grace_period=...).")
    if str(getattr(trainer.args.eval_strategy, "value", trainer.args.eval_strategy)) == "no":
        raise ValueError(f"{type(scheduler).__name__} decides on results reported during training, but "
                         "eval_strategy='no' reports only one result at the end, so it could never stop or exploit "
                         "a trial. Set eval_strategy='steps' (with eval_steps) or 'epoch' in TrainingArguments.")
    fill_metric_and_mode(scheduler, mode)
    check_population_mutations(scheduler, trainer.args)
    known = reported_metric_names(trainer)
    metric = scheduler.metric
    if known is not None and metric not in known:
        raise ValueError(f"{type(scheduler).__name__} uses metric={metric!r}, which trials never report (they "
                         f"report {sorted(known)}). Use metric='objective' (or leave metric unset).")
    if known is None and metric not in REPORTED_METRICS and not str(metric).startswith("eval_"):
        raise ValueError(f"{type(scheduler).__name__} uses metric={metric!r}, which trials never report: they "
                         "report 'objective' and the evaluation metrics (named 'eval_*').")


def check_population_mutations(scheduler: Any, args: Any) -> None:
    """PBT (and PB2) change `hyperparam_mutations` mid-run: each key must be a TrainingArguments field that can."""
    from ray.tune.schedulers import PopulationBasedTraining

    if not isinstance(scheduler, PopulationBasedTraining):
        return
    mutations = getattr(scheduler, "_hyperparam_mutations", None) or {}  # Ray keeps them (PB2: its bounds) here
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    unknown = [key for key in mutations if key not in fields]
    if unknown:
        raise ValueError(f"{type(scheduler).__name__}'s hyperparam_mutations has keys that are not "
                         f"{type(args).__name__} fields: {unknown}. Every key is applied to the trial's "
                         "TrainingArguments when PBT perturbs it.")
    for key in mutations:
        why = FIXED_DURING_A_RUN.get(key) or ("it fixes where and how every trial runs"
                                              if key in UNSEARCHABLE_FIELDS else None)
        if why:
            raise ValueError(f"{type(scheduler).__name__}'s hyperparam_mutations includes {key!r}, which cannot "
                             f"change in the middle of a run: {why}. Search it with hp_space and a scheduler that "
                             f"does not mutate (ASHA, ...), or set it on TrainingArguments; PBT can mutate the "
                             "optimizer's and the schedule's settings (learning_rate, weight_decay, adam_*, "
                             "warmup_*, max_grad_norm, ...).")


# ---------------------------------------------------------------------------------------------- resources


def worker_resources(args: Any, cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's Ray Train workers need together (they start their own placement group)."""
    from raytrainer.backend.cluster import WorkerGroupSpec

    return WorkerGroupSpec.of(args, cluster).total()


def trial_driver_need(resources_per_trial: Any) -> dict[str, float]:
    """The CPUs and GPUs a Tune trial's own actor holds (beside its workers'): from a `resources_per_trial` dict,
    or a PlacementGroupFactory the user sized the trials with."""
    driver = resources_per_trial
    if isinstance(driver, dict):
        return {"CPU": driver.get("cpu", driver.get("CPU", 0)), "GPU": driver.get("gpu", driver.get("GPU", 0))}
    return {name: amount for name, amount in driver.required_resources.items() if name in ("CPU", "GPU")}


def plan_trial_resources(tune_kwargs: dict[str, Any], workers: dict[str, float],
                         cluster: dict[str, float], driver_node_resource: str | None = None) -> int | None:
    """Set `resources_per_trial` and `max_concurrent_trials` so that trials never starve their own workers;
    return how many trials (with their workers) fit side by side, None when nothing limits it.

    A Tune trial here only relays a warm worker group's results, so by default it holds no CPU (just 1 byte of
    memory, as Tune needs some resource); the groups ask Ray for the workers' resources. With
    `driver_node_resource` (a resource only the driver's node has) it also asks for a sliver of that, so that the
    trial actors run where the driver runs: losing a workers' node then never takes a trial's relay with it (the
    group restarts and the trial goes on). Concurrency is capped at what the cluster can run side by side, so no
    trial waits forever for workers that other trials' drivers block.
    """
    missing = {name: (amount, cluster.get(name, 0)) for name, amount in workers.items()
               if amount > cluster.get(name, 0)}
    if missing:
        details = ", ".join(f"{amount:g} {name} (the cluster has {have:g})" for name, (amount, have) in missing.items())
        raise ValueError(f"One trial's Ray Train workers need {details}, which this Ray cluster can never provide, so "
                         "no trial could start. Lower num_workers or resources_per_worker, or use a larger cluster.")
    default = {"cpu": 0, "memory": 1, **({driver_node_resource: 0.001} if driver_node_resource else {})}
    driver = tune_kwargs.setdefault("resources_per_trial", default)
    driver_need = trial_driver_need(driver)
    per_trial = {name: workers.get(name, 0) + driver_need.get(name, 0) for name in set(workers) | set(driver_need)}
    fits = min((math.floor(cluster.get(name, 0) / amount + 1e-9) for name, amount in per_trial.items() if amount),
               default=None)
    if fits is None:  # workers that need no resources: nothing to size
        return None
    if fits < 1:
        raise ValueError(f"resources_per_trial={driver!r} plus the trial's workers ({workers}) exceed the cluster "
                         f"({cluster}): no trial could start. Leave resources_per_trial unset (a trial's driver "
                         "needs no CPU) or lower num_workers.")
    requested = tune_kwargs.get("max_concurrent_trials")
    if requested is None:
        tune_kwargs["max_concurrent_trials"] = fits
    elif any(driver_need.values()) and requested > fits:
        raise ValueError(f"max_concurrent_trials={requested} with resources_per_trial={driver!r}: the trial drivers "
                         f"would hold resources their own workers need (at most {fits} trials fit side by side). "
                         f"Use max_concurrent_trials<={fits} or leave resources_per_trial unset.")
    return fits



def count_trials(param_space: dict[str, Any], n_trials: int) -> int:
    """How many trials Tune will run: `n_trials` times every combination of the grid-search values."""
    grid = math.prod(len(value["grid_search"]) for value in param_space.values()
                     if isinstance(value, dict) and "grid_search" in value)
    return n_trials * grid


def check_callbacks_picklable(trainer: Any) -> None:
    """Every callback travels to the trials' workers: name the ones that cannot."""
    import ray.cloudpickle as cloudpickle

    broken = []
    from raytrainer.backend.session import worker_callbacks

    for callback in worker_callbacks(trainer.callback_handler.callbacks):
        try:
            cloudpickle.dumps(callback)
        except Exception as error:  # noqa: BLE001 - any pickling failure is reported the same way
            broken.append(f"{type(callback).__name__} ({error})")
    if broken:
        raise TypeError(f"These callbacks cannot be sent to the trials' Ray Train workers: {'; '.join(broken)}. "
                        "Make them picklable (no open files, locks or clients as attributes) or remove them.")
