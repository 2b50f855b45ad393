"""The driver API: transformers.Trainer's constructor and methods, with the work done by Ray Train workers.

The Trainer checks every component on the driver, then hands a `TrainingJob` to `orchestration`, which runs it
on a group of DDP workers (`loop.WorkerTrainer`). Results (weights, state, metrics, predictions) come back to
the driver, so `trainer.model` and `trainer.state` are current after each call.
"""

from __future__ import annotations

import inspect
import os
import warnings
import weakref
from typing import Any, Callable

import datasets
import torch
import transformers
from torch import nn
from transformers import TrainerControl, TrainerState
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback
from transformers.trainer_utils import (IntervalStrategy, PredictionOutput, TrainOutput, enable_full_determinism,
                                        get_last_checkpoint, set_seed)

from raytrainer import checkpoints
from raytrainer.arguments import TrainingArguments, check_supported_arguments, ray_settings
from raytrainer.data import (ArrowPayload, default_collator, model_input_columns, prepare_dataset_and_collator,
                             to_arrow_payload)
from raytrainer.job import Command, TrainingJob
from raytrainer.loop import call_model_init
from raytrainer.modeling import ModelTraits
from raytrainer.progress import DriverProgress
from raytrainer.results import apply_callback_states, apply_weights, state_from_dict
from raytrainer.serialization import check_picklable, register_user_modules

_DISPLAY_CALLBACKS = (ProgressCallback, PrinterCallback)


class Trainer:
    """transformers.Trainer's API; `train()`, `evaluate()` and `predict()` run on Ray Train workers.

    Args:
        model: the model to train, evaluate or use for predictions (or pass `model_init`).
        args: `raytrainer.TrainingArguments` (or `transformers.TrainingArguments`); defaults to
            `output_dir="tmp_trainer"`. Its Ray fields (`num_workers`, `use_gpu`, ...) say where workers run.
        data_collator: forms batches; defaults to `DataCollatorWithPadding` with a tokenizer/feature extractor as
            `processing_class`, else `default_data_collator`.
        train_dataset / eval_dataset: `datasets.Dataset` (sent once through the object store as Arrow), torch
            `Dataset`/`IterableDataset`, or `ray.data.Dataset` (streamed to workers). `eval_dataset` may be a dict.
        processing_class: tokenizer or processor, saved with the model.
        model_init: builds a fresh model at each `train()` (no argument, or the trial's hyperparameters).
        compute_loss_func: `(outputs, labels, num_items_in_batch) -> loss` replacing the model's loss.
        compute_metrics: `EvalPrediction -> dict` of metrics.
        callbacks: `TrainerCallback`s added to the default ones; they run inside every worker.
        optimizers: `(optimizer, scheduler)` built on `model`'s parameters (not with `model_init`).
        optimizer_cls_and_kwargs: `(optimizer_class, kwargs)` instead of `args.optim`.
        preprocess_logits_for_metrics: `(logits, labels) -> logits` applied before metrics are gathered.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
    ):
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, transformers.TrainingArguments):
            raise TypeError(f"args must be a raytrainer.TrainingArguments (or transformers.TrainingArguments), "
                            f"not {type(args).__name__}.")
        check_supported_arguments(args)
        self.args = args
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self.model_init = model_init
        if model is None:
            if model_init is None:
                raise RuntimeError("`Trainer` requires either a `model` or a `model_init` argument.")
            model = call_model_init(model_init, None)
        elif model_init is not None:
            warnings.warn("`Trainer` requires either a `model` or `model_init` argument, but not both. "
                          "`model_init` overrides `model`: each train() starts from a model it builds.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (e.g. a transformers PreTrainedModel), "
                            f"not {type(model).__name__}.")
        self.model = model
        if optimizers is None:
            optimizers = (None, None)
        if (optimizers[0] is not None or optimizers[1] is not None) and optimizer_cls_and_kwargs is not None:
            raise RuntimeError("Pass either `optimizers` or `optimizer_cls_and_kwargs`, not both: both say which "
                               "optimizer to use.")
        if model_init is not None and (optimizers[0] is not None or optimizers[1] is not None):
            raise RuntimeError("Passing a `model_init` is incompatible with providing the `optimizers` argument: "
                               "the optimizer would hold the parameters of a model that model_init replaces. "
                               "Use optimizer_cls_and_kwargs instead.")
        self.data_collator = data_collator if data_collator is not None else default_collator(processing_class)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.compute_loss_func, self.compute_metrics = compute_loss_func, compute_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.label_names = list(ModelTraits.of(model, args).label_names)
        self._check_evaluation_settings()
        default_callbacks = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = CallbackHandler(default_callbacks + list(callbacks or []), self.model,
                                                processing_class, self.optimizer, self.lr_scheduler)
        self.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        self.control = TrainerControl()
        self.state = TrainerState(is_local_process_zero=True, is_world_process_zero=True)
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)
        self._arrow_cache: dict[int, tuple[Any, ArrowPayload]] = {}
        self._object_store_cache: dict = {}
        self.hp_search_backend = None
        self._workers, self._workers_key = None, None  # the warm Ray Train worker group (raytrainer.worker_group.WorkerGroup)
        self._release_workers = None
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

    # ----------------------------------------------------------------------------------- validation
    def _check_evaluation_settings(self) -> None:
        args = self.args
        if args.eval_strategy != IntervalStrategy.NO and self.eval_dataset is None:
            raise ValueError(f"eval_strategy={args.eval_strategy.value!r} asks for evaluation during training, but "
                             "no eval_dataset was given. Pass eval_dataset=... or set eval_strategy='no'.")
        if args.load_best_model_at_end and args.eval_strategy == IntervalStrategy.NO:
            raise ValueError("load_best_model_at_end=True needs evaluations to compare: set eval_strategy "
                             "(and save_strategy) to 'steps' or 'epoch'.")

    def _check_fp16(self) -> None:
        args, settings = self.args, ray_settings(self.args)
        if args.fp16 and (args.use_cpu or settings["use_gpu"] is False):
            raise ValueError("fp16=True needs GPUs (CUDA), but the workers run on CPU. Use bf16=True on CPU, or "
                             "set use_gpu=True on a cluster with GPUs.")

    def _check_dataset(self, dataset: Any, description: str, needs_labels: bool) -> None:
        """Check on the driver that the model gets its required inputs (and labels for training)."""
        if isinstance(dataset, datasets.Dataset):
            forward = inspect.signature(self.model.forward).parameters
            required = [name for name, p in forward.items() if p.default is inspect.Parameter.empty
                        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            missing = [name for name in required if name not in dataset.column_names]
            if missing:
                raise ValueError(f"The {description} dataset has no column {missing} that the model's forward "
                                 f"requires (it has {dataset.column_names}). Add or rename the column(s), e.g. "
                                 "with dataset.rename_column(...), or tokenize the text into them.")
        if _is_ray_dataset(dataset) or isinstance(dataset, torch.utils.data.IterableDataset):
            return
        try:
            count = min(2, len(dataset))
        except TypeError:
            return
        if count == 0:
            raise ValueError(f"The {description} dataset is empty.")
        trimmed, collator = prepare_dataset_and_collator(dataset, self.data_collator,
                                                         self._input_columns(self.model), description)
        try:
            batch = collator([trimmed[i] for i in range(count)])
        except Exception as error:
            raise ValueError(f"The data_collator ({type(self.data_collator).__name__}) failed on the first examples "
                             f"of the {description} dataset: {error}. Check the dataset's columns and the "
                             "collator (a tokenizer as processing_class pads token columns).") from error
        keys = set(batch.keys()) if hasattr(batch, "keys") else set()
        if (needs_labels and self.compute_loss_func is None and self.label_names and keys
                and not any(name in keys for name in self.label_names)
                and not ModelTraits.of(self.model, self.args).can_return_loss):
            raise ValueError(f"The {description} batches have no label {self.label_names} (they have "
                             f"{sorted(keys)}), so the model cannot compute a loss. Add a labels column, or use a "
                             "collator that creates labels (e.g. DataCollatorForLanguageModeling(mlm=False)).")

    # ----------------------------------------------------------------------------------- callbacks
    def add_callback(self, callback) -> None:
        """Add a callback (an instance or a class) to the current list."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (an instance or a class) and return it."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        """Remove a callback (an instance or a class)."""
        self.callback_handler.remove_callback(callback)

    def _worker_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if not isinstance(cb, _DISPLAY_CALLBACKS)]

    # ----------------------------------------------------------------------------------- job building
    def _input_columns(self, model: nn.Module) -> list[str] | None:
        if not self.args.remove_unused_columns:
            return None
        return model_input_columns(model, self.label_names)

    def _transferable(self, dataset: Any, description: str, ray_datasets: dict, name: str) -> Any:
        """The form in which a dataset travels: Arrow (cached per dataset), a Ray Data marker, or itself."""
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {key: self._transferable(part, description, ray_datasets, f"{name}_{key}")
                    for key, part in dataset.items()}
        if _is_ray_dataset(dataset):
            from raytrainer.orchestration import RayDataMarker

            ray_datasets[name] = dataset
            return RayDataMarker(name)
        if isinstance(dataset, datasets.Dataset):
            cached = self._arrow_cache.get(id(dataset))
            if cached is None or cached[0] is not dataset:
                trimmed, _ = prepare_dataset_and_collator(dataset, self.data_collator,
                                                          self._input_columns(self.model), description)
                cached = (dataset, to_arrow_payload(trimmed))
                self._arrow_cache[id(dataset)] = cached
            return cached[1]
        return dataset

    def _job(self, ray_datasets: dict, trial: dict | None = None, train: bool = False) -> TrainingJob:
        fresh_model = train and self.model_init is not None
        callbacks = self._worker_callbacks()
        components = {"data_collator": self.data_collator, "compute_metrics": self.compute_metrics,
                      "compute_loss_func": self.compute_loss_func, "model_init": self.model_init,
                      "preprocess_logits_for_metrics": self.preprocess_logits_for_metrics,
                      "callbacks": callbacks, "processing_class": self.processing_class}
        register_user_modules([self.model, self.model_init, self.data_collator, self.compute_metrics,
                               self.compute_loss_func, self.preprocess_logits_for_metrics, self.train_dataset,
                               *(self.eval_dataset.values() if isinstance(self.eval_dataset, dict)
                                 else [self.eval_dataset]), *callbacks])
        check_picklable(components)
        state = None if train else self.state
        return TrainingJob(
            args=self.args, model=None if fresh_model else self.model, model_init=self.model_init,
            data_collator=self.data_collator,
            train_dataset=self._transferable(self.train_dataset, "training", ray_datasets, "train") if train else None,
            eval_dataset=self._transferable(self.eval_dataset, "evaluation", ray_datasets, "eval"),
            processing_class=self.processing_class, compute_loss_func=self.compute_loss_func,
            compute_metrics=self.compute_metrics, callbacks=callbacks,
            optimizers=(self.optimizer, self.lr_scheduler) if train else (None, None),
            optimizer_cls_and_kwargs=self.optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=self.preprocess_logits_for_metrics,
            input_columns=self._input_columns(self.model), trial=trial, state=state, working_dir=os.getcwd())

    def _run(self, job: TrainingJob, command: Command, ray_datasets: dict, description: str) -> dict:
        from raytrainer import orchestration
        from raytrainer.worker_group import WorkerStopped

        orchestration.ensure_ray(ray_settings(self.args)["ray_address"])
        job.train_dataset = orchestration.put_datasets(job.train_dataset, self._object_store_cache)
        job.eval_dataset = orchestration.put_datasets(job.eval_dataset, self._object_store_cache)
        command.kwargs = {k: orchestration.put_datasets(v, self._object_store_cache)
                          for k, v in command.kwargs.items()}
        progress = DriverProgress(self.args.disable_tqdm, description)
        keep_warm = ray_settings(self.args)["worker_idle_timeout"] > 0 and not ray_datasets
        try:
            try:
                result = self._worker_group(ray_datasets).run(job, command, on_event=progress)
            except WorkerStopped:  # the warm group timed out while idle: start a fresh one
                self.close()
                result = self._worker_group(ray_datasets).run(job, command, on_event=progress)
        finally:
            progress.close()
            if not keep_warm:
                self.close()
        self.state = state_from_dict(result["state"])
        self.state.is_world_process_zero = self.state.is_local_process_zero = True
        apply_callback_states(self._worker_callbacks(), result["callbacks"])
        return result

    def _worker_group(self, ray_datasets: dict):
        """The warm worker group for the current arguments, started when there is none (or they changed)."""
        from raytrainer.orchestration import WorkerGroupSpec
        from raytrainer.worker_group import WorkerGroup

        spec = WorkerGroupSpec.of(self.args)
        spec.check_fits_cluster()
        settings = ray_settings(self.args)
        key = self._group_key(spec)
        if self._workers is not None and (self._workers_key != key or not self._workers.alive or ray_datasets):
            self.close()
        if self._workers is None:
            group = WorkerGroup(spec, idle_timeout_s=settings["worker_idle_timeout"] or None,
                                save_total_limit=self.args.save_total_limit, ray_datasets=ray_datasets)
            group.start()
            self._workers, self._workers_key = group, key
            self._release_workers = weakref.finalize(self, group.close)
        return self._workers

    def _group_key(self, spec) -> tuple:
        """What a warm group must match to serve a call with the current arguments."""
        return spec, self.args.save_total_limit, ray_settings(self.args)["worker_idle_timeout"]

    def _lend_workers(self, usable: bool):
        """Hand this Trainer's warm worker group over to a hyperparameter search (None when there is none it can
        use: other arguments, Ray Data, or Ray Train rotating checkpoints that trials need)."""
        from raytrainer.orchestration import WorkerGroupSpec

        group = self._workers
        if group is None:
            return None
        self._release_workers.detach()
        self._workers = self._release_workers = None
        spec = WorkerGroupSpec.of(self.args)
        if not (usable and group.alive and group.spec == spec
                and (spec.storage_path is None or group.save_total_limit is None)):
            group.close()
            return None
        return group

    def _take_workers(self, group) -> None:
        """Keep a running group of a hyperparameter search warm for this Trainer's next calls."""
        if group is None:
            return
        settings = ray_settings(self.args)
        spec = group.spec
        if settings["worker_idle_timeout"] <= 0 or (spec.storage_path is not None and self.args.save_total_limit):
            group.close()  # released after each call, or Ray Train should rotate checkpoints this group keeps
            return
        self.close()
        group.set_idle_timeout(settings["worker_idle_timeout"])
        self._workers, self._workers_key = group, self._group_key(spec)
        self._release_workers = weakref.finalize(self, group.close)

    def close(self) -> None:
        """Release the Ray Train workers this Trainer keeps warm between calls (also done by a `with` block, by
        garbage collection, at driver exit and after `args.worker_idle_timeout` idle seconds)."""
        if self._release_workers is not None:
            self._release_workers()  # closes the group once, and detaches the finalizer
        self._workers = self._release_workers = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- public API
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: dict | None = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs) -> TrainOutput:
        """Train on the Ray Train workers; returns `TrainOutput(global_step, training_loss, metrics)`.

        Args:
            resume_from_checkpoint: a checkpoint folder, or True for the last one in `args.output_dir`.
            trial: hyperparameters passed to `model_init` (hyperparameter search).
            ignore_keys_for_eval: output keys to ignore when gathering predictions during evaluation.
        """
        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments: {', '.join(kwargs)}.")
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset: pass train_dataset=... to the Trainer.")
        self._check_fp16()
        resume = self._resolve_checkpoint(resume_from_checkpoint)
        if self.model_init is not None:
            enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
            self.model = call_model_init(self.model_init, trial)
            self.optimizer, self.lr_scheduler = None, None
        self._check_dataset(self.train_dataset, "training", needs_labels=True)
        ray_datasets: dict = {}
        job = self._job(ray_datasets, trial=trial, train=True)
        command = Command("train", {"resume_from_checkpoint": resume, "trial": trial,
                                    "ignore_keys_for_eval": ignore_keys_for_eval})
        result = self._run(job, command, ray_datasets, "train")
        apply_weights(self.model, result)
        return result["output"]

    def _resolve_checkpoint(self, resume: str | bool | None) -> str | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            found = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}): "
                                 "train without resume_from_checkpoint, or pass a checkpoint folder.")
            return os.path.abspath(found)
        if not os.path.isdir(resume) or not checkpoints.is_checkpoint(resume):
            raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder (it needs "
                             f"{checkpoints.TRAINER_STATE_NAME} and model weights).")
        return os.path.abspath(resume)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate on the workers; returns the metrics (prefixed, per dataset when given a dict)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset: pass one to the Trainer or to evaluate().")
        for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
            self._check_dataset(part, "evaluation", needs_labels=False)
        ray_datasets: dict = {}
        job = self._job(ray_datasets)
        override = self._transferable(eval_dataset, "evaluation", ray_datasets, "eval_override")
        command = Command("evaluate", {"eval_dataset": override, "ignore_keys": ignore_keys,
                                       "metric_key_prefix": metric_key_prefix})
        return self._run(job, command, ray_datasets, "evaluate")["output"]

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """Predict on the workers; one row per example, in dataset order."""
        if test_dataset is None:
            raise ValueError("Trainer.predict() needs a test_dataset.")
        self._check_dataset(test_dataset, "test", needs_labels=False)
        ray_datasets: dict = {}
        job = self._job(ray_datasets)
        command = Command("predict", {"test_dataset": self._transferable(test_dataset, "test", ray_datasets, "test"),
                                      "ignore_keys": ignore_keys, "metric_key_prefix": metric_key_prefix})
        return self._run(job, command, ray_datasets, "predict")["output"]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (and processing_class) so that `from_pretrained` loads it."""
        checkpoints.save_model(self.model, output_dir or self.args.output_dir, self.processing_class, self.args)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Record `logs` in `state.log_history` and pass them to the callbacks (on the driver)."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def is_world_process_zero(self) -> bool:
        return True

    def is_local_process_zero(self) -> bool:
        return True

    def call_model_init(self, trial: dict | None = None) -> nn.Module:
        if self.model_init is None:
            raise RuntimeError("call_model_init needs a model_init.")
        return call_model_init(self.model_init, trial)

    def hyperparameter_search(self, *args, **kwargs):
        """Search hyperparameters with Ray Tune (see `raytrainer.tuning.hyperparameter_search`)."""
        from raytrainer.tuning import hyperparameter_search

        return hyperparameter_search(self, *args, **kwargs)


def _is_ray_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("ray.data")


__all__ = ["Trainer", "TrainingArguments"]
