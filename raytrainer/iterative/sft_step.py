"""One supervised fine-tuning step on a list of examples, in plain torch (no Ray).

`IterativeSFTTrainer.step()` runs this on the trainer actor(s). The pieces:
- `check_step_inputs` / `encode_examples`: TRL's `step()` inputs (token tensors or strings) become
  per-example token lists with loss labels, truncated per sequence.
- `SFTStepper.step`: shuffles the examples with a seed every rank shares, cuts them into global
  micro-batches, gives each rank its slice, accumulates token-summed losses normalised by the label
  tokens of the whole optimizer step, all-reduces the gradients, clips and steps.

Fixes relative to TRL 0.23's IterativeSFTTrainer: labels given for causal LMs are kept (TRL's collator
replaced them with `input_ids`), `texts_labels` is used (TRL tokenised `texts` twice), `max_length`
truncates each sequence (TRL sliced the batch dimension), `step()` returns its statistics, `global_step`
counts optimizer steps, and `max_steps=-1` gives a constant learning rate instead of 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import get_constant_schedule_with_warmup

from transformers.trainer import Trainer as TransformersTrainer

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_end", "keep_start")
# Schedules that need the total number of steps: with max_steps=-1 they cannot be built (TRL built a
# linear schedule over -1 steps, i.e. a learning rate of 0).
_CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")

Example = dict[str, list[int]]


def _as_list(name: str, values: Any, element_type: type) -> list:
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence) and not hasattr(
        values, "__iter__"
    ):
        raise ValueError(f"{name} must be a list of {element_type.__name__} (one per example), got "
                         f"{type(values).__name__}.")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: step() needs at least one example.")
    for i, value in enumerate(values):
        if not isinstance(value, element_type):
            raise ValueError(f"{name}[{i}] is a {type(value).__name__}; every element of {name} must be a "
                             f"{element_type.__name__}.")
        if element_type is torch.Tensor and value.dim() != 1:
            raise ValueError(f"{name}[{i}] has shape {tuple(value.shape)}; pass one 1-D tensor per example "
                             "(split a padded 2-D batch with list(batch)).")
    return values


def check_step_inputs(
    input_ids=None, attention_mask=None, labels=None, texts=None, texts_labels=None, *, is_encoder_decoder=False
) -> dict[str, list | None]:
    """Validate `step()`'s arguments and return them as lists; raise ValueError naming the problem."""
    if input_ids is not None and texts is not None:
        raise ValueError("step() got both input_ids and texts: pass token tensors (input_ids, attention_mask, "
                         "labels) or strings (texts, texts_labels), not both.")
    if input_ids is None and texts is None:
        raise ValueError("step() needs input_ids (a list of 1-D token tensors) or texts (a list of strings).")
    if texts is not None:
        if attention_mask is not None or labels is not None:
            raise ValueError("attention_mask and labels go with input_ids; with texts, pass the targets as "
                             "texts_labels.")
        texts = _as_list("texts", texts, str)
        if texts_labels is not None:
            texts_labels = _as_list("texts_labels", texts_labels, str)
            if len(texts_labels) != len(texts):
                raise ValueError(f"texts has {len(texts)} examples but texts_labels has {len(texts_labels)}; "
                                 "pass one label text per text.")
    else:
        if texts_labels is not None:
            raise ValueError("texts_labels goes with texts; with input_ids, pass the targets as labels.")
        input_ids = _as_list("input_ids", input_ids, torch.Tensor)
        for name, values in (("attention_mask", attention_mask), ("labels", labels)):
            if values is None:
                continue
            values = _as_list(name, values, torch.Tensor)
            if len(values) != len(input_ids):
                raise ValueError(f"input_ids has {len(input_ids)} examples but {name} has {len(values)}; pass "
                                 f"one {name} tensor per input_ids tensor.")
            must_match = name == "attention_mask" or not is_encoder_decoder
            for i, (ids, value) in enumerate(zip(input_ids, values)):
                if must_match and value.shape != ids.shape:
                    raise ValueError(f"{name}[{i}] has length {value.shape[0]} but input_ids[{i}] has "
                                     f"{ids.shape[0]}; they must align token by token.")
            attention_mask, labels = (values, labels) if name == "attention_mask" else (attention_mask, values)
    if is_encoder_decoder and labels is None and texts_labels is None:
        raise ValueError("A sequence-to-sequence model needs targets: pass labels (with input_ids) or "
                         "texts_labels (with texts).")
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, texts=texts,
                texts_labels=texts_labels)


def truncate(tokens: list[int], max_length: int | None, truncation_mode: str) -> list[int]:
    """Cut one sequence to `max_length` tokens, keeping its end ("keep_end") or its start ("keep_start")."""
    if max_length is None or len(tokens) <= max_length:
        return tokens
    return tokens[-max_length:] if truncation_mode == "keep_end" else tokens[:max_length]


def encode_examples(
    tokenizer, inputs: dict[str, list | None], *, is_encoder_decoder: bool, max_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> list[Example]:
    """Turn checked `step()` inputs into per-example `input_ids`/`attention_mask`/`labels` token lists.

    Causal LMs: labels default to `input_ids` (tokens outside the attention mask get IGNORE_INDEX);
    given labels are kept as they are; with `texts_labels`, each example is text + label text and only
    the label tokens carry loss. Seq2seq: `labels`/`texts_labels` are the decoder targets.
    """
    texts, texts_labels = inputs["texts"], inputs["texts_labels"]
    if texts is not None:
        sources = [tokenizer(text)["input_ids"] for text in texts]
        targets = None
        if texts_labels is not None:
            special = is_encoder_decoder  # a decoder target gets the model's EOS; a continuation does not
            targets = [tokenizer(text, add_special_tokens=special)["input_ids"] for text in texts_labels]
        masks = [[1] * len(ids) for ids in sources]
    else:
        sources = [ids.tolist() for ids in inputs["input_ids"]]
        masks = ([m.tolist() for m in inputs["attention_mask"]] if inputs["attention_mask"] is not None
                 else [[1] * len(ids) for ids in sources])
        targets = [lab.tolist() for lab in inputs["labels"]] if inputs["labels"] is not None else None

    examples = []
    for i, (ids, mask) in enumerate(zip(sources, masks)):
        if is_encoder_decoder:
            example = {"input_ids": ids, "attention_mask": mask, "labels": targets[i]}
        elif texts is not None and targets is not None:  # prompt + completion: loss on the completion only
            example = {"input_ids": ids + targets[i], "attention_mask": mask + [1] * len(targets[i]),
                       "labels": [IGNORE_INDEX] * len(ids) + targets[i]}
        else:
            labels = targets[i] if targets is not None else ids
            labels = [lab if m else IGNORE_INDEX for lab, m in zip(labels, mask)]
            example = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        # Each sequence is cut on its own; for a causal LM input, mask and labels align, so they stay aligned.
        example = {k: truncate(v, max_length, truncation_mode) for k, v in example.items()}
        examples.append(example)
    return examples


def pad_examples(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: `pad_token_id` for inputs, 0 for the mask, IGNORE_INDEX for labels."""
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, value in fill.items():
        width = max(len(e[key]) for e in examples)
        batch[key] = torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], dtype=torch.long)
    return batch


def count_label_tokens(example: Example, is_encoder_decoder: bool) -> int:
    """Tokens whose prediction is trained (a causal LM predicts token t from tokens before t)."""
    labels = example["labels"] if is_encoder_decoder else example["labels"][1:]
    return sum(1 for lab in labels if lab != IGNORE_INDEX)


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], is_encoder_decoder: bool):
    """Cross-entropy summed over the batch's label tokens (normalised later by the step's token count)."""
    if is_encoder_decoder:
        logits = model(**batch).logits
        targets = batch["labels"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def all_reduce_gradients(parameters: list[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum every gradient (and `extra`) across the default process group in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return flat[offset:]


def build_optimizer_and_scheduler(model, args, optimizers=(None, None)):
    """The given (optimizer, scheduler), or those transformers' Trainer builds (its own `create_optimizer` and
    `create_scheduler`, as TRL's IterativeSFTTrainer gets them). With `max_steps=-1` the length of the run is
    unknown, so the schedule is constant after warmup (TRL built a linear decay to step -1: lr 0)."""
    optimizer, scheduler = optimizers
    builder = _OptimizerBuilder(model, args, optimizer)
    if optimizer is None:
        optimizer = builder.create_optimizer()
    if scheduler is None:
        if args.max_steps > 0:
            scheduler = builder.create_scheduler(args.max_steps, optimizer)
        else:
            check_open_ended_schedule(args)
            scheduler = get_constant_schedule_with_warmup(optimizer, int(args.warmup_steps))
    return optimizer, scheduler


class _OptimizerBuilder(TransformersTrainer):
    """transformers' optimizer and scheduler builders without the rest of a Trainer: the trainer actor steps
    outside a Trainer's loop (TRL's step API), and a whole Trainer would move the model and reseed the actor."""

    def __init__(self, model, args, optimizer):  # super().__init__ is deliberately not called
        self.model, self.args, self.optimizer = model, args, optimizer
        self.optimizer_cls_and_kwargs, self.lr_scheduler, self._created_lr_scheduler = None, None, False


def current_learning_rate(optimizer, scheduler) -> float:
    """The learning rate of the first parameter group, as transformers logs it."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return optimizer.param_groups[0]["lr"]
    last = scheduler.get_last_lr()[0]
    return last.item() if torch.is_tensor(last) else last


def check_open_ended_schedule(args) -> None:
    """Raise if `args` asks for a schedule that needs `max_steps` while `max_steps` is unset."""
    if args.max_steps > 0:
        return
    scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if scheduler_type not in ("linear", *_CONSTANT_SCHEDULES):
        raise ValueError(f"lr_scheduler_type={scheduler_type!r} needs the run length: set max_steps (total "
                         "optimizer steps), or use 'constant'/'constant_with_warmup'.")
    if 0 < args.warmup_steps < 1:
        raise ValueError(f"warmup_steps={args.warmup_steps} is a ratio of the run length, which is unknown "
                         "with max_steps=-1: set max_steps or give warmup_steps as a whole number of steps.")


@dataclass
class StepStatistics:
    loss: float
    learning_rate: float
    grad_norm: float
    num_tokens: int
    num_examples: int
    optimizer_steps: int
    global_step: int


class SFTStepper:
    """Owns a model, optimizer and scheduler and runs `step()` on one rank of `world_size`.

    Every rank receives the whole step's examples; the shuffle is seeded identically on all ranks, so
    each takes the same global micro-batches and its own slice of them.
    """

    def __init__(self, model, args, optimizer, scheduler, *, is_encoder_decoder: bool,
                 collate: Callable[[list[Example]], dict[str, torch.Tensor]], rank: int = 0, world_size: int = 1):
        self.model, self.args, self.optimizer, self.scheduler = model, args, optimizer, scheduler
        self.is_encoder_decoder, self.collate = is_encoder_decoder, collate
        self.rank, self.world_size = rank, world_size
        self.global_step = 0
        self.steps_called = 0
        self.device = next(model.parameters()).device

    def step(self, examples: list[Example]) -> StepStatistics:
        """One pass over `examples`: one optimizer step per `gradient_accumulation_steps` micro-batches."""
        self.model.train()
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(
            self.args.seed + self.steps_called)).tolist()
        self.steps_called += 1
        per_rank = self.args.per_device_train_batch_size
        global_micro = per_rank * self.world_size
        micro_batches = [order[i: i + global_micro] for i in range(0, len(order), global_micro)]
        accumulation = self.args.gradient_accumulation_steps
        total_loss, total_tokens, grad_norm, optimizer_steps = 0.0, 0, 0.0, 0
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        for start in range(0, len(micro_batches), accumulation):
            group = micro_batches[start: start + accumulation]
            # Every rank holds every example, so the step's token count needs no communication.
            tokens = sum(count_label_tokens(examples[j], self.is_encoder_decoder) for mb in group for j in mb)
            step_loss = torch.zeros((), device=self.device)
            for micro_batch in group:
                shard = micro_batch[self.rank * per_rank: (self.rank + 1) * per_rank]
                if not shard or tokens == 0:
                    continue
                batch = {k: v.to(self.device) for k, v in self.collate([examples[j] for j in shard]).items()}
                loss = summed_token_loss(self.model, batch, self.is_encoder_decoder) / tokens
                loss.backward()
                step_loss += loss.detach()
            if self.world_size > 1:
                step_loss = all_reduce_gradients(parameters, step_loss)[0]
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            optimizer_steps += 1
            total_loss += float(step_loss) * tokens
            total_tokens += tokens
        return StepStatistics(
            loss=total_loss / max(total_tokens, 1),
            learning_rate=current_learning_rate(self.optimizer, self.scheduler),
            grad_norm=grad_norm, num_tokens=total_tokens, num_examples=len(examples),
            optimizer_steps=optimizer_steps, global_step=self.global_step,
        )
