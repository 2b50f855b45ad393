"""Hyperparameter-search benchmark: transformers' `Trainer.hyperparameter_search` vs raytrainer's (Ray Tune + ASHA).

Both sides search the same learning rates (a grid, so both see the same candidates, and in the same order: ours follows
the order optuna's GridSampler drew in that repeat) for the same tiny regression (y = 2x + 3, 24 steps of batch 16,
an evaluation every 4 steps), minimizing eval loss:
  (a) transformers.Trainer.hyperparameter_search, optuna backend in-process (GridSampler, optuna's default
      MedianPruner), or its Ray backend when optuna is not installed;
  (b) raytrainer.Trainer.hyperparameter_search on Ray Tune with ASHA, trials on 1-worker Ray Train groups that
      the search keeps warm: "cold" is a Trainer's first search (its workers start), "warm" a second search on
      the same Trainer (on the workers the first one handed back).
Ray is started once before the repeats (like a running cluster); its start-up time is printed separately.
Time to target = seconds from the search's start to the first evaluation within 1% of the best objective that either
side reached in that repeat. Prints a markdown table of medians over repeats and the ratios ours/theirs.

    python bench/hpo.py [--repeats 3] [--trials 8]    (--trials 16: 16 log-spaced rates over the same range)

`--scheduler pbt`: a task where the best learning rate changes during training: a linear regression on 8 features
(4096 examples with label noise 1.0, scored on 256 noise-free ones) fitted by plain SGD with a constant learning rate,
batches of 4, 128 steps (under one epoch), an evaluation every 16: a high rate gets near the fit fast but then jitters
around it with the noise (a floor that grows with the rate), a low one is precise but slow (Adam would not do: its
second moment, filled by the large early gradients, anneals it). All sides are raytrainer searches on one warm Trainer
with the same budget (the same 6 starting rates, 6 trials of at most 128 steps each):
  (a) fixed configs: ASHA over the grid, each trial keeps its rate;
  (b) fixed configs with transformers' linear decay (ASHA): a fixed config that lowers its rate as it goes;
  (c) PBT (synchronous, Ray Tune's defaults but perturbation_interval=1: at every evaluation the bottom quarter
      clones the top quarter's checkpoint and moves its rate one grid step either way, or resamples it), constant
      rates as in (a): only PBT can lower them mid-run.
Time to target = seconds to the first evaluation within 1% of the best objective the fixed configs (a, b) reached.

    python bench/hpo.py --scheduler pbt [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from torch import nn

LEARNING_RATES = [1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0]


def learning_rates(n_trials: int) -> list[float]:
    """The grid: the 8 rates above, or `n_trials` log-spaced rates over the same range."""
    if n_trials <= len(LEARNING_RATES):
        return LEARNING_RATES[:n_trials]
    return [float(rate) for rate in np.geomspace(LEARNING_RATES[0], LEARNING_RATES[-1], n_trials)]
STEPS, EVAL_STEPS, BATCH = 24, 4, 16


class RegressionModel(nn.Module):
    """y = a * x + b: two parameters, an exact loss."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1))
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def regression_data(n: int, seed: int, noise: float = 0.1) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    return datasets.Dataset.from_dict({"input_x": x, "labels": (2 * x + 3 + noise * rng.normal(size=n)).astype(np.float32)})


def common_args(output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, eval_strategy="steps",
                eval_steps=EVAL_STEPS, save_strategy="no", logging_strategy="no", report_to="none",
                disable_tqdm=True, seed=11)


class EvaluationClock(transformers.TrainerCallback):
    """Records (seconds since the search started, eval loss) at every in-process evaluation, and the order in
    which the trials' learning rates come."""

    def __init__(self, start: list, records: list, order: list):
        self.start, self.records, self.order = start, records, order

    def on_train_begin(self, args, state, control, **kwargs):
        self.order.append(args.learning_rate)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.records.append((time.perf_counter() - self.start[0], metrics["eval_loss"]))


def run_transformers(rates: list[float]) -> dict:
    start, records, order = [0.0], [], []
    n_trials = len(rates)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = transformers.Trainer(model_init=RegressionModel,
                                       args=transformers.TrainingArguments(**common_args(output_dir)),
                                       train_dataset=regression_data(128, 0), eval_dataset=regression_data(32, 1),
                                       callbacks=[EvaluationClock(start, records, order)])
        trainer.pop_callback(transformers.trainer_callback.PrinterCallback)  # no per-log prints in the timing
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            backend = "optuna"
            kwargs = dict(sampler=optuna.samplers.GridSampler({"learning_rate": rates}, seed=0),
                          hp_space=lambda trial: {"learning_rate": trial.suggest_categorical("learning_rate", rates)})
        except ImportError:
            from ray import tune

            backend = "ray"
            kwargs = dict(hp_space=lambda trial: {"learning_rate": tune.grid_search(rates)})
            n_trials = 1
        start[0] = time.perf_counter()
        best = trainer.hyperparameter_search(n_trials=n_trials, direction="minimize", backend=backend, **kwargs)
        wall = time.perf_counter() - start[0]
    return {"side": f"transformers ({backend})", "wall": wall, "best": best.objective, "records": records,
            "stopped": None, "order": order or list(rates)}  # the Ray backend's trials record in their processes


def run_raytrainer(order: list[float]) -> tuple[dict, dict]:
    """Two searches on one Trainer: cold (Ray running, no workers yet), then warm (on the workers the first
    search handed back to the Trainer, as a second search or a search after train()/evaluate() runs).
    The grid runs in `order`: the order in which the other side's sampler visited it."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raytrainer import Trainer, TrainingArguments

    sides = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model_init=RegressionModel, args=TrainingArguments(num_workers=1, **common_args(output_dir)),
                          train_dataset=regression_data(128, 0), eval_dataset=regression_data(32, 1))
        for label in ("cold", "warm"):
            start, records = [0.0], []

            class ResultClock(tune.Callback):
                def on_trial_result(self, iteration, trials, trial, result, **info):
                    records.append((time.perf_counter() - start[0], result["objective"]))

            scheduler = ASHAScheduler(max_t=STEPS // EVAL_STEPS, grace_period=2, reduction_factor=2)
            start[0] = time.perf_counter()
            best = trainer.hyperparameter_search(hp_space=lambda trial: {"learning_rate": tune.grid_search(order)},
                                                 n_trials=1, scheduler=scheduler, callbacks=[ResultClock()])
            wall = time.perf_counter() - start[0]
            stopped = sum(1 for t in best.run_summary.trials
                          if t.last_result.get("training_iteration", 0) < STEPS // EVAL_STEPS)
            sides.append({"side": f"raytrainer {label} (Ray Tune + ASHA)", "wall": wall, "best": best.objective,
                          "records": records, "stopped": stopped})
        trainer.close()
    return sides[0], sides[1]


def time_to_target(records: list, target: float) -> float:
    return next((seconds for seconds, objective in records if objective <= target), float("inf"))


PBT_RATES = [0.003, 0.01, 0.03, 0.1, 0.3, 0.6]
PBT_FEATURES, PBT_TRAIN, PBT_EVAL, PBT_NOISE = 8, 4096, 256, 1.0
PBT_STEPS, PBT_EVAL_STEPS, PBT_BATCH = 128, 16, 4


class LinearModel(nn.Module):
    """y = w . x + b over PBT_FEATURES inputs, from zero: an exact loss."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(PBT_FEATURES, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, input_x, labels=None):
        y = self.linear(input_x).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def linear_data(n: int, seed: int, noise: float) -> datasets.Dataset:
    """y = w . x + 3 with w evenly spread over [-2, 2], x ~ N(0, I), label noise `noise`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, PBT_FEATURES)).astype(np.float32)
    y = x @ np.linspace(-2, 2, PBT_FEATURES) + 3 + noise * rng.normal(size=n)
    return datasets.Dataset.from_dict({"input_x": x, "labels": y.astype(np.float32)})


def pbt_arms() -> dict[str, tuple[Any, dict]]:
    """The three searches of one repeat: (scheduler, constant part of the search space), by name. The same 6 rates,
    6 trials of at most PBT_STEPS steps each in all three."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    iterations = PBT_STEPS // PBT_EVAL_STEPS
    return {
        "fixed configs (ASHA)": (ASHAScheduler(max_t=iterations, grace_period=2, reduction_factor=2), {}),
        "fixed configs, linear decay (ASHA)": (ASHAScheduler(max_t=iterations, grace_period=2, reduction_factor=2),
                                               {"lr_scheduler_type": "linear"}),
        # Ray Tune's defaults but for the interval: the bottom quarter of the population clones the top quarter's
        # checkpoint at every evaluation and moves its rate one grid step either way (or resamples it, p=0.25).
        "PBT": (PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1, synch=True,
                                        hyperparam_mutations={"learning_rate": PBT_RATES}), {}),
    }


def run_pbt_arms(trainer: Any) -> list[dict]:
    """One repeat of `--scheduler pbt`: the fixed-rate searches (ASHA), then PBT, on the same warm Trainer."""
    from ray import tune

    sides = []
    for name, (scheduler, constant) in pbt_arms().items():
        start, records = [0.0], []

        class ResultClock(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                records.append((time.perf_counter() - start[0], result["objective"]))

        space = {"learning_rate": tune.grid_search(PBT_RATES), **constant}
        start[0] = time.perf_counter()
        best = trainer.hyperparameter_search(hp_space=lambda trial: space, n_trials=1, scheduler=scheduler,
                                             callbacks=[ResultClock()])
        wall = time.perf_counter() - start[0]
        steps = sum(trial.last_result.get("step", 0) for trial in best.run_summary.trials)
        sides.append({"side": name, "wall": wall, "best": best.objective, "records": records,
                      "schedule": best.hyperparameter_schedule, "exploits": getattr(scheduler, "_num_perturbations", 0),
                      "steps": steps})
    return sides


def main_pbt(repeats: int, ray_start: float) -> None:
    from raytrainer import Trainer, TrainingArguments

    rows = []
    with tempfile.TemporaryDirectory() as output_dir:
        args = dict(common_args(output_dir), max_steps=PBT_STEPS, eval_steps=PBT_EVAL_STEPS, optim="sgd",
                    lr_scheduler_type="constant", per_device_train_batch_size=PBT_BATCH)
        trainer = Trainer(model_init=LinearModel, args=TrainingArguments(num_workers=1, **args),
                          train_dataset=linear_data(PBT_TRAIN, 0, PBT_NOISE), eval_dataset=linear_data(PBT_EVAL, 1, 0.0))
        trainer.evaluate()  # every search runs on the same warm workers
        for repeat in range(repeats):
            sides = run_pbt_arms(trainer)
            target = min(side["best"] for side in sides[:-1]) * 1.01
            for side in sides:
                side["to_target"] = time_to_target(side["records"], target)
            rows.append(sides)
            pbt = sides[-1]
            schedule = ", ".join(f"step {step}: lr {config['learning_rate']:.3g}" for step, config in pbt["schedule"])
            print(f"repeat {repeat}: target {target:.5g} | " + " | ".join(
                f"{side['side']}: wall {side['wall']:.1f}s best {side['best']:.5g} to-target {side['to_target']:.1f}s "
                f"trial steps {side['steps']}" for side in sides)
                  + f" | PBT exploits {pbt['exploits']}, best schedule: {schedule}", flush=True)
        trainer.close()

    def median(side: int, key: str) -> float:
        return statistics.median(row[side][key] for row in rows)

    names = [side["side"] for side in rows[0]]
    print(f"\n{len(PBT_RATES)} trials x {PBT_STEPS} steps (SGD, batch {PBT_BATCH}, {PBT_FEATURES} features, label noise "
          f"{PBT_NOISE}, eval every {PBT_EVAL_STEPS}), medians over {repeats} repeats; Ray start-up before the "
          f"repeats: {ray_start:.1f}s\n")
    print(f"| metric | {' | '.join(names)} | ratio PBT/fixed | ratio PBT/linear decay |")
    print("|---|---|---|---|---|---|")
    for label, key, unit in (("best objective (eval loss)", "best", ""),
                             ("time to target (1% of the best fixed config)", "to_target", "s"),
                             ("wall time", "wall", "s"), ("training steps of all trials", "steps", "")):
        values = [median(side, key) for side in range(len(names))]

        def ratio(value: float, reference: float) -> str:
            return f"{value / reference:.2f}" if np.isfinite(value) and np.isfinite(reference) else "-"

        print(f"| {label} | " + " | ".join(f"{value:.4g}{unit}" if np.isfinite(value) else "not reached"
                                           for value in values)
              + f" | {ratio(values[2], values[0])} | {ratio(values[2], values[1])} |")
    print(f"| PBT exploits | | | {median(2, 'exploits'):g} | | |")


def start_ray() -> float:
    """Our own local Ray sized to this machine (never a cluster another process started on it); its start-up time.
    Ray Train's placement-group cleaner frees the workers of trials Tune stops; it must ask this Ray's own dashboard."""
    import os
    import socket

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    ray.init(logging_level="WARNING", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=len(LEARNING_RATES),
                        help="grid size: up to 8 of the rates above, more are log-spaced over their range")
    parser.add_argument("--scheduler", choices=("asha", "pbt"), default="asha",
                        help="asha: transformers' search vs ours; pbt: fixed configs (ASHA) vs PBT, both ours")
    options = parser.parse_args()

    ray_start = start_ray()
    if options.scheduler == "pbt":
        main_pbt(options.repeats, ray_start)
        return
    rows = []
    for repeat in range(options.repeats):
        theirs = run_transformers(learning_rates(options.trials))
        cold, warm = run_raytrainer(theirs["order"])
        row = (theirs, cold, warm)
        target = min(side["best"] for side in row) * 1.01
        for side in row:
            side["to_target"] = time_to_target(side["records"], target)
        rows.append(row)
        print(f"repeat {repeat}: order {[f'{rate:.3g}' for rate in theirs['order']]}, target {target:.5g} | " + " | ".join(
            f"{side['side']}: wall {side['wall']:.1f}s best {side['best']:.5g} to-target {side['to_target']:.1f}s"
            + (f" stopped early {side['stopped']}" if side["stopped"] is not None else "") for side in row), flush=True)

    def median(side: int, key: str) -> float:
        return statistics.median(row[side][key] for row in rows)

    names = [side["side"] for side in rows[0]]
    print(f"\n{options.trials} trials x {STEPS} steps (eval every {EVAL_STEPS}), medians over {options.repeats} "
          f"repeats; Ray start-up before the repeats: {ray_start:.1f}s\n")
    print(f"| metric | {names[0]} | {names[1]} | {names[2]} | ratio cold/theirs | ratio warm/theirs |")
    print("|---|---|---|---|---|---|")
    for label, key, unit in (("wall time", "wall", "s"), ("time to target (1% of best)", "to_target", "s"),
                             ("best objective (eval loss)", "best", "")):
        theirs, cold, warm = median(0, key), median(1, key), median(2, key)
        print(f"| {label} | {theirs:.4g}{unit} | {cold:.4g}{unit} | {warm:.4g}{unit} | {cold / theirs:.2f} | "
              f"{warm / theirs:.2f} |")
    print(f"| trials stopped early | - | {median(1, 'stopped'):g} | {median(2, 'stopped'):g} | | |")


if __name__ == "__main__":
    main()
