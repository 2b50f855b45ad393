"""Bad input to `hyperparameter_search` fails on the driver with a clear error, before any trial starts."""

import pickle
import threading

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from transformers import TrainerCallback

from raytrainer import Trainer, TrainingArguments
from raytrainer.tune.results import results_table, trial_score
from raytrainer.tune.pool import TrialConcurrency
from raytrainer.tune.checks import fill_metric_and_mode, plan_trial_resources
from raytrainer.tune.trial_config import apply_hyperparameters
from _tuning_fixtures import make_trainer
from helpers import RegressionModel, regression_dataset


# Each search must fail before a trial (or any worker) starts, also when an earlier test left Ray running; the checks
# that need no cluster resources must fail before Ray is even connected to.
pytestmark = [pytest.mark.usefixtures("no_worker_start"), pytest.mark.quick]
LR_SPACE = lambda trial: {"learning_rate": tune.loguniform(1e-4, 1e-1)}  # noqa: E731


def search_error(trainer, match, error=ValueError, **kwargs):
    kwargs.setdefault("hp_space", LR_SPACE)
    with pytest.raises(error, match=match):
        trainer.hyperparameter_search(n_trials=2, **kwargs)


def test_needs_model_init(tmp_path, no_ray_start):
    trainer = Trainer(model=RegressionModel(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                      train_dataset=regression_dataset(16, 0), eval_dataset=regression_dataset(8, 1))
    search_error(trainer, "needs `model_init`", RuntimeError)


def test_other_backends_are_refused(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "backend='optuna' is not available", backend="optuna")


def test_direction_must_be_minimize_or_maximize(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "direction='up' is invalid", direction="up")
    search_error(make_trainer(tmp_path), "direction=.* is invalid", direction=["minimize", "maximize"])


def test_hp_space_must_return_a_dict(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "hp_space returned list", TypeError,
                 hp_space=lambda trial: [tune.uniform(0, 1)])


def test_unknown_search_space_key_is_an_error_with_a_suggestion(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "'learning_rat' \\(did you mean 'learning_rate'\\?\\)",
                 hp_space=lambda trial: {"learning_rat": tune.uniform(0, 1)})


def test_worker_layout_cannot_be_searched(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "num_workers", hp_space=lambda trial: {"num_workers": tune.choice([1, 2])})


def test_scope_must_be_last_or_all(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "scope='best' is invalid", scope="best")


def test_n_trials_must_be_positive(tmp_path, no_ray_start):
    with pytest.raises(ValueError, match="n_trials=0 is invalid"):
        make_trainer(tmp_path).hyperparameter_search(hp_space=LR_SPACE, n_trials=0)


def test_max_concurrent_trials_must_be_a_whole_number_of_one_or_more(tmp_path, no_ray_start):
    for limit in (0, -2, 1.5):
        search_error(make_trainer(tmp_path), f"max_concurrent_trials={limit} is invalid", max_concurrent_trials=limit)


def test_needs_an_eval_dataset(tmp_path, no_ray_start):
    trainer = make_trainer(tmp_path, eval_strategy="no")
    trainer.eval_dataset = None
    search_error(trainer, "needs an eval_dataset")


def test_early_stopping_scheduler_needs_evaluation_during_training(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path, eval_strategy="no"), "eval_strategy='no'",
                 scheduler=ASHAScheduler(max_t=4))


def test_scheduler_metric_that_is_never_reported(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "metric='eval_accuracy', which trials never report",
                 scheduler=MedianStoppingRule(metric="eval_accuracy", mode="max"))


def test_tune_arguments_that_would_break_trials(tmp_path, no_ray_start):
    search_error(make_trainer(tmp_path), "num_samples", num_samples=3)
    search_error(make_trainer(tmp_path), "metric='eval_loss'", metric="eval_loss")


class CallbackWithLock(TrainerCallback):
    def __init__(self):
        self.lock = threading.Lock()


def test_unpicklable_callback_is_named(tmp_path, no_ray_start):
    trainer = make_trainer(tmp_path)
    trainer.add_callback(CallbackWithLock())
    search_error(trainer, "CallbackWithLock", TypeError)


def test_trial_that_can_never_fit_the_cluster(ray_session, tmp_path):
    search_error(make_trainer(tmp_path, num_workers=64), "need 64 CPU .* can never provide")


def test_trial_drivers_that_would_starve_their_workers(ray_session, tmp_path):
    search_error(make_trainer(tmp_path, num_workers=4), "max_concurrent_trials=4 .*at most 1 trials",
                 resources_per_trial={"cpu": 1}, max_concurrent_trials=4)


# ---------------------------------------------------------------------------------------------- pure helpers


def test_trial_resources_hold_no_cpu_and_concurrency_fits_the_workers():
    kwargs = {}
    plan_trial_resources(kwargs, {"CPU": 2}, {"CPU": 8, "memory": 1e9})
    assert kwargs == {"resources_per_trial": {"cpu": 0, "memory": 1}, "max_concurrent_trials": 4}
    kwargs = {}
    plan_trial_resources(kwargs, {"CPU": 2}, {"CPU": 2})
    assert kwargs["max_concurrent_trials"] == 1
    kwargs = {"resources_per_trial": {"cpu": 1}}
    plan_trial_resources(kwargs, {"CPU": 1}, {"CPU": 8})
    assert kwargs["max_concurrent_trials"] == 4


def test_scheduler_gets_objective_and_mode_but_keeps_its_own():
    asha = ASHAScheduler()
    fill_metric_and_mode(asha, "max")
    assert (asha.metric, asha._mode) == ("objective", "max")
    own = ASHAScheduler(metric="eval_loss", mode="min")
    fill_metric_and_mode(own, "max")
    assert (own.metric, own._mode) == ("eval_loss", "min")


def test_hyperparameters_are_cast_like_transformers(tmp_path, no_ray_start):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    trial_args = apply_hyperparameters(args, {"seed": 7.9, "learning_rate": 0.01, "num_train_epochs": 2},
                                       output_dir=str(tmp_path / "run-x"))
    assert (trial_args.seed, trial_args.learning_rate, trial_args.num_train_epochs) == (7, 0.01, 2.0)
    assert trial_args.output_dir == str(tmp_path / "run-x") and args.seed == 42  # the original is untouched
    pickle.dumps(trial_args)


def test_scope_picks_last_or_best_evaluation():
    results = [{"objective": 3.0}, {"objective": 1.0}, {"objective": 2.0}]
    assert trial_score(results, "min", "last")["objective"] == 2.0
    assert trial_score(results, "min", "all")["objective"] == 1.0
    assert trial_score(results, "max", "all")["objective"] == 3.0
    assert trial_score([], "min", "last") is None


def test_results_table_sorts_by_objective():
    class FakeTrial:  # only the attributes the table reads
        def __init__(self, trial_id, status):
            self.trial_id, self.status, self.config = trial_id, status, {"learning_rate": 0.1}

    trials = [FakeTrial("a", "TERMINATED"), FakeTrial("b", "TERMINATED"), FakeTrial("c", "ERROR")]
    results = {"a": [{"objective": 3.0}, {"objective": 2.0}], "b": [{"objective": 1.0}]}
    lines = results_table(trials, results, {"b"}, "min", "last").splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["b", "a", "c"]
    assert "stopped early" in lines[2] and "completed" in lines[3] and "error" in lines[4]


class StaticSearcher(Searcher):
    """A search algorithm that suggests one fixed configuration."""

    def suggest(self, trial_id):
        return {"learning_rate": 0.1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


@pytest.mark.parametrize("scheduler", [None, ASHAScheduler(), MedianStoppingRule()])
def test_tune_starts_one_trial_and_opens_up_to_the_pool(scheduler):
    kwargs = {"scheduler": scheduler, "max_concurrent_trials": 4}
    concurrency = TrialConcurrency(kwargs, limit=4)
    assert "max_concurrent_trials" not in kwargs and isinstance(kwargs["search_alg"], BasicVariantGenerator)
    assert kwargs["search_alg"].max_concurrent == 1
    concurrency.open_up()
    assert kwargs["search_alg"].max_concurrent == 4
    searcher = StaticSearcher(metric="objective", mode="min")
    kwargs = {"scheduler": scheduler, "search_alg": searcher}
    concurrency = TrialConcurrency(kwargs, limit=3)
    limiter = kwargs["search_alg"]
    assert isinstance(limiter, ConcurrencyLimiter) and limiter.searcher is searcher and limiter.max_concurrent == 1
    concurrency.open_up()
    assert limiter.max_concurrent == 3


def test_schedulers_that_pause_trials_get_every_trial_at_once():
    pbt = PopulationBasedTraining(hyperparam_mutations={"learning_rate": [0.1, 0.2]})
    for scheduler, limit in ((pbt, 4), (HyperBandScheduler(), 3), (None, 1)):
        kwargs = {"scheduler": scheduler}
        TrialConcurrency(kwargs, limit=limit).open_up()
        assert kwargs == {"scheduler": scheduler, "max_concurrent_trials": limit}
    # A population larger than the pool is alive at once (its trials take turns on the groups); others get the pool.
    for scheduler, alive in ((pbt, 6), (HyperBandScheduler(), 6), (ASHAScheduler(), None), (None, None)):
        kwargs = {"scheduler": scheduler}
        TrialConcurrency(kwargs, limit=2, population=6)
        assert kwargs.get("max_concurrent_trials") == alive


def test_a_users_own_concurrency_limit_is_kept():
    limiter = ConcurrencyLimiter(StaticSearcher(metric="objective", mode="min"), max_concurrent=2)
    kwargs = {"search_alg": limiter, "max_concurrent_trials": 4}
    TrialConcurrency(kwargs, limit=4).open_up()  # Tune refuses max_concurrent_trials beside a ConcurrencyLimiter
    assert kwargs == {"search_alg": limiter} and limiter.max_concurrent == 2
