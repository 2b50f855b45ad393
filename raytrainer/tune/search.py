"""Hyperparameter search on Ray Tune: `Trainer.hyperparameter_search`, each trial trained by Ray Train workers.

The driver checks everything (`tune.checks`), puts the search's shared Trainer recipe in the object store once, and
runs `ray.tune.run`. Each trial is a light Tune function trainable (`tune.trial`) that trains on one of the search's
warm Ray Train worker groups (`tune.pool`: started once, shared by the trials one at a time, adopted from and handed
back to the Trainer); on the workers the trial builds the user's Trainer with its own arguments
(`tune.trial_command`), and every evaluation reaches Tune with its metrics plus `objective`, so schedulers (ASHA,
PBT, ...) act mid-training. The result is a transformers-style `BestRun` plus the best trial's checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from transformers.trainer_utils import default_compute_objective

from raytrainer.tune.checks import (REJECTED_TUNE_KWARGS, check_backend, check_callbacks_picklable, check_direction,
                                    check_scheduler, check_scope, check_search_space, check_trainer_ready,
                                    count_trials, plan_trial_resources, prepare_search_alg, trial_driver_need,
                                    worker_resources)
from raytrainer.tune.results import BestRun

@dataclasses.dataclass
class SearchPlan:
    """Everything the driver decided before the first trial starts."""

    param_space: dict[str, Any]
    mode: str
    scope: str
    compute_objective: Callable[[dict[str, float]], float]
    tune_kwargs: dict[str, Any]
    pool_size: int  # warm worker groups the trials share (as many as run side by side)
    population: int  # trials alive at once under PBT or HyperBand (they take turns on the groups)


def hyperparameter_search(
    trainer: Any,
    hp_space: Callable[[Any], dict[str, Any]] | None = None,
    compute_objective: Callable[[dict[str, float]], float] | None = None,
    n_trials: int = 20,
    direction: str = "minimize",
    backend: str | None = "ray",
    hp_name: Callable[[dict], str] | None = None,
    scope: str = "last",
    **kwargs: Any,
) -> BestRun:
    """Search hyperparameters with Ray Tune; every trial trains on `args.num_workers` Ray Train workers.

    Args:
        trainer: a `raytrainer.Trainer` built with `model_init`, a train and an eval dataset.
        hp_space: `hp_space(trial) -> dict` of TrainingArguments fields to Ray Tune search spaces (called with
            None). Defaults to transformers' Ray space (learning_rate, num_train_epochs, seed, batch size).
        compute_objective: `metrics -> float` for each evaluation. Defaults to `eval_loss`, or the sum of the
            other metrics when the Trainer has `compute_metrics`.
        n_trials: number of trials (Tune's `num_samples`).
        direction: "minimize" or "maximize" the objective.
        backend: only "ray".
        hp_name: `hp_name(config) -> str` names a trial's output folder `output_dir/run-<name>` (default: trial id).
        scope: "last" scores a trial by its last evaluation (transformers' default), "all" by its best one.
        **kwargs: passed to `ray.tune.run`: `scheduler`, `search_alg`, `resources_per_trial`,
            `max_concurrent_trials`, `time_budget_s`, `storage_path`, `name`, `callbacks`, `verbose`, ... A
            scheduler or search algorithm without metric/mode gets `metric="objective"` and `direction`'s mode.

    Returns:
        `BestRun(run_id, objective, hyperparameters, run_summary, checkpoint, hyperparameter_schedule)`.
        `best_run.load_model(trainer)` puts the best trial's trained model in `trainer.model`;
        `best_run.apply_to(trainer)` then `trainer.train(trial=best_run.hyperparameters)` trains the best
        configuration again. With PBT, an exploited trial goes on from the donor's checkpoint with its perturbed
        values in force from its next step (`tune.exploit`), and `hyperparameter_schedule` lists the configs the
        best model was trained with, by step; PBT may not mutate a field that cannot change mid-run (batch size,
        training length, seed, optimizer class): that is refused before any trial starts.
    """
    plan = prepare_search(trainer, hp_space, compute_objective, n_trials, direction, backend, scope, kwargs)
    from ray import tune

    from raytrainer.backend.cluster import WorkerGroupSpec
    from raytrainer.backend.group import close_all_worker_groups
    from raytrainer.tune.pool import SearchGroups, TrialConcurrency, tune_callback
    from raytrainer.tune.results import make_progress_callback, summarize_search
    from raytrainer.tune.trial import run_trial
    from raytrainer.tune.trial_command import SearchSettings

    shared, ray_datasets = share_trainer(trainer, SearchSettings(
        compute_objective=plan.compute_objective, output_dir=os.path.abspath(trainer.args.output_dir),
        hp_name=hp_name))
    session = trainer._raytrainer_workers
    adopted = session.lend(trainer.args, usable=not ray_datasets)  # the Trainer's warm workers serve first trials
    close_all_worker_groups(idle_only=True, keep=adopted)  # other Trainers' idle workers would hold resources
    tune_kwargs = dict(plan.tune_kwargs)
    concurrency = TrialConcurrency(tune_kwargs, plan.pool_size, population=plan.population)
    groups = SearchGroups(WorkerGroupSpec.of(trainer.args), plan.pool_size, ray_datasets, adopted=adopted,
                          concurrency=concurrency)
    try:
        progress = make_progress_callback(plan.mode, plan.scope)
        tune_kwargs["callbacks"] = [progress, tune_callback(groups), *(tune_kwargs.get("callbacks") or [])]
        trainable = tune.with_parameters(run_trial, pool=groups.lender, shared=shared,
                                         report_checkpoints=is_population_based(tune_kwargs.get("scheduler")))
        analysis = tune.run(trainable, config=plan.param_space, num_samples=n_trials, **tune_kwargs)
    finally:
        session.take(trainer.args, groups.close(keep_one=True))
    return summarize_search(analysis, progress.results, progress.stopped, plan.mode, plan.scope)


def is_population_based(scheduler: Any) -> bool:
    from ray.tune.schedulers import PopulationBasedTraining

    return isinstance(scheduler, PopulationBasedTraining)


def prepare_search(trainer: Any, hp_space: Callable | None, compute_objective: Callable | None, n_trials: int,
                   direction: str, backend: Any, scope: str, kwargs: dict[str, Any]) -> SearchPlan:
    """Every check and default of the search, done on the driver before any trial starts."""
    check_backend(backend)
    mode = check_direction(direction)
    scope = check_scope(scope)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ValueError(f"n_trials={n_trials!r} is invalid: use a whole number >= 1.")
    limit = kwargs.get("max_concurrent_trials")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"max_concurrent_trials={limit!r} is invalid: use a whole number >= 1, or leave it unset "
                         "(as many trials as the cluster fits).")
    if compute_objective is not None and not callable(compute_objective):
        raise TypeError(f"compute_objective={compute_objective!r} must be a function metrics -> float.")
    for key, why in REJECTED_TUNE_KWARGS.items():
        if key in kwargs and not (key == "reuse_actors" and not kwargs[key]):
            raise ValueError(f"hyperparameter_search does not take {key}={kwargs[key]!r}: {why}.")
    check_trainer_ready(trainer)
    param_space = check_search_space(hp_space, trainer.args)
    check_scheduler(kwargs.get("scheduler"), trainer, mode)
    config = prepare_search_alg(kwargs.get("search_alg"), param_space, mode)
    check_callbacks_picklable(trainer)

    from ray import cluster_resources

    from raytrainer.backend.cluster import driver_node_resource

    trainer._raytrainer_workers.connect(trainer.args)
    cluster = cluster_resources()
    tune_kwargs = dict(kwargs)
    fits = plan_trial_resources(tune_kwargs, worker_resources(trainer.args, cluster), cluster,
                                driver_node_resource=driver_node_resource())
    tune_kwargs.setdefault("storage_path", os.path.abspath(os.path.join(trainer.args.output_dir, "tune")))
    tune_kwargs.setdefault("verbose", 0)
    tune_kwargs.setdefault("raise_on_failed_trial", False)
    tune_kwargs.setdefault("reuse_actors", True)  # a trial actor holds no workers: the next trial starts at once
    fits = fits or max(1, int(cluster.get("CPU", 1)))  # workers that need no resources: a group per CPU
    trials = count_trials(config, n_trials)
    pool_size = min(trials, fits, tune_kwargs.get("max_concurrent_trials") or fits)
    tune_kwargs["max_concurrent_trials"] = pool_size  # a trial beyond the pool would wait for a group anyway
    # ... except under PBT/HyperBand, whose whole population must be alive: trial drivers that hold no resources
    # wait for a group in turn; ones that hold some (the user's resources_per_trial) would starve the workers.
    driver = tune_kwargs["resources_per_trial"]
    light = isinstance(driver, dict) and not any(trial_driver_need(driver).values())
    population = min(trials, limit or trials) if light else pool_size
    return SearchPlan(param_space=config, mode=mode, scope=scope,
                          compute_objective=compute_objective or default_compute_objective,
                          tune_kwargs=tune_kwargs, pool_size=pool_size, population=population)


def share_trainer(trainer: Any, settings: Any) -> tuple[list, dict]:
    """What every trial starts from, in the object store once: the Trainer's recipe (its datasets put there once
    too), its callbacks and the search's settings; and the Ray Data streams to hand to Ray Train."""
    import ray

    from raytrainer import checks
    from raytrainer.backend.user_code import send_by_value
    from raytrainer.backend.session import worker_callbacks

    checks.check_dataset(trainer, trainer.train_dataset, "training", needs_labels=True)
    ray_datasets: dict = {}
    recipe = trainer._recipe(ray_datasets, keep=False)  # a trial builds its own Trainer
    callbacks = worker_callbacks(trainer.callback_handler.callbacks)
    send_by_value([type(trainer), *recipe.init_args, *recipe.init_kwargs.values(), *recipe.changed.values(),
                   *callbacks, settings.compute_objective, settings.hp_name])
    return [ray.put(recipe), ray.put(callbacks), ray.put(settings)], ray_datasets
