"""IterativeSFTTrainer end to end on real Ray actors: step, DDP group, generate, the rollout loop,
staleness, Parquet rollouts, a killed generator process, resume, and the learning example (short)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray
import torch
from transformers import DataCollatorForSeq2Seq, GPT2LMHeadModel, TrainerCallback

from _iterative_fixtures import arguments, arithmetic, gpt2, t5, tokenizer
from actors.generator import completion_tokens
from actors.rollouts import read_rollouts
from raytrainer import IterativeSFTTrainer
from raytrainer.iterative.sft_step import SFTStepper, build_optimizer_and_scheduler, check_step_inputs, encode_examples, pad_examples

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its reward functions go to the generator
TEXTS, LABELS = ["1+2=", "30+4=", "12+12=", "7+40="], ["3", "34", "24", "47"]


@pytest.fixture
def make_trainer(ray_session, tmp_path):
    made = []

    def make(model=None, **overrides):
        trainer = IterativeSFTTrainer(model or gpt2(), arguments(tmp_path, **overrides), tokenizer())
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.shutdown()


def length_reward(prompts, completions):
    """A reward every sample can earn something from, so rounds always keep examples."""
    return [float(len(c)) for c in completions]


def test_step_on_the_actor_matches_the_in_process_step(make_trainer, tmp_path):
    trainer = make_trainer()
    stats = trainer.step(texts=TEXTS, texts_labels=LABELS)
    assert stats["global_step"] == 1 and stats["weight_version"] == 1 and stats["num_examples"] == 4

    reference = gpt2()
    args = arguments(tmp_path)
    examples = encode_examples(tokenizer(), check_step_inputs(texts=TEXTS, texts_labels=LABELS),
                               is_encoder_decoder=False)
    expected = SFTStepper(reference, args, *build_optimizer_and_scheduler(reference, args), is_encoder_decoder=False,
                          collate=lambda e: pad_examples(e, 0)).step(examples)
    assert stats["loss"] == pytest.approx(expected.loss, rel=1e-6)
    for a, b in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_two_ddp_trainer_actors_shard_the_batch_and_match_one(make_trainer):
    texts = [f"{a}+{a}=" for a in range(8)]
    labels = [str(2 * a) for a in range(8)]
    one = make_trainer(optim="sgd", per_device_train_batch_size=4)
    two = make_trainer(optim="sgd", per_device_train_batch_size=2, num_workers=2)
    stats_one, stats_two = (t.step(texts=texts, texts_labels=labels) for t in (one, two))
    assert stats_one["optimizer_steps"] == stats_two["optimizer_steps"] == 2
    assert stats_two["loss"] == pytest.approx(stats_one["loss"], rel=1e-5)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generate_uses_the_latest_weights_and_reports_their_version(make_trainer):
    trainer = make_trainer()
    first = trainer.generate(TEXTS, do_sample=False, max_new_tokens=3)
    assert first.weight_version == 0 and len(first) == 4 and all(isinstance(c, str) for c in first)
    trainer.step(texts=TEXTS, texts_labels=LABELS)
    sampled = trainer.generate(TEXTS[:2], do_sample=True, max_new_tokens=3, num_return_sequences=3)
    assert sampled.weight_version == 1 and len(sampled) == 6


def test_seq2seq_model_steps_and_generates_on_actors(make_trainer):
    trainer = make_trainer(model=t5())
    with pytest.raises(ValueError, match="needs targets"):
        trainer.step(texts=TEXTS)
    assert trainer.step(texts=TEXTS, texts_labels=LABELS)["num_tokens"] == 7
    assert trainer.generate(TEXTS, do_sample=False, max_new_tokens=3).weight_version == 1


def test_bad_arguments_fail_on_the_driver_before_actors_start(make_trainer, tmp_path, no_worker_start):
    with pytest.raises(ValueError, match="truncation_mode='middle'"):
        IterativeSFTTrainer(gpt2(), arguments(tmp_path), tokenizer(), truncation_mode="middle")
    with pytest.raises(ValueError, match="same argument"):
        IterativeSFTTrainer(gpt2(), arguments(tmp_path), tokenizer(), processing_class=tokenizer())
    with pytest.raises(ValueError, match="needs the run length"):
        IterativeSFTTrainer(gpt2(), arguments(tmp_path, lr_scheduler_type="cosine"), tokenizer())
    trainer = make_trainer()
    for kwargs, message in [(dict(max_staleness=2), "max_staleness=2"), (dict(prompts_per_round=99), "1..4"),
                            (dict(best_k=0), "best_k=0"), (dict(samples_per_prompt=0), "samples_per_prompt=0")]:
        with pytest.raises(ValueError, match=message):
            trainer.train(TEXTS, length_reward, 1, **kwargs)
    with pytest.raises(ValueError, match="reward_fn must be callable"):
        trainer.train(TEXTS, "exact", 1)
    assert trainer._trainers == []  # nothing started


def test_processing_class_is_the_tokenizer(ray_session, tmp_path):
    trainer = IterativeSFTTrainer(gpt2(), arguments(tmp_path), processing_class=tokenizer())
    assert trainer.tokenizer.eos_token == "<eos>"


@pytest.mark.quick
def test_train_round_records_history_and_writes_rollouts_before_training(make_trainer, tmp_path):
    trainer = make_trainer()
    logged = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(logs)

    trainer.add_callback(Record())
    history = trainer.train(TEXTS, length_reward, 2, samples_per_prompt=3, best_k=2,
                            generation_kwargs={"max_new_tokens": 3})
    assert [h["round"] for h in history] == [0, 1] and logged == history
    assert [h["weight_version"] for h in history] == [1, 2]
    assert [h["rollout_weight_version"] for h in history] == [0, 1]
    assert all(h["kept"] == 8 and h["num_rollouts"] == 12 and h["sync_bytes"] > 0 for h in history)
    rollouts = read_rollouts(tmp_path)
    assert rollouts.num_rows == 24
    assert rollouts.column("kept").to_pylist().count(True) == 16
    assert set(rollouts.column("weight_version").to_pylist()) == {0, 1}


def test_weights_can_go_over_a_broadcast_group(make_trainer):
    """The GPU path (trainer rank 0 and the generator in a NCCL broadcast group of their own), run on gloo."""
    trainer = make_trainer()
    trainer._weight_transport = "gloo"  # chosen automatically: "nccl" when each actor has a GPU
    history = trainer.train(TEXTS * 2, length_reward, 2, samples_per_prompt=2, max_staleness=1,
                            generation_kwargs={"max_new_tokens": 3})
    assert [h["weight_version"] for h in history] == [1, 2]
    assert all(h["sync_bytes"] > 0 for h in history)
    generated = trainer.generate(TEXTS, do_sample=False, max_new_tokens=3)
    assert generated.weight_version == 2
    # The generator's weights are the trainer's: greedy completions equal the fetched model's.
    model, tok = trainer.model.eval(), tokenizer()
    tok.padding_side = "left"
    encoded = tok(TEXTS, padding=True, return_tensors="pt")
    expected = model.generate(**encoded, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    new_tokens = expected[:, encoded["input_ids"].shape[1]:].tolist()
    completions = [completion_tokens(row, tok.eos_token_id) for row in new_tokens]
    assert list(generated) == tok.batch_decode(completions, skip_special_tokens=True)


def test_max_staleness_one_overlaps_and_never_trains_on_staler_rollouts(make_trainer, tmp_path):
    trainer = make_trainer()
    history = trainer.train(TEXTS, length_reward, 4, samples_per_prompt=2, max_staleness=1,
                            generation_kwargs={"max_new_tokens": 3})
    assert [h["weight_version"] for h in history] == [1, 2, 3, 4]
    assert [h["staleness"] for h in history] == [0, 1, 1, 1]  # round k+1 was sampled while round k trained
    versions = read_rollouts(tmp_path).column("weight_version").to_pylist()
    assert sorted(set(versions)) == [0, 1, 2]


@pytest.mark.parametrize("transport", [None, "gloo"])  # the object store (CPU default); a broadcast group
def test_killed_generator_process_is_restarted_with_the_latest_weights(make_trainer, transport):
    trainer = make_trainer()
    trainer._weight_transport = transport
    killed = []

    class KillGenerator(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs["round"] == 0:
                pid = ray.get(trainer._generator.pid.remote())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                time.sleep(1)

    trainer.add_callback(KillGenerator())
    history = trainer.train(TEXTS, length_reward, 3, samples_per_prompt=2, generation_kwargs={"max_new_tokens": 3})
    assert len(history) == 3 and history[-1]["generator_restarts"] == 1
    assert [h["rollout_weight_version"] for h in history] == [0, 1, 2]  # the new generator had version 1
    assert ray.get(trainer._generator.pid.remote()) != killed[0]


def test_resume_continues_after_the_last_completed_round(make_trainer, tmp_path):
    """An uninterrupted 3-round run saves a checkpoint per round; a new trainer resumed from the one after round 2
    generates round 2 only and ends with the uninterrupted run's weights (a restart from scratch would not)."""
    saving = dict(save_strategy="steps", save_steps=1, save_total_limit=2)
    run = dict(samples_per_prompt=2, generation_kwargs={"max_new_tokens": 3})
    straight = make_trainer(**saving)
    straight.train(TEXTS, length_reward, 3, **run)
    # 8 kept samples / batch 4 = 2 optimizer steps per round; checkpoint-2 rotated away by save_total_limit=2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    checkpoint = tmp_path / "checkpoint-4"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()}
    expected = {k: v.clone() for k, v in straight.model.state_dict().items()}
    expected_history = [(h["round"], h["reward_mean"], h["loss"]) for h in straight.history]
    straight.shutdown()
    written = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (tmp_path / "rollouts").iterdir()}
    assert len(written) == 3

    logged = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(logs["round"])

    resumed = make_trainer(**saving)
    resumed.add_callback(Record())
    history = resumed.train(TEXTS, length_reward, 3, resume_from_checkpoint=str(checkpoint), **run)
    assert logged == [2]  # only the round after the checkpoint ran
    assert [h["round"] for h in history] == [0, 1, 2]
    for h, (round_index, reward_mean, loss) in zip(history, expected_history):
        assert (h["reward_mean"], h["loss"]) == (reward_mean, pytest.approx(loss, rel=1e-6)), round_index
    assert history[2]["rollout_weight_version"] == 2 and history[2]["global_step"] == 6
    now = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in (tmp_path / "rollouts").iterdir()}
    assert [name for name in sorted(now) if now[name] != written[name]] == ["round-000002.parquet"]
    for name, value in resumed.model.state_dict().items():  # the resumed run's own final weights
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_model_property_and_save_model(make_trainer, tmp_path):
    trainer = make_trainer()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.step(texts=TEXTS, texts_labels=LABELS)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, after[name]), name


def test_evaluate_scores_the_trained_weights(make_trainer):
    trainer = make_trainer()
    dataset = arithmetic.labelled_dataset(TEXTS, tokenizer())
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"rows": len(prediction.predictions)}

    trainer.compute_metrics = compute_metrics
    def loss_of(model):  # the 4 rows are one evaluation batch (per_device_eval_batch_size=8)
        rows = [dataset[i] for i in range(len(dataset))]
        with torch.no_grad():
            return model.eval()(**DataCollatorForSeq2Seq(tokenizer(), label_pad_token_id=-100)(rows)).loss.item()

    before = trainer.evaluate(dataset)
    assert before["eval_loss"] == pytest.approx(loss_of(gpt2()), rel=1e-5)
    trainer.step(texts=TEXTS, texts_labels=LABELS)
    after = trainer.evaluate(dataset)
    assert after["eval_loss"] == pytest.approx(loss_of(trainer.model), rel=1e-5)
    assert abs(after["eval_loss"] - before["eval_loss"]) > 1e-3 and after["eval_rows"] == 4 and seen[-1][0] == 4


def test_arithmetic_example_learns_in_a_few_rounds(ray_session, tmp_path):
    """The example, shortened: exact-match rejection sampling lifts held-out accuracy."""
    result = arithmetic.run(rounds=6, output_dir=str(tmp_path), quiet=True)
    # Seen with seeds 0 and 1: +0.24 and +0.19 after 6 rounds (the warm-up ends near 33% either way).
    assert result["after"][-1] >= result["before"] + 0.10, result
