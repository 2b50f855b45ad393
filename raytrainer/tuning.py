"""Hyperparameter search on Ray Tune: `Trainer.hyperparameter_search`, each trial trained by Ray Train workers.

The driver validates everything, builds one picklable trial job (datasets already in the object store), and
runs `ray.tune.run`. Each trial is a light Tune function trainable (`trial.py`) that trains on one of the
search's warm Ray Train worker groups (`trial_pool.py`: started once, shared by the trials one at a time, adopted
from and handed back to the Trainer); every evaluation reaches Tune with its metrics plus `objective`, so
schedulers (ASHA, PBT, ...) act mid-training. The result is a transformers-style `BestRun` plus the best trial's
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from typing import Any, Callable, NamedTuple

import transformers
from transformers.trainer_utils import default_compute_objective, default_hp_space_ray

from raytrainer.trial import CHECKPOINT_PATH  # the result key Ray's own Tune+Train integration uses

DIRECTIONS = {"minimize": "min", "maximize": "max"}
SCOPES = ("last", "all")
OBJECTIVE = "objective"
# Ray fields that fix the shape of every trial; searching over them would change the resources per trial.
UNSEARCHABLE_FIELDS = frozenset({"num_workers", "use_gpu", "resources_per_worker", "placement_strategy",
                                 "max_failures", "storage_path", "ray_address", "output_dir"})
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

        from raytrainer import checkpoints

        folder = self.checkpoint
        if folder is not None and "://" in folder:  # persisted to remote storage (storage_path="s3://...")
            folder = Checkpoint(folder).to_directory()
        if folder is None or not os.path.isdir(folder):
            raise ValueError(f"The best run's checkpoint {self.checkpoint!r} does not exist (deleted, or on another "
                             "machine's disk): set storage_path to shared storage to keep trial checkpoints.")
        model = trainer.call_model_init(self.hyperparameters)
        checkpoints.load_model_weights(model, folder)
        trainer.model = model
        return model

    def apply_to(self, trainer: Any) -> None:
        """Set the best hyperparameters on `trainer.args`, so that `trainer.train(trial=best_run.hyperparameters)`
        (the trial dict reaches a one-argument `model_init`) trains the best configuration again."""
        trainer.args = apply_hyperparameters(trainer.args, self.hyperparameters)


@dataclasses.dataclass
class SearchSettings:
    """Everything the driver decided before the first trial starts."""

    param_space: dict[str, Any]
    mode: str
    scope: str
    compute_objective: Callable[[dict[str, float]], float]
    tune_kwargs: dict[str, Any]
    pool_size: int  # warm worker groups the trials share (as many as run side by side)


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


def check_search_space(hp_space: Callable | None, args: transformers.TrainingArguments) -> dict[str, Any]:
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
    known = reported_metric_names(trainer)
    metric = scheduler.metric
    if known is not None and metric not in known:
        raise ValueError(f"{type(scheduler).__name__} uses metric={metric!r}, which trials never report (they "
                         f"report {sorted(known)}). Use metric='objective' (or leave metric unset).")
    if known is None and metric not in REPORTED_METRICS and not str(metric).startswith("eval_"):
        raise ValueError(f"{type(scheduler).__name__} uses metric={metric!r}, which trials never report: they "
                         "report 'objective' and the evaluation metrics (named 'eval_*').")


# ---------------------------------------------------------------------------------------------- resources


def worker_resources(args: transformers.TrainingArguments, cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's Ray Train workers need together (they start their own placement group)."""
    from raytrainer.arguments import ray_settings

    settings = ray_settings(args)
    use_gpu = settings["use_gpu"]
    if use_gpu is None:
        use_gpu = cluster.get("GPU", 0) > 0 and not args.use_cpu
    per_worker = dict(settings["resources_per_worker"] or {"CPU": 1})
    if use_gpu:
        per_worker.setdefault("GPU", 1)
    return {name: amount * settings["num_workers"] for name, amount in per_worker.items() if amount}


def plan_trial_resources(tune_kwargs: dict[str, Any], workers: dict[str, float],
                         cluster: dict[str, float]) -> int | None:
    """Set `resources_per_trial` and `max_concurrent_trials` so that trials never starve their own workers;
    return how many trials (with their workers) fit side by side, None when nothing limits it.

    A Tune trial here only relays a warm worker group's results, so by default it holds no CPU (just 1 byte of
    memory, as Tune needs some resource); the groups ask Ray for the workers' resources. Concurrency is capped at
    what the cluster can run side by side, so no trial waits forever for workers that other trials' drivers block.
    """
    missing = {name: (amount, cluster.get(name, 0)) for name, amount in workers.items()
               if amount > cluster.get(name, 0)}
    if missing:
        details = ", ".join(f"{amount:g} {name} (the cluster has {have:g})" for name, (amount, have) in missing.items())
        raise ValueError(f"One trial's Ray Train workers need {details}, which this Ray cluster can never provide, so "
                         "no trial could start. Lower num_workers or resources_per_worker, or use a larger cluster.")
    driver = tune_kwargs.setdefault("resources_per_trial", {"cpu": 0, "memory": 1})
    if isinstance(driver, dict):
        driver_need = {"CPU": driver.get("cpu", driver.get("CPU", 0)), "GPU": driver.get("gpu", driver.get("GPU", 0))}
    else:  # a PlacementGroupFactory: the user sized the trials themselves
        driver_need = {name: amount for name, amount in driver.required_resources.items() if name in ("CPU", "GPU")}
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


# ---------------------------------------------------------------------------------------------- trial arguments


def apply_hyperparameters(args: transformers.TrainingArguments, hyperparameters: dict[str, Any],
                          output_dir: str | None = None) -> transformers.TrainingArguments:
    """A copy of `args` with the trial's values set, cast to each field's type as transformers does."""
    args = copy.deepcopy(args)
    fields = {f.name for f in dataclasses.fields(args) if f.init}
    for key, value in hyperparameters.items():
        if key not in fields:
            raise ValueError(f"Hyperparameter {key!r} is not a {type(args).__name__} field; every key of the search "
                             "space must be one.")
        old = getattr(args, key)
        if old is not None and not isinstance(old, (list, dict)) and not isinstance(value, type(old)):
            value = type(old)(value)  # e.g. the default space's float seed -> int, as transformers does
        setattr(args, key, value)
    if output_dir is not None:
        args.output_dir = output_dir
        if hasattr(args, "logging_dir"):
            args.logging_dir = os.path.join(output_dir, "runs")
    return args


# ---------------------------------------------------------------------------------------------- the search


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
        `BestRun(run_id, objective, hyperparameters, run_summary, checkpoint)`. `best_run.load_model(trainer)`
        puts the best trial's trained model in `trainer.model`; `best_run.apply_to(trainer)` then
        `trainer.train(trial=best_run.hyperparameters)` trains the best configuration again.
    """
    settings = prepare_search(trainer, hp_space, compute_objective, n_trials, direction, backend, scope, kwargs)
    import ray
    from ray import tune

    from raytrainer.orchestration import WorkerGroupSpec
    from raytrainer.search_results import make_progress_callback, summarize_search
    from raytrainer.trial import run_trial
    from raytrainer.trial_pool import SearchGroups, TrialConcurrency, tune_callback
    from raytrainer.trial_worker import TrialJob
    from raytrainer.worker_group import close_all_worker_groups

    job, ray_datasets = build_shared_job(trainer)
    trial_job = TrialJob(job=job, compute_objective=settings.compute_objective,
                         output_dir=os.path.abspath(trainer.args.output_dir), hp_name=hp_name)
    adopted = trainer._lend_workers(usable=not ray_datasets)  # the Trainer's warm workers serve the first trials
    close_all_worker_groups(idle_only=True, keep=adopted)  # other Trainers' idle workers would hold resources
    tune_kwargs = dict(settings.tune_kwargs)
    concurrency = TrialConcurrency(tune_kwargs, settings.pool_size)
    groups = SearchGroups(WorkerGroupSpec.of(trainer.args), settings.pool_size, ray_datasets, adopted=adopted,
                          concurrency=concurrency)
    try:
        progress = make_progress_callback(settings.mode, settings.scope)
        tune_kwargs["callbacks"] = [progress, tune_callback(groups), *(tune_kwargs.get("callbacks") or [])]
        trainable = tune.with_parameters(
            run_trial, pool=groups.lender, trial_job=[ray.put(trial_job)],
            report_checkpoints=is_population_based(tune_kwargs.get("scheduler")))
        analysis = tune.run(trainable, config=settings.param_space, num_samples=n_trials, **tune_kwargs)
    finally:
        trainer._take_workers(groups.close(keep_one=True))
    return summarize_search(analysis, progress.results, progress.stopped, settings.mode, settings.scope)


def is_population_based(scheduler: Any) -> bool:
    from ray.tune.schedulers import PopulationBasedTraining

    return isinstance(scheduler, PopulationBasedTraining)


def prepare_search(trainer: Any, hp_space: Callable | None, compute_objective: Callable | None, n_trials: int,
                   direction: str, backend: Any, scope: str, kwargs: dict[str, Any]) -> SearchSettings:
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

    from raytrainer.arguments import ray_settings
    from raytrainer.orchestration import ensure_ray

    ensure_ray(ray_settings(trainer.args)["ray_address"])
    cluster = cluster_resources()
    tune_kwargs = dict(kwargs)
    fits = plan_trial_resources(tune_kwargs, worker_resources(trainer.args, cluster), cluster)
    tune_kwargs.setdefault("storage_path", os.path.abspath(os.path.join(trainer.args.output_dir, "tune")))
    tune_kwargs.setdefault("verbose", 0)
    tune_kwargs.setdefault("raise_on_failed_trial", False)
    tune_kwargs.setdefault("reuse_actors", True)  # a trial actor holds no workers: the next trial starts at once
    fits = fits or max(1, int(cluster.get("CPU", 1)))  # workers that need no resources: a group per CPU
    pool_size = min(count_trials(config, n_trials), fits, tune_kwargs.get("max_concurrent_trials") or fits)
    tune_kwargs["max_concurrent_trials"] = pool_size  # a trial beyond the pool would wait for a group anyway
    return SearchSettings(param_space=config, mode=mode, scope=scope,
                          compute_objective=compute_objective or default_compute_objective,
                          tune_kwargs=tune_kwargs, pool_size=pool_size)


def count_trials(param_space: dict[str, Any], n_trials: int) -> int:
    """How many trials Tune will run: `n_trials` times every combination of the grid-search values."""
    grid = math.prod(len(value["grid_search"]) for value in param_space.values()
                     if isinstance(value, dict) and "grid_search" in value)
    return n_trials * grid


def check_callbacks_picklable(trainer: Any) -> None:
    """Every callback travels to the trials' workers: name the ones that cannot."""
    import ray.cloudpickle as cloudpickle

    broken = []
    for callback in trainer._worker_callbacks():
        try:
            cloudpickle.dumps(callback)
        except Exception as error:  # noqa: BLE001 - any pickling failure is reported the same way
            broken.append(f"{type(callback).__name__} ({error})")
    if broken:
        raise TypeError(f"These callbacks cannot be sent to the trials' Ray Train workers: {'; '.join(broken)}. "
                        "Make them picklable (no open files, locks or clients as attributes) or remove them.")


def build_shared_job(trainer: Any) -> tuple[Any, dict]:
    """The training job every trial starts from, with its datasets put in the object store once."""
    from raytrainer import orchestration

    trainer._check_dataset(trainer.train_dataset, "training", needs_labels=True)
    ray_datasets: dict = {}
    job = trainer._job(ray_datasets, trial=None, train=True)
    job.train_dataset = orchestration.put_datasets(job.train_dataset, trainer._object_store_cache)
    job.eval_dataset = orchestration.put_datasets(job.eval_dataset, trainer._object_store_cache)
    return job, ray_datasets
