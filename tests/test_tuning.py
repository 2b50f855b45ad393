"""Hyperparameter search on real Ray Tune: each trial trains a tiny regression on Ray Train workers."""

import os
import time

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from transformers import TrainerCallback

from _tuning_fixtures import make_trainer
from helpers import KillWorkerOnce, WorkerPids, killed_pid
from raytrainer import BestRun
from raytrainer.tune.pool import MORE_GROUPS_AFTER_S

# AdamW moves each parameter ~lr per step (linear decay to 0 over 20 steps): lr 0.3-1 fits y = 2x + 3 (eval loss
# ~0.2), 1e-3 barely moves (~11.7), 30 overshoots (~40). Measured with the same data and schedule.
GOOD_LR, SLOW_LR, WILD_LR = 0.5, 1e-3, 30.0


def learning_rates(*values):
    return lambda trial: {"learning_rate": tune.grid_search(list(values))}


@pytest.fixture(scope="module")
def lr_search(ray_session, tmp_path_factory):
    """One search shared by the tests below; it is read only: a test that trains or loads builds its own Trainer
    (which takes over the search's idle worker group), so no test sees another's changes."""
    trainer = make_trainer(tmp_path_factory.mktemp("lr_search"))
    return trainer.hyperparameter_search(hp_space=learning_rates(SLOW_LR, GOOD_LR, WILD_LR), n_trials=1)


@pytest.mark.quick
def test_search_finds_known_best_learning_rate(lr_search):
    best = lr_search
    assert isinstance(best, BestRun)
    assert best.hyperparameters == {"learning_rate": GOOD_LR}
    trials = best.run_summary.trials
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in trials)
    last_objectives = {t.config["learning_rate"]: t.last_result["objective"] for t in trials}
    assert best.objective == last_objectives[GOOD_LR] == min(last_objectives.values())
    assert best.objective < 0.5 and last_objectives[SLOW_LR] > 10 and last_objectives[WILD_LR] > 5
    assert all(t.last_result["objective"] == t.last_result["eval_loss"] for t in trials)  # default objective


def test_best_run_checkpoint_loads_a_model_with_the_reported_objective(lr_search, tmp_path):
    trainer, best = make_trainer(tmp_path), lr_search
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


class RecordResults(tune.Callback):
    """Every (step, objective) each trial reported, in order (Tune's saved dataframes keep only the results
    since a trial's last restore)."""

    def __init__(self):
        self.by_trial: dict[str, list] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.by_trial.setdefault(trial.trial_id, []).append((result["step"], result["objective"]))


def test_train_again_with_the_best_hyperparameters(lr_search, tmp_path):
    trainer, best = make_trainer(tmp_path), lr_search
    best.apply_to(trainer)
    assert trainer.args.learning_rate == GOOD_LR
    trainer.train(trial=best.hyperparameters)
    last_evaluation = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    assert last_evaluation["step"] == 20
    assert last_evaluation["eval_loss"] == pytest.approx(best.objective, rel=1e-6)  # same seed, same run


def test_trials_run_on_the_trainers_warm_workers_and_a_failed_trial_spares_the_others(ray_session, tmp_path):
    pid_file = tmp_path / "trial_pids.txt"

    def objective(metrics):  # runs on the trial's rank-0 worker
        with open(pid_file, "a") as file:
            file.write(f"{os.getpid()}\n")
        if metrics["eval_loss"] > 20:
            raise ValueError("the loss exploded")
        return metrics["eval_loss"]

    evaluations = WorkerPids()  # rank 0's process at each call of the Trainer's own
    trainer = make_trainer(tmp_path, callbacks=[evaluations])
    trainer.evaluate()  # starts the Trainer's warm worker group
    warm_pid = evaluations.pids[-1]
    results = RecordResults()
    best = trainer.hyperparameter_search(hp_space=learning_rates(GOOD_LR, WILD_LR, SLOW_LR), n_trials=1,
                                         compute_objective=objective, callbacks=[results])
    trial_pids = [int(line) for line in pid_file.read_text().split()]
    statuses = {t.config["learning_rate"]: t.status for t in best.run_summary.trials}
    context = f"warm pid {warm_pid}, trial pids {trial_pids}, statuses {statuses}, results {results.by_trial}"
    assert trial_pids[0] == warm_pid, context  # the first trial trained on the Trainer's own worker process
    assert statuses == {GOOD_LR: "TERMINATED", WILD_LR: "ERROR", SLOW_LR: "TERMINATED"}, context
    wild = next(t for t in best.run_summary.trials if t.config["learning_rate"] == WILD_LR)
    assert "the loss exploded" in open(wild.error_file).read()
    assert best.hyperparameters == {"learning_rate": GOOD_LR}
    slow = next(t for t in best.run_summary.trials if t.config["learning_rate"] == SLOW_LR)
    assert len(results.by_trial[slow.trial_id]) == 4, context  # the trial after the failed one trained
    trainer.evaluate()  # the search handed a running group back to the Trainer
    assert evaluations.pids[-1] in trial_pids, (evaluations.pids, context)


def test_a_search_starts_on_another_trainers_idle_workers(ray_session, tmp_path):
    """A script that trained one Trainer and searches with another of the same layout: the search's first trial
    runs on the first Trainer's idle worker process instead of closing it and starting a group."""
    pid_file = tmp_path / "trial_pids.txt"

    def objective(metrics):  # runs on the trial's rank-0 worker
        with open(pid_file, "a") as file:
            file.write(f"{os.getpid()}\n")
        return metrics["eval_loss"]

    evaluations = WorkerPids()
    first = make_trainer(tmp_path / "first", callbacks=[evaluations])
    first.evaluate()
    warm_pid = evaluations.pids[-1]
    second = make_trainer(tmp_path / "second")
    best = second.hyperparameter_search(hp_space=learning_rates(GOOD_LR), n_trials=1, compute_objective=objective)
    assert [t.status for t in best.run_summary.trials] == ["TERMINATED"]
    assert {int(line) for line in pid_file.read_text().split()} == {warm_pid}  # an objective per evaluation
    assert first._raytrainer_workers.group is None  # taken over: the first Trainer starts a group if called again


def test_a_trial_whose_worker_is_killed_resumes_from_its_last_checkpoint(ray_session, tmp_path):
    marker = tmp_path / "killed.pid"
    marker.write_text("not yet")  # the first search runs undisturbed: it is the reference
    trainer = make_trainer(tmp_path, eval_steps=2, logging_steps=2, max_failures=1,
                           callbacks=[KillWorkerOnce(5, str(marker))])
    undisturbed, resumed = RecordResults(), RecordResults()
    trainer.hyperparameter_search(hp_space=learning_rates(GOOD_LR), n_trials=1, callbacks=[undisturbed])
    marker.unlink()  # the second search's worker dies at step 5, after the checkpoint of step 4
    best = trainer.hyperparameter_search(hp_space=learning_rates(GOOD_LR), n_trials=1, callbacks=[resumed])
    assert killed_pid(str(marker))  # a worker really was killed
    (reference,), (results,) = undisturbed.by_trial.values(), resumed.by_trial.values()
    # Ray Train restarted the group and the trial went on from step 4: every evaluation once, the same numbers.
    assert [step for step, _ in results] == [step for step, _ in reference] == list(range(2, 21, 2))
    assert [objective for _, objective in results] == pytest.approx([objective for _, objective in reference],
                                                                    rel=1e-5)
    assert best.run_summary.trials[0].status == "TERMINATED"


class TrialStarts(tune.Callback):
    """When each trial started (driver clock); the start of the SLOW_LR trial also leaves a file in `folder`."""

    def __init__(self, folder):
        self.folder, self.started = str(folder), {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.config["learning_rate"], time.monotonic())
        if trial.config["learning_rate"] == SLOW_LR:
            open(os.path.join(self.folder, "second-started"), "w").close()


class HoldUntilTheNextTrialStarts(TrainerCallback):
    """The GOOD_LR trial steps slowly (0.5 s) until the SLOW_LR trial has started, and at its last step waits up to
    120 s for it; it writes the step at which it saw the other trial start. No timing decides the outcome: the
    other trial either starts while this one still holds its group, or the test fails."""

    def __init__(self, folder):
        self.folder = str(folder)

    def on_step_end(self, args, state, control, **kwargs):
        started, seen = (os.path.join(self.folder, name) for name in ("second-started", "seen-at-step"))
        if args.learning_rate != GOOD_LR or os.path.exists(seen):
            return
        deadline = time.monotonic() + (120.0 if state.global_step == state.max_steps - 1 else 0.5)
        while not os.path.exists(started) and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(started):
            with open(seen, "w") as file:
                file.write(str(state.global_step))


def test_a_trial_that_holds_its_group_long_lets_the_next_trials_start_beside_it(ray_session, tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[HoldUntilTheNextTrialStarts(tmp_path)])
    starts = TrialStarts(tmp_path)
    best = trainer.hyperparameter_search(hp_space=learning_rates(GOOD_LR, SLOW_LR), n_trials=1, callbacks=[starts])
    # Tune starts with one trial (its actor process is costly); once that trial has held its group for
    # MORE_GROUPS_AFTER_S, the next one starts beside it (and waits for a group of its own), not after it.
    assert (tmp_path / "seen-at-step").exists(), "the second trial only started after the first one ended"
    assert starts.started[GOOD_LR] + MORE_GROUPS_AFTER_S <= starts.started[SLOW_LR], starts.started
    assert best.hyperparameters == {"learning_rate": GOOD_LR}


class ListSearcher(Searcher):
    """A minimal custom search algorithm: suggests the given learning rates in order."""

    def __init__(self, rates):
        super().__init__()  # no metric/mode: the search gives it "objective" and direction's mode
        self.rates, self.results = list(rates), {}

    def set_search_properties(self, metric, mode, config, **spec):
        self._metric, self._mode = metric, mode
        return True

    def suggest(self, trial_id):
        return {"learning_rate": self.rates.pop(0)} if self.rates else Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.results[trial_id] = result


@pytest.mark.parametrize("limited", [False, True])
def test_a_search_algorithm_of_the_users_suggests_the_trials(lr_search, limited, tmp_path):
    trainer = make_trainer(tmp_path)  # after the shared search: it takes over that search's idle group
    searcher = ListSearcher([SLOW_LR, GOOD_LR])
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=1) if limited else searcher
    best = trainer.hyperparameter_search(hp_space=lambda trial: {"learning_rate": tune.loguniform(1e-4, 1.0)},
                                         n_trials=2, search_alg=search_alg, max_concurrent_trials=2)
    assert (searcher.metric, searcher.mode) == ("objective", "min")
    assert sorted(trial.config["learning_rate"] for trial in best.run_summary.trials) == [SLOW_LR, GOOD_LR]
    assert set(searcher.results) == {trial.trial_id for trial in best.run_summary.trials}  # told of each result
    assert best.hyperparameters == {"learning_rate": GOOD_LR}
    assert best.objective == min(result["objective"] for result in searcher.results.values())
