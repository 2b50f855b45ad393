"""Hyperparameter search on real Ray Tune: each trial trains a tiny regression on Ray Train workers."""

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

from _tuning_fixtures import make_trainer
from raytrainer import BestRun

# AdamW moves each parameter ~lr per step (linear decay to 0 over 20 steps): lr 0.3-1 fits y = 2x + 3 (eval loss
# ~0.2), 1e-3 barely moves (~11.7), 30 overshoots (~40). Measured with the same data and schedule.
GOOD_LR, SLOW_LR, WILD_LR = 0.5, 1e-3, 30.0


def learning_rates(*values):
    return lambda trial: {"learning_rate": tune.grid_search(list(values))}


@pytest.fixture(scope="module")
def lr_search(ray_session, tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("lr_search"))
    best = trainer.hyperparameter_search(hp_space=learning_rates(SLOW_LR, GOOD_LR, WILD_LR), n_trials=1)
    return trainer, best


def test_search_finds_known_best_learning_rate(lr_search):
    trainer, best = lr_search
    assert isinstance(best, BestRun)
    assert best.hyperparameters == {"learning_rate": GOOD_LR}
    trials = best.run_summary.trials
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in trials)
    last_objectives = {t.config["learning_rate"]: t.last_result["objective"] for t in trials}
    assert best.objective == last_objectives[GOOD_LR] == min(last_objectives.values())
    assert best.objective < 0.5 and last_objectives[SLOW_LR] > 10 and last_objectives[WILD_LR] > 5
    assert all(t.last_result["objective"] == t.last_result["eval_loss"] for t in trials)  # default objective


def test_best_run_checkpoint_loads_a_model_with_the_reported_objective(lr_search):
    trainer, best = lr_search
    assert best.checkpoint is not None
    model = best.load_model(trainer)
    assert trainer.model is model
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best.objective, rel=1e-6)


def test_asha_stops_a_trial_early_and_finds_the_best(ray_session, tmp_path):
    trainer = make_trainer(tmp_path, eval_steps=2, logging_steps=2)
    scheduler = ASHAScheduler(max_t=10, grace_period=2, reduction_factor=2)  # metric/mode filled in
    best = trainer.hyperparameter_search(hp_space=learning_rates(GOOD_LR, SLOW_LR, WILD_LR), n_trials=1,
                                         scheduler=scheduler, max_concurrent_trials=2)
    assert (scheduler.metric, scheduler._mode) == ("objective", "min")
    counts = {t.config["learning_rate"]: t.last_result["training_iteration"] for t in best.run_summary.trials}
    assert counts[GOOD_LR] == 10  # 20 steps, an evaluation every 2
    assert min(counts.values()) < 10, counts
    assert best.hyperparameters == {"learning_rate": GOOD_LR}


def test_pbt_exploit_restores_a_better_trials_checkpoint(ray_session, tmp_path):
    trainer = make_trainer(tmp_path, eval_steps=2, logging_steps=2)
    # 42 steps = 21 evaluations: the slow trial meets a perturbation point (every 4th evaluation) while the good one
    # still runs, even when one trial starts late on a busy machine, and the last perturbation point (step 40) is
    # not the end of training, so a trial restored from any perturbation checkpoint still trains and reports.
    space = lambda trial: {"learning_rate": tune.grid_search([GOOD_LR, SLOW_LR]), "max_steps": 42}  # noqa: E731
    scheduler = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=4,
                                        hyperparam_mutations={"learning_rate": [SLOW_LR, GOOD_LR]})
    best = trainer.hyperparameter_search(hp_space=space, n_trials=1, scheduler=scheduler, scope="all")
    assert scheduler._num_perturbations >= 1
    frames = best.run_summary.trial_dataframes
    good, slow = (frames[t.trial_id] for t in sorted(best.run_summary.trials, key=lambda t: t.trial_id))
    # The slow trial's first results are its own (loss ~11.7); after the exploit it continues from the good
    # trial's checkpoint, with the good trial's weights, optimizer, schedule and data order: the same numbers.
    assert slow["objective"].iloc[0] > 10
    restored = slow[slow["objective"] < 1]
    assert len(restored) > 0
    first = restored.iloc[0]
    same_step = good[good["step"] == first["step"]]
    assert same_step["objective"].iloc[0] == pytest.approx(first["objective"], rel=1e-5)


def test_train_again_with_the_best_hyperparameters(lr_search):
    trainer, best = lr_search
    best.apply_to(trainer)
    assert trainer.args.learning_rate == GOOD_LR
    trainer.train(trial=best.hyperparameters)
    last_evaluation = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    assert last_evaluation["step"] == 20
    assert last_evaluation["eval_loss"] == pytest.approx(best.objective, rel=1e-6)  # same seed, same run
