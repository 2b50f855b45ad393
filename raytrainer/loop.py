"""The worker's training loop: plain torch (+ transformers' callback classes), no Ray.

Every worker runs `WorkerTrainer.train()`; with more than one worker the model is wrapped in DDP and the batches
are dealt as accelerate deals them, so the run matches transformers.Trainer step for step. The loop talks to the
outside world only through a `Reporter` (logs to the driver, metrics and checkpoints to the orchestrator), so it
runs in-process in tests with `Reporter()`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, ExportableState
from transformers.trainer_utils import (PredictionOutput, number_of_arguments, SaveStrategy, TrainOutput, enable_full_determinism,
                                        set_seed, sort_checkpoints, speed_metrics)

from raytrainer import checkpoints
from raytrainer.data import ArrowPayload, from_arrow_payload, has_length, move_to_device, prepare_dataset_and_collator, train_dataloader
from raytrainer.distributed import WorkerContext, all_reduce_max, all_reduce_sum, barrier
from raytrainer.evaluation import EvaluationSetup, evaluation_loop
from raytrainer.job import TrainingJob
from raytrainer.modeling import LossComputer, ModelTraits, unwrap
from raytrainer.optimization import create_optimizer, create_scheduler, current_learning_rate


class Reporter:
    """Where a worker sends what the outside world needs. The default keeps everything in-process."""

    def log(self, entry: dict, state: TrainerState) -> None:
        """A log entry (rank 0 only)."""

    def progress(self, global_step: int, max_steps: int) -> None:
        """Training progress (rank 0 only)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Metrics, and a finished checkpoint when one was saved (every rank, at the same points)."""

    def latest_checkpoint(self) -> str | None:
        """A checkpoint to resume from after a restart of the worker group, if any."""
        return None

    def cancelled(self) -> bool:
        """Whether the caller gave up on this training (rank 0 asks; training then stops as if a callback said so)."""
        return False


_CONTROL_FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


def call_model_init(model_init, trial):
    """model_init takes no argument, or the trial's hyperparameters (transformers' convention)."""
    count = number_of_arguments(model_init)
    if count == 0:
        model = model_init()
    elif count == 1:
        model = model_init(trial)
    else:
        raise RuntimeError(f"model_init should take 0 or 1 argument (the trial's hyperparameters), not {count}.")
    if model is None:
        raise RuntimeError("model_init should return a model, not None.")
    return model


class WorkerTrainer:
    """train/evaluate/predict on one worker of the group."""

    def __init__(self, job: TrainingJob, context: WorkerContext, reporter: Reporter | None = None):
        self.job, self.args, self.context = job, job.args, context
        self.reporter = reporter or Reporter()
        args = self.args
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        if args.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.allow_tf32 = args.tf32
        self.model = job.model
        self.state = job.state if job.state is not None else TrainerState()
        self.state.is_world_process_zero = context.is_main
        self.state.is_local_process_zero = context.local_rank == 0
        self.control = TrainerControl()
        self.optimizer, self.scheduler = job.optimizers
        self.scaler = None
        self.wrapped_model = None
        self.callback_handler = CallbackHandler(list(job.callbacks), self.model, job.processing_class,
                                                self.optimizer, self.scheduler)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.args.bf16:
            return torch.autocast(device_type=self.context.device.type, dtype=torch.bfloat16)
        if self.args.fp16:
            return torch.autocast(device_type=self.context.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def loss_computer(self) -> LossComputer:
        return LossComputer(ModelTraits.of(self.model, self.args), self.job.compute_loss_func,
                            self.context.world_size, self.args.average_tokens_across_devices, self.autocast)

    def prepared(self, dataset, description: str):
        if isinstance(dataset, ArrowPayload):  # in-process use: the table is here, not in an object store
            dataset = from_arrow_payload(dataset)
        collator = self.job.data_collator
        return prepare_dataset_and_collator(dataset, collator, self.job.input_columns, description)

    def sync_control(self) -> None:
        """Apply a control decision taken on any rank on all ranks, so that no rank waits for the others."""
        if self.context.world_size == 1:
            return
        flags = torch.tensor([float(getattr(self.control, f)) for f in _CONTROL_FLAGS], device=self.context.device)
        flags = all_reduce_max(flags, self.context)
        for name, value in zip(_CONTROL_FLAGS, flags.tolist()):
            setattr(self.control, name, bool(value))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen not in (False, "no"):
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                seen = self.state.num_input_tokens_seen - self._initial_tokens_seen
                logs.update(speed_metrics("train", start_time, num_tokens=seen))
        entry = {**logs, "step": self.state.global_step}
        self.state.log_history.append(entry)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)
        if self.context.is_main:
            self.reporter.log(entry, self.state)

    # ------------------------------------------------------------------ model set-up
    def build_model(self, trial, resume_from: str | None) -> torch.nn.Module:
        args = self.args
        if self.job.model_init is not None:
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model = call_model_init(self.job.model_init, trial)
            self.optimizer, self.scheduler = None, None
        model = self.model
        if args.activation_checkpointing or args.gradient_checkpointing:
            kwargs = dict(args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs or {})
            kwargs.setdefault("use_reentrant", False)
            enable = (getattr(model, "activation_checkpointing_enable", None)
                      or getattr(model, "gradient_checkpointing_enable"))
            try:
                enable(activation_checkpointing_kwargs=kwargs)
            except TypeError:
                enable(gradient_checkpointing_kwargs=kwargs)
        if resume_from is not None:
            checkpoints.load_model_weights(model, resume_from)
        model.to(self.context.device)
        return model

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        args = self.args
        if args.torch_compile:
            model = torch.compile(model, backend=args.torch_compile_backend or "inductor",
                                  mode=args.torch_compile_mode)
        if self.context.world_size > 1:
            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            options = {"forward_sync_buffers": args.ddp_broadcast_buffers} if args.ddp_broadcast_buffers is not None \
                else {}  # (DDP's own default syncs buffers; `broadcast_buffers` is deprecated in torch 2.13)
            model = DistributedDataParallel(
                model, device_ids=device_ids,
                find_unused_parameters=bool(args.ddp_find_unused_parameters),
                bucket_cap_mb=args.ddp_bucket_cap_mb or 25,
                static_graph=bool(args.ddp_static_graph), **options)
        return model

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | None = None, trial: dict | None = None,
              ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        args, context = self.args, self.context
        resume_from = self.reporter.latest_checkpoint() or resume_from_checkpoint
        model = self.build_model(trial, resume_from)
        dataset, collator = self.prepared(self.job.train_dataset, "training")
        self.train_data = (dataset, collator)
        plan = TrainingPlan.of(args, dataset, train_dataloader(dataset, collator, args, context, 0), context)

        self.state = TrainerState(stateful_callbacks=[cb for cb in self.callback_handler.callbacks + [self.control]
                                                      if isinstance(cb, ExportableState)])
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.compute_steps(args, plan.max_steps)
        epochs_trained = steps_trained_in_epoch = 0
        if resume_from is not None and checkpoints.is_checkpoint(resume_from):
            self.state = checkpoints.load_trainer_state(resume_from)
            if self.state.best_model_checkpoint and not os.path.isdir(self.state.best_model_checkpoint):
                self.state.best_model_checkpoint = None
            self.restore_callback_states()
            epochs_trained = self.state.global_step // plan.update_steps_per_epoch
            if not args.ignore_data_skip:
                steps_trained_in_epoch = (self.state.global_step % plan.update_steps_per_epoch
                                          ) * args.gradient_accumulation_steps
        self.state.trial_params = dict(trial) if trial else None
        self.state.max_steps, self.state.num_train_epochs = plan.max_steps, plan.num_train_epochs
        self.state.is_world_process_zero = context.is_main
        self.state.is_local_process_zero = context.local_rank == 0

        if self.optimizer is None:
            self.optimizer = create_optimizer(model, args, self.job.optimizer_cls_and_kwargs)
        self.wrapped_model = self.wrap_model(model)
        if self.scheduler is None:
            self.scheduler = create_scheduler(self.optimizer, args, plan.max_steps)
        if args.fp16 and context.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        if resume_from is not None:
            checkpoints.load_training_state(resume_from, self.optimizer, self.scheduler, self.scaler, context.device)
        handler = self.callback_handler
        handler.model, handler.optimizer, handler.lr_scheduler = model, self.optimizer, self.scheduler
        handler.train_dataloader = None

        start_time = time.time()
        self._initial_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self.tr_loss = torch.tensor(0.0, device=context.device)
        self.total_loss_scalar, self.current_flos = 0.0, 0.0
        self.globalstep_last_logged = self.state.global_step
        self.wrapped_model.zero_grad()
        self.control = handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start:
            self.evaluate_during_training(ignore_keys_for_eval, skip_scheduler=True)
        for epoch in range(epochs_trained, plan.num_train_epochs):
            self.control = handler.on_epoch_begin(args, self.state, self.control)
            skip = steps_trained_in_epoch if epoch == epochs_trained else 0
            self.run_epoch(plan, epoch, skip, resume_from if epoch == epochs_trained else None,
                           ignore_keys_for_eval, start_time)
            self.sync_control()
            if self.control.should_training_stop:
                break
        return self.finish_training(plan, start_time)

    def run_epoch(self, plan: "TrainingPlan", epoch: int, skip_batches: int, resume_from: str | None,
                  ignore_keys_for_eval, start_time: float) -> None:
        args, handler = self.args, self.callback_handler
        dataset, collator = self.train_data
        loader = train_dataloader(dataset, collator, args, self.context, epoch, skip_batches=skip_batches)
        step, grad_norm, learning_rate = -1, None, None
        rng_to_sync = False
        first_update = 0
        if resume_from is not None:
            if skip_batches > 0:
                step = skip_batches - 1
                first_update = skip_batches // args.gradient_accumulation_steps
                rng_to_sync = True
            else:
                checkpoints.load_rng_state(resume_from, self.context.rank, self.context.world_size)
        batches = iter(loader)
        remainder = plan.steps_in_epoch % args.gradient_accumulation_steps or args.gradient_accumulation_steps
        for update_step in range(first_update, plan.update_steps_per_epoch):
            count = args.gradient_accumulation_steps if update_step != plan.update_steps_per_epoch - 1 else remainder
            micro_batches = [b for _, b in zip(range(count), batches)]
            num_items = self.num_items_in_batch(micro_batches)
            if rng_to_sync:
                checkpoints.load_rng_state(resume_from, self.context.rank, self.context.world_size)
                rng_to_sync = False
            for i, inputs in enumerate(micro_batches):
                step += 1
                do_sync_step = (step + 1) % args.gradient_accumulation_steps == 0 or step + 1 == plan.steps_in_epoch
                if step % args.gradient_accumulation_steps == 0:
                    self.control = handler.on_step_begin(args, self.state, self.control)
                last = i == len(micro_batches) - 1
                no_sync = getattr(self.wrapped_model, "no_sync", None)
                with (no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()):
                    loss = self.training_step(inputs, num_items, len(micro_batches))
                if args.logging_nan_inf_filter and not torch.isfinite(loss):
                    self.tr_loss = self.tr_loss + self.tr_loss / (
                        1 + self.state.global_step - self.globalstep_last_logged)
                else:
                    self.tr_loss = self.tr_loss + loss
                self.track_tokens_and_flos(inputs)
                if do_sync_step:
                    grad_norm, learning_rate = self.optimizer_step()
                    self.state.global_step += 1
                    self.state.epoch = epoch + (step + 1) / plan.steps_in_epoch
                    self.control = handler.on_step_end(args, self.state, self.control)
                    self.maybe_log_save_evaluate(grad_norm, learning_rate, ignore_keys_for_eval, start_time)
                    if self.context.is_main:
                        self.reporter.progress(self.state.global_step, plan.max_steps)
                        if self.reporter.cancelled():
                            self.control.should_training_stop = True
                else:
                    self.control = handler.on_substep_end(args, self.state, self.control)
                if do_sync_step or last:
                    self.sync_control()
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        if step < 0:
            self.control.should_training_stop = True
        self.control = handler.on_epoch_end(args, self.state, self.control)
        self.maybe_log_save_evaluate(grad_norm, learning_rate, ignore_keys_for_eval, start_time)

    def num_items_in_batch(self, micro_batches: list) -> torch.Tensor | None:
        count = self.loss_computer_cached.num_items(micro_batches)
        if count is None:
            return None
        count = count.to(self.context.device)
        if self.args.average_tokens_across_devices and self.context.world_size > 1:
            count = all_reduce_sum(count, self.context)
        return count

    @property
    def loss_computer_cached(self) -> LossComputer:
        if getattr(self, "_loss_computer", None) is None or self._loss_computer_model is not self.model:
            self._loss_computer, self._loss_computer_model = self.loss_computer(), self.model
        return self._loss_computer

    def training_step(self, inputs: dict, num_items_in_batch, accumulation_steps: int) -> torch.Tensor:
        self.wrapped_model.train()
        inputs = move_to_device(inputs, self.context.device)
        computer = self.loss_computer_cached
        loss = computer(self.wrapped_model, inputs, num_items_in_batch=num_items_in_batch)
        empty_every = self.args.torch_empty_cache_steps
        if empty_every and self.state.global_step % empty_every == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not (computer.counts_items and num_items_in_batch is not None):
            loss = loss / accumulation_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def optimizer_step(self) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule; return (grad norm, learning rate used)."""
        args, handler = self.args, self.callback_handler
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped_model.parameters(), max_norm)
        self.control = handler.on_pre_optimizer_step(args, self.state, self.control)
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.control = handler.on_optimizer_step(args, self.state, self.control)
        learning_rate = current_learning_rate(self.optimizer, self.scheduler)
        if not skipped and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.wrapped_model.zero_grad()
        return grad_norm.item(), learning_rate

    def track_tokens_and_flos(self, inputs: dict) -> None:
        model = unwrap(self.wrapped_model)
        if hasattr(model, "floating_point_ops"):
            try:
                self.current_flos += float(model.floating_point_ops(inputs))
            except (AttributeError, KeyError, TypeError):
                pass
        mode = self.args.include_num_input_tokens_seen
        if mode in (False, "no"):
            return
        name = getattr(model, "main_input_name", "input_ids")
        if name not in inputs:
            return
        if mode == "non_padding" and "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:
            tokens = torch.tensor(inputs[name].numel())
        tokens = all_reduce_sum(torch.as_tensor(tokens, dtype=torch.int64, device=self.context.device), self.context)
        self.state.num_input_tokens_seen += int(tokens.item())

    def store_flos(self) -> None:
        flos = all_reduce_sum(torch.tensor(self.current_flos, dtype=torch.float64, device=self.context.device),
                              self.context)
        self.state.total_flos += flos.item()
        self.current_flos = 0.0

    def maybe_log_save_evaluate(self, grad_norm, learning_rate, ignore_keys_for_eval, start_time) -> None:
        self.sync_control()
        if self.control.should_log and self.state.global_step > self.globalstep_last_logged:
            loss_sum = all_reduce_sum(self.tr_loss, self.context).item() / self.context.world_size
            self.tr_loss = torch.zeros_like(self.tr_loss)
            logs = {"loss": loss_sum / (self.state.global_step - self.globalstep_last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = (learning_rate if learning_rate is not None
                                     else current_learning_rate(self.optimizer, self.scheduler))
            self.total_loss_scalar += loss_sum
            self.globalstep_last_logged = self.state.global_step
            self.store_flos()
            self.log(logs, start_time)
        metrics = None
        if self.control.should_evaluate:
            metrics = self.evaluate_during_training(ignore_keys_for_eval)
            is_new_best = self.update_best_metric(metrics)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_new_best
            self.sync_control()
        saved = None
        if self.control.should_save:
            saved = self.save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        if metrics is not None or saved is not None:
            report = {"step": self.state.global_step, "epoch": self.state.epoch, **(metrics or {})}
            self.reporter.report(report, saved)

    # ------------------------------------------------------------------ evaluation during training
    def evaluate_during_training(self, ignore_keys, skip_scheduler: bool = False) -> dict:
        metrics = self.evaluate(ignore_keys=ignore_keys)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not skip_scheduler:
            key = self.args.metric_for_best_model or "loss"
            key = key if key.startswith("eval_") else f"eval_{key}"
            self.scheduler.step(metrics[key])
        return metrics

    def update_best_metric(self, metrics: dict) -> bool:
        args = self.args
        if args.metric_for_best_model is None:
            return False
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        if key not in metrics:
            raise KeyError(f"metric_for_best_model={args.metric_for_best_model!r} ('{key}') is not among the "
                           f"evaluation metrics {sorted(metrics)}. Set metric_for_best_model to one of them.")
        value = metrics[key]
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if args.greater_is_better else float("inf")
        better = value > self.state.best_metric if args.greater_is_better else value < self.state.best_metric
        if better:
            self.state.best_metric = value
            if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                self.state.best_global_step = self.state.global_step
        return bool(better)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Write `output_dir/checkpoint-<step>` atomically; returns its path (on every rank)."""
        args, context = self.args, self.context
        final_dir = checkpoints.checkpoint_dir(args.output_dir, self.state.global_step)
        tmp_dir = checkpoints.temporary_dir(final_dir)
        self.store_flos()
        if context.is_main and os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)
        barrier(context)
        if self.state.best_global_step and args.save_strategy != SaveStrategy.NO:
            best_dir = checkpoints.checkpoint_dir(args.output_dir, self.state.best_global_step)
            if os.path.exists(best_dir) or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = best_dir
        for callback in self.callback_handler.callbacks + [self.control]:
            if isinstance(callback, ExportableState):
                name = callback.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(callback.state())
                else:
                    self.state.stateful_callbacks[name] = callback.state()
        checkpoints.save_checkpoint(tmp_dir, model=unwrap(self.wrapped_model), optimizer=self.optimizer,
                                    scheduler=self.scheduler, scaler=self.scaler, state=self.state, args=args,
                                    rank=context.rank, world_size=context.world_size,
                                    processing_class=self.job.processing_class)
        barrier(context)
        if context.is_main:
            checkpoints.publish_checkpoint(tmp_dir, final_dir)
            checkpoints.rotate_checkpoints(output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        barrier(context)
        return final_dir

    def restore_callback_states(self) -> None:
        if not self.args.restore_callback_states_from_checkpoint:
            return
        saved = self.state.stateful_callbacks
        callbacks = self.callback_handler.callbacks
        for index, callback in enumerate(callbacks):
            entry = saved.get(callback.__class__.__name__)
            if isinstance(entry, list):
                entry = entry.pop(0) if entry else None
            if isinstance(callback, ExportableState) and entry:
                restored = callback.__class__(**entry.get("args", {}))
                for key, value in entry.get("attributes", {}).items():
                    setattr(restored, key, value)
                callbacks[index] = restored
        if "TrainerControl" in saved:
            for key, value in saved["TrainerControl"].get("attributes", {}).items():
                setattr(self.control, key, value)

    def finish_training(self, plan: "TrainingPlan", start_time: float) -> TrainOutput:
        args, context = self.args, self.context
        self.total_loss_scalar += all_reduce_sum(self.tr_loss, context).item() / context.world_size
        steps_trained = self.state.global_step - self._initial_global_step
        train_loss = self.total_loss_scalar / max(steps_trained, 0.001)
        metrics = speed_metrics("train", start_time,
                                num_samples=plan.num_train_samples * steps_trained / max(self.state.max_steps, 1),
                                num_steps=steps_trained)
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            checkpoints.load_model_weights(unwrap(self.wrapped_model), self.state.best_model_checkpoint)
        if context.is_main and self.state.best_model_checkpoint is not None and args.save_total_limit == 1:
            for folder in sort_checkpoints(output_dir=args.output_dir,
                                           best_model_checkpoint=self.state.best_model_checkpoint):
                if not os.path.samefile(folder, self.state.best_model_checkpoint):
                    shutil.rmtree(folder, ignore_errors=True)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.model = unwrap(self.wrapped_model)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # ------------------------------------------------------------------ evaluate / predict
    def evaluation_setup(self) -> EvaluationSetup:
        model = unwrap(self.model)
        return EvaluationSetup(args=self.args, context=self.context, loss_computer=self.loss_computer_cached,
                               collator=None, compute_metrics=self.job.compute_metrics,
                               preprocess_logits_for_metrics=self.job.preprocess_logits_for_metrics,
                               main_input_name=getattr(model, "main_input_name", "input_ids"))

    def eval_model(self) -> torch.nn.Module:
        """The bare model (no DDP: evaluation needs no gradient sync, and no rank waits on another's forward)."""
        model = unwrap(self.wrapped_model) if self.wrapped_model is not None else self.model
        return model.to(self.context.device)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.job.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        dataset, collator = self.prepared(dataset, "evaluation")
        setup = self.evaluation_setup()
        setup.collator = collator
        output = evaluation_loop(self.eval_model(), dataset, setup,
                                 prediction_loss_only=True if self.job.compute_metrics is None else
                                 self.args.prediction_loss_only,
                                 ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                 on_prediction_step=self.on_prediction_step)
        self.log(output.metrics)  # transformers adds "epoch" to the returned metrics too
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        return output.metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        dataset, collator = self.prepared(test_dataset, "test")
        setup = self.evaluation_setup()
        setup.collator = collator
        output = evaluation_loop(self.eval_model(), dataset, setup, self.args.prediction_loss_only, ignore_keys,
                                 metric_key_prefix, on_prediction_step=self.on_prediction_step)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)

    def on_prediction_step(self) -> None:
        self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)


class TrainingPlan:
    """Epochs, steps and samples of a run, computed as transformers.Trainer.set_initial_training_values."""

    def __init__(self, num_train_epochs, update_steps_per_epoch, num_train_samples, steps_in_epoch, max_steps):
        self.num_train_epochs = num_train_epochs
        self.update_steps_per_epoch = update_steps_per_epoch
        self.num_train_samples = num_train_samples
        self.steps_in_epoch = steps_in_epoch
        self.max_steps = max_steps

    @classmethod
    def of(cls, args, dataset, loader, context: WorkerContext) -> "TrainingPlan":
        accumulation = args.gradient_accumulation_steps
        total_batch = args.per_device_train_batch_size * accumulation * context.world_size
        length = len(loader) if has_length(loader) else None
        max_steps = args.max_steps
        if length is not None:
            update_steps = max(length // accumulation + int(length % accumulation > 0), 1)
            if max_steps < 0:
                max_steps = math.ceil(args.num_train_epochs * update_steps)
            num_examples = len(dataset) if has_length(dataset) else length * args.per_device_train_batch_size
            if args.max_steps > 0:
                epochs = max_steps // update_steps + int(max_steps % update_steps > 0)
                samples = max_steps * total_batch
            else:
                epochs = math.ceil(args.num_train_epochs)
                samples = num_examples * args.num_train_epochs
        elif args.max_steps > 0:
            epochs, update_steps, samples = 2**62, max_steps, max_steps * total_batch
        else:
            raise ValueError("args.max_steps must be set to a positive value when the training dataset has no "
                             f"length (an IterableDataset or a Ray Data stream); it is {args.max_steps}.")
        steps_in_epoch = length if length is not None else max_steps * accumulation
        return cls(epochs, update_steps, samples, steps_in_epoch, max_steps)
