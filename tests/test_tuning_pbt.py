"""Population-based training that explores: after an exploit, a trial goes on from the donor's checkpoint (weights,
optimizer moments, step) with its own perturbed hyperparameters in force from its next step."""

import json
import os

import pytest
import torch
import transformers
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from safetensors.torch import load_file
from transformers import TrainerCallback

from _tuning_fixtures import make_trainer, regression_model
from helpers import RegressionModel
from helpers import regression_dataset as regression_data
from raytrainer.tune.exploit import ResumeWithTrialHyperparameters
from raytrainer.tune.results import continue_schedule
from raytrainer.tune.trial_config import finished_run

GOOD_LR, SLOW_LR = 0.5, 1e-3  # see test_tuning.py: lr 0.5 fits the regression in 20 steps, 1e-3 barely moves
# What an exploited trial trains with from then on: every value differs from both trials' own.
PERTURBED = {"learning_rate": 0.2, "weight_decay": 0.001, "warmup_steps": 16, "adam_beta1": 0.8, "max_grad_norm": 0.5}
MAX_STEPS, EXPLOIT_STEP = 20, 12  # an evaluation every 2 steps; PBT perturbs every 6 evaluations: once, at step 12


class RecordTraining(TrainerCallback):
    """On the workers: appends what each run does to a JSON-lines file (the run is its output folder's name)."""

    def __init__(self, path):
        self.path = path

    def _write(self, args, **entry):
        with open(self.path, "a") as file:
            file.write(json.dumps({"run": os.path.basename(args.output_dir), **entry}) + "\n")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        moments = [optimizer.state[p]["exp_avg"].item() for p in (model.a, model.b) if p in optimizer.state]
        self._write(args, event="begin", step=state.global_step, a=model.a.item(), b=model.b.item(), exp_avg=moments)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        group = optimizer.param_groups[0]  # the settings this step uses
        self._write(args, event="step", step=state.global_step, lr=group["lr"], weight_decay=group["weight_decay"],
                    betas=list(group["betas"]), max_grad_norm=args.max_grad_norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "learning_rate" in logs:
            self._write(args, event="log", step=state.global_step, learning_rate=logs["learning_rate"])


class LoggedLearningRates(TrainerCallback):
    def __init__(self):
        self.by_step = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "learning_rate" in logs:
            self.by_step[state.global_step] = logs["learning_rate"]


def transformers_learning_rates(args: dict) -> dict[int, float]:
    """The learning rate transformers logs at each step of a fresh in-process run with `args` (its own schedule)."""
    logged = LoggedLearningRates()
    trainer = transformers.Trainer(model=RegressionModel(), train_dataset=regression_data(128, 0), callbacks=[logged],
                                   args=transformers.TrainingArguments(
                                       output_dir="unused", max_steps=MAX_STEPS, per_device_train_batch_size=16,
                                       logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                       use_cpu=True, **args))
    trainer.pop_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    return logged.by_step


def test_pbt_exploit_goes_on_from_the_donor_with_the_perturbed_hyperparameters(ray_session, tmp_path):
    record = tmp_path / "training.jsonl"
    trainer = make_trainer(tmp_path / "out", eval_steps=2, logging_steps=1, callbacks=[RecordTraining(str(record))])
    scheduler = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=6, synch=True,
                                        hyperparam_mutations={"learning_rate": [SLOW_LR, GOOD_LR],
                                                              "weight_decay": [0.0, 0.25]},
                                        custom_explore_fn=lambda config: {**config, **PERTURBED})
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": tune.grid_search([GOOD_LR, SLOW_LR]), "weight_decay": 0.0},
        n_trials=1, scheduler=scheduler)
    assert scheduler._num_perturbations == 1
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    configs = {f"run-{t.trial_id}": t.config for t in best.run_summary.trials}
    (exploited,) = [run for run, config in configs.items() if "warmup_steps" in config]
    (donor,) = set(configs) - {exploited}
    # Synchronous PBT pauses both trials at step 12; the exploited one resumes from the donor's checkpoint.
    (restored,) = [e for e in entries if e["event"] == "begin" and e["step"] > 0 and e["run"] == exploited]
    assert restored["step"] == EXPLOIT_STEP
    before, after = entries[:entries.index(restored)], entries[entries.index(restored) + 1:]

    # The donor's checkpoint: the restored trial starts from exactly its weights and Adam moments.
    folder = tmp_path / "out" / donor / f"checkpoint-{EXPLOIT_STEP}"
    weights = load_file(str(folder / "model.safetensors"))
    assert [restored["a"], restored["b"]] == [weights["a"].item(), weights["b"].item()]
    moments = torch.load(str(folder / "optimizer.pt"), weights_only=True)["state"]
    assert restored["exp_avg"] == [moments[0]["exp_avg"].item(), moments[1]["exp_avg"].item()]

    # From its next step on, the perturbed values are in force: the optimizer's settings, the clipping, and the
    # learning rate of transformers' own schedule for the perturbed arguments (warmup 16: still warming up).
    reference = transformers_learning_rates({k: v for k, v in PERTURBED.items() if k != "max_grad_norm"})
    steps = [e for e in after if e["event"] == "step" and e["run"] == exploited]
    assert steps[0]["step"] == EXPLOIT_STEP
    assert steps[0]["lr"] == pytest.approx(PERTURBED["learning_rate"] * EXPLOIT_STEP / 16, rel=1e-9)
    for step in steps:
        assert (step["weight_decay"], step["betas"], step["max_grad_norm"]) == (0.001, [0.8, 0.999], 0.5)
    logged = {e["step"]: e["learning_rate"] for e in after if e["event"] == "log" and e["run"] == exploited}
    assert sorted(logged) == list(range(EXPLOIT_STEP + 1, MAX_STEPS + 1))
    assert logged == pytest.approx({step: reference[step] for step in logged}, rel=1e-6)
    donor_logged = {e["step"]: e["learning_rate"] for e in entries if e["event"] == "log" and e["run"] == donor}
    assert all(abs(logged[step] - donor_logged[step]) > 1e-3 for step in logged)  # not the donor's schedule
    assert all(e["weight_decay"] == 0.0 for e in before if e["event"] == "step")

    # The best run reports the configs its model was trained with, by step: the donor's up to the exploit.
    donor_config, exploited_config = configs[donor], configs[exploited]
    assert donor_config["weight_decay"] == 0.0 and exploited_config == {**donor_config, **PERTURBED}
    schedules = {donor[len("run-"):]: [(0, donor_config)],
                 exploited[len("run-"):]: [(0, donor_config), (EXPLOIT_STEP, exploited_config)]}
    assert best.hyperparameter_schedule == schedules[best.run_id]
    assert best.hyperparameters == schedules[best.run_id][-1][1]


# ---------------------------------------------------------------------------------------------- without Ray


def in_process_run(output_dir, resume_from=None, keep_trial_settings=True, **args):
    """A transformers.Trainer run of the regression (a checkpoint every 12 steps), resumed from `resume_from`."""
    logged = LoggedLearningRates()
    trainer = transformers.Trainer(model_init=regression_model, train_dataset=regression_data(128, 0),
                                   callbacks=[logged], args=transformers.TrainingArguments(
                                       output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=16,
                                       logging_steps=1, save_strategy="steps", save_steps=EXPLOIT_STEP,
                                       report_to="none", disable_tqdm=True, use_cpu=True, seed=11, **args))
    trainer.pop_callback(transformers.trainer_callback.PrinterCallback)
    if keep_trial_settings:
        trainer.add_callback(ResumeWithTrialHyperparameters(trainer))
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, logged.by_step


def test_a_run_resumed_from_another_runs_checkpoint_follows_its_own_schedule(tmp_path):
    run = dict(lr_scheduler_type="cosine", warmup_steps=4)  # the Ray test above has the linear schedule
    in_process_run(tmp_path / "donor", learning_rate=GOOD_LR, **run)
    donor_checkpoint = str(tmp_path / "donor" / f"checkpoint-{EXPLOIT_STEP}")
    perturbed = dict(run, learning_rate=0.2, warmup_steps=16, weight_decay=0.001, adam_beta2=0.99, adam_epsilon=1e-6)
    _, fresh = in_process_run(tmp_path / "fresh", **perturbed)
    trainer, resumed = in_process_run(tmp_path / "resumed", resume_from=donor_checkpoint, **perturbed)
    # From the donor's step on, the learning rate is the one a run with the perturbed arguments has at that step.
    assert resumed == pytest.approx({step: fresh[step] for step in range(EXPLOIT_STEP + 1, MAX_STEPS + 1)}, rel=1e-9)
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.001, (0.9, 0.99), 1e-6)
    # transformers alone resumes the donor's schedule and settings (a resumed run is meant to be the same run).
    untouched, donors = in_process_run(tmp_path / "untouched", resume_from=donor_checkpoint, keep_trial_settings=False,
                                       **perturbed)
    assert donors[EXPLOIT_STEP + 1] != pytest.approx(fresh[EXPLOIT_STEP + 1])
    assert untouched.optimizer.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("field", ["per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                                   "num_train_epochs", "seed", "optim", "num_workers"])
def test_pbt_refuses_to_mutate_a_field_fixed_during_a_run(tmp_path, field):
    # No Ray is started: the check runs on the driver before anything else.
    scheduler = PopulationBasedTraining(hyperparam_mutations={"learning_rate": [0.1, 0.2], field: [1, 2]})
    with pytest.raises(ValueError, match=f"hyperparam_mutations includes '{field}', which cannot change in the middle "
                                         "of a run: "):
        make_trainer(tmp_path, eval_steps=2).hyperparameter_search(
            hp_space=lambda trial: {"learning_rate": tune.choice([0.1, 0.2])}, n_trials=2, scheduler=scheduler)


def test_pbt_mutation_keys_must_be_training_arguments_fields(tmp_path):
    scheduler = PopulationBasedTraining(hyperparam_mutations={"hidden_size": [64, 128]})
    with pytest.raises(ValueError, match="hyperparam_mutations has keys that are not TrainingArguments fields: "
                                         r"\['hidden_size'\]"):
        make_trainer(tmp_path, eval_steps=2).hyperparameter_search(
            hp_space=lambda trial: {"learning_rate": tune.choice([0.1, 0.2])}, n_trials=2, scheduler=scheduler)


def test_a_finished_runs_checkpoint_is_told_apart(tmp_path):
    for name, state, finished in (("end", {"global_step": 20, "max_steps": 20}, True),
                                  ("middle", {"global_step": 12, "max_steps": 20}, False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(state))
        assert finished_run(str(tmp_path / name)) is finished
    assert finished_run(str(tmp_path / "missing")) is False


def test_a_schedule_continues_the_one_that_made_the_checkpoint():
    a, b, c = {"learning_rate": 0.5}, {"learning_rate": 0.1}, {"learning_rate": 0.02}
    assert continue_schedule(None, a) == ((0, a),)
    assert continue_schedule((8, ((0, a),)), a) == ((0, a),)  # a pause: the same run goes on
    assert continue_schedule((8, ((0, a),)), b) == ((0, a), (8, b))  # an exploit
    # Cloned at step 12 from a run exploited at 8 and again at 16: only what made the step-12 checkpoint counts.
    assert continue_schedule((12, ((0, a), (8, b), (16, a))), c) == ((0, a), (8, b), (12, c))


def test_a_pbt_population_larger_than_the_pool_is_one_population(ray_session, tmp_path):
    """3 trials, workers that fit one at a time: the 3 take turns on one group, and synchronous PBT compares all 3
    at each perturbation (no trial goes past it before every trial got there), not one small population after
    another; and no trial trains past max_steps (PBT perturbs at the last evaluation, step 8, too)."""
    trainer = make_trainer(tmp_path / "out", max_steps=8, eval_steps=2, resources_per_worker={"CPU": 5})
    reported: list[tuple[str, int]] = []

    class Order(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            reported.append((trial.trial_id, result["training_iteration"], result["step"]))

    scheduler = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, synch=True,
                                        hyperparam_mutations={"learning_rate": [SLOW_LR, 0.1, GOOD_LR]})
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": tune.grid_search([SLOW_LR, 0.1, GOOD_LR])},
        n_trials=1, scheduler=scheduler, callbacks=[Order()])
    trainer.close()
    trials = {trial.trial_id for trial in best.run_summary.trials}
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in best.run_summary.trials)
    first_past = next(i for i, (_, iteration, _) in enumerate(reported) if iteration > 2)
    assert {trial for trial, iteration, _ in reported[:first_past] if iteration == 2} == trials
    assert scheduler._num_perturbations >= 1
    # PBT also pauses (and may exploit) at the last evaluation: a trial restored from a finished run's checkpoint
    # ends there, it does not train past max_steps.
    assert max(step for *_, step in reported) == 8
