"""The pure-torch step (raytrainer/sft_step.py), keep rule, Parquet rollouts and weight packing, in-process.

Each TRL 0.23 bug the issue lists has a test here named after it."""

from __future__ import annotations

import copy
import math
import pickle
import threading
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from _iterative_fixtures import arguments, gpt2, t5, tokenizer
from helpers import retry_on_taken_port
from actors.rollouts import KeepRule, read_rollouts, write_rollouts
from actors.sampling import can_share_prefill, sample_with_shared_prefill
from actors.weights import WeightBroadcastGroup
from raytrainer.backend.weights import pack_weights, unpack_weights, weight_layout
from raytrainer.iterative.sft_step import (IGNORE_INDEX, SFTStepper, build_optimizer_and_scheduler, check_step_inputs,
                                           encode_examples, pad_examples)

pytestmark = pytest.mark.quick  # pure logic: part of `make test-quick`


def encode(tok, is_encoder_decoder=False, max_length=None, truncation_mode="keep_end", **inputs):
    checked = check_step_inputs(**inputs, is_encoder_decoder=is_encoder_decoder)
    return encode_examples(tok, checked, is_encoder_decoder=is_encoder_decoder, max_length=max_length,
                           truncation_mode=truncation_mode)


def stepper_for(model, args, is_encoder_decoder=False):
    optimizer, scheduler = build_optimizer_and_scheduler(model, args)
    return SFTStepper(model, args, optimizer, scheduler, is_encoder_decoder=is_encoder_decoder,
                      collate=lambda examples: pad_examples(examples, 0))


# ---- TRL bug fixes ---------------------------------------------------------------------------------
def test_causal_labels_are_respected_not_replaced_by_input_ids(tmp_path):
    """TRL dropped given labels for causal LMs; here -100 masks the prompt out of the loss."""
    ids = torch.tensor([4, 13, 5, 14, 6, 1])  # "1+2=3<eos>"
    labels = torch.tensor([IGNORE_INDEX] * 4 + [6, 1])
    examples = encode(tokenizer(), input_ids=[ids], labels=[labels])
    assert examples[0]["labels"] == labels.tolist()
    model = gpt2()
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    expected = F.cross_entropy(logits[3:], ids[4:]).item()  # only "3" and EOS are predicted for loss
    stats = stepper_for(model, arguments(tmp_path)).step(examples)
    assert stats.num_tokens == 2
    assert stats.loss == pytest.approx(expected, rel=1e-5)


def test_texts_labels_are_the_completion_and_only_they_carry_loss():
    """TRL tokenised `texts` again instead of `texts_labels`, so texts_labels did nothing."""
    tok = tokenizer()
    (example,) = encode(tok, texts=["12+3="], texts_labels=["15"])
    assert example["input_ids"] == tok("12+3=15")["input_ids"]
    assert example["labels"] == [IGNORE_INDEX] * 5 + tok("15")["input_ids"]


def test_max_length_truncates_each_sequence_not_the_batch():
    """TRL sliced the batch dimension ([:max_length] on a (batch, seq) tensor)."""
    ids = [torch.arange(3, 13), torch.arange(3, 9), torch.arange(3, 5)]
    keep_end = encode(tokenizer(), input_ids=ids, max_length=4)
    assert [e["input_ids"] for e in keep_end] == [[9, 10, 11, 12], [5, 6, 7, 8], [3, 4]]
    keep_start = encode(tokenizer(), input_ids=ids, max_length=4, truncation_mode="keep_start")
    assert [e["input_ids"] for e in keep_start] == [[3, 4, 5, 6], [3, 4, 5, 6], [3, 4]]
    assert all(len(e["labels"]) == len(e["input_ids"]) == len(e["attention_mask"]) for e in keep_end)


def test_step_returns_statistics_and_global_step_counts_optimizer_steps(tmp_path):
    """TRL returned None and counted micro-batches as global steps."""
    args = arguments(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    stepper = stepper_for(gpt2(), args)
    examples = encode(tokenizer(), texts=["1+1=2", "2+2=4", "3+3=6", "4+4=8", "5+5=10", "6+6=12", "7+7=14",
                                          "8+8=16"])
    stats = stepper.step(examples)  # 8 examples / (2 per micro-batch) = 4 micro-batches = 2 optimizer steps
    assert (stats.optimizer_steps, stats.global_step, stats.num_examples) == (2, 2, 8)
    assert math.isfinite(stats.loss) and stats.grad_norm > 0 and stats.num_tokens > 0
    assert stepper.step(examples[:3]).global_step == 3  # 2 micro-batches (2 + 1 examples) -> 1 optimizer step

def test_max_steps_minus_one_keeps_the_learning_rate(tmp_path):
    """TRL built a linear schedule over max_steps=-1, so the learning rate was 0."""
    args = arguments(tmp_path, lr_scheduler_type="linear", learning_rate=5e-3, max_steps=-1)
    stepper = stepper_for(gpt2(), args)
    stats = stepper.step(encode(tokenizer(), texts=["1+1=2", "2+2=4"]))
    assert stats.learning_rate == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="needs the run length"):
        build_optimizer_and_scheduler(gpt2(), arguments(tmp_path, lr_scheduler_type="cosine"))
    with_steps = arguments(tmp_path, lr_scheduler_type="linear", learning_rate=5e-3, max_steps=10)
    stats = stepper_for(gpt2(), with_steps).step(encode(tokenizer(), texts=["1+1=2"]))
    assert stats.learning_rate == pytest.approx(5e-3 * 9 / 10)


# ---- step semantics ---------------------------------------------------------------------------------
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Losses are summed over tokens and divided by the whole optimizer step's token count (SGD, so the
    comparison is not amplified by Adam's normalisation of near-zero gradients)."""
    examples = encode(tokenizer(), texts=["1+1=2", "23+4=27", "3+3=6", "40+49=89"])
    big, small = gpt2(), gpt2()
    stepper_for(big, arguments(tmp_path, optim="sgd", per_device_train_batch_size=4)).step(examples)
    stepper_for(small, arguments(tmp_path, optim="sgd", per_device_train_batch_size=1,
                                    gradient_accumulation_steps=4)).step(examples)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seq2seq_step_trains_on_labels(tmp_path):
    tok = tokenizer()
    examples = encode(tok, is_encoder_decoder=True, texts=["1+2=", "30+4="], texts_labels=["3", "34"])
    assert examples[1]["labels"] == tok("34")["input_ids"]
    model = t5()
    before = copy.deepcopy(model.state_dict())
    stats = stepper_for(model, arguments(tmp_path), is_encoder_decoder=True).step(examples)
    assert stats.num_tokens == 3 and math.isfinite(stats.loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inputs, message", [
    (dict(input_ids=[torch.tensor([1, 2])], texts=["a"]), "both input_ids and texts"),
    (dict(), "needs input_ids"),
    (dict(texts=[]), "texts is empty"),
    (dict(texts=["1", "2"], texts_labels=["1"]), "texts has 2 examples but texts_labels has 1"),
    (dict(input_ids=[torch.tensor([1, 2])], labels=[torch.tensor([1]), torch.tensor([2])]), "labels has 2"),
    (dict(input_ids=[torch.tensor([1, 2])], attention_mask=[torch.tensor([1])]), "must align"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long)), "must be a list"),
    (dict(input_ids=[torch.ones(2, 3, dtype=torch.long)]), "one 1-D tensor per example"),
    (dict(texts="1+1="), "must be a list"),
])
def test_bad_step_inputs_name_the_problem(inputs, message):
    with pytest.raises(ValueError, match=message):
        check_step_inputs(**inputs)


def test_seq2seq_without_labels_is_rejected():
    with pytest.raises(ValueError, match="sequence-to-sequence model needs targets"):
        check_step_inputs(texts=["1+1="], is_encoder_decoder=True)


def test_attention_mask_zeros_are_ignored_in_default_labels():
    (example,) = encode(tokenizer(), input_ids=[torch.tensor([4, 5, 0, 0])],
                        attention_mask=[torch.tensor([1, 1, 0, 0])])
    assert example["labels"] == [4, 5, IGNORE_INDEX, IGNORE_INDEX]


# ---- keep rule, rollouts, weights ------------------------------------------------------------------
def test_keep_rule_min_reward_and_best_k():
    rewards, prompts = [0.0, 1.0, 0.5, 1.0, 0.2, 0.9], [0, 0, 0, 1, 1, 1]
    assert KeepRule().select(rewards, prompts) == [True] * 6
    assert KeepRule(min_reward=0.5).select(rewards, prompts) == [False, True, True, True, False, True]
    assert KeepRule(best_k=1).select(rewards, prompts) == [False, True, False, True, False, False]
    assert KeepRule(min_reward=0.95, best_k=2).select(rewards, prompts) == [False, True, False, True, False, False]
    with pytest.raises(ValueError, match="best_k=0"):
        KeepRule(best_k=0)


def test_rollouts_round_trip_through_parquet(tmp_path):
    for round_index in (1, 0):
        write_rollouts(tmp_path, round_index, {
            "round": [round_index] * 2, "prompt_index": [0, 0], "sample_index": [0, 1], "prompt": ["1+1="] * 2,
            "completion": ["2", "3"], "reward": [1.0, 0.0], "kept": [True, False], "weight_version": [5, 5]})
    table = read_rollouts(tmp_path)
    assert table.column("round").to_pylist() == [0, 0, 1, 1]
    assert table.column("kept").to_pylist() == [True, False, True, False]
    assert not list((tmp_path / "rollouts").glob("*.partial"))


def test_weights_pack_tied_embeddings_once_and_round_trip():
    source, target = gpt2(seed=1), gpt2(seed=2)
    assert source.lm_head.weight.data_ptr() == source.transformer.wte.weight.data_ptr()
    payload = pack_weights(source, version=7)
    assert payload.layout.aliases == {"lm_head.weight": "transformer.wte.weight"}
    unique_bytes = sum(p.numel() * p.element_size() for p in source.parameters())  # parameters() dedups ties
    buffers = sum(b.numel() * b.element_size() for b in source.buffers() if b.dtype.is_floating_point)
    assert payload.nbytes <= unique_bytes + buffers and payload.nbytes >= unique_bytes
    wte = [i for i, slot in enumerate(payload.layout.slots) if slot.name == "transformer.wte.weight"][0]
    assert payload.arrays[wte].ctypes.data == source.transformer.wte.weight.data_ptr()  # packed without a copy
    payload = pickle.loads(pickle.dumps(payload, protocol=5))  # a copy, as the object store holds it
    for array in payload.arrays:
        array.setflags(write=False)  # as it arrives from the object store
    unpack_weights(payload, target)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    assert target.lm_head.weight.data_ptr() == target.transformer.wte.weight.data_ptr()


def test_broadcast_group_sends_weights_over_gloo(tmp_path):
    """The NCCL path's code, run with gloo between two threads (ranks)."""
    sender, receiver = gpt2(seed=1), gpt2(seed=2)
    layout = weight_layout(sender.state_dict())

    def exchange(port):
        errors = {}

        def rank(index):
            try:
                group = WeightBroadcastGroup("127.0.0.1", port, index, 2, "gloo", timeout=timedelta(seconds=60))
                group.send(sender, layout) if index == 0 else group.receive(receiver, layout)
            except Exception as error:  # surfaced below
                errors[index] = error

        threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
        [t.start() for t in threads]
        [t.join(90) for t in threads]
        if errors:
            raise errors.get(0, errors.get(1))  # rank 0's first: it binds the port

    retry_on_taken_port(exchange)  # rank 0's store binds the port: another program may have taken it meanwhile
    for a, b in zip(sender.state_dict().values(), receiver.state_dict().values()):
        assert torch.equal(a, b)


def test_shared_prefill_samples_what_generate_samples():
    """One prefill per prompt, cache repeated per sample: the same tokens as generate(num_return_sequences)."""
    model, tok = gpt2(seed=3).eval(), tokenizer()
    tok.padding_side = "left"
    encoded = tok(["1+2=", "13+27=", "7+45="], padding=True, return_tensors="pt")  # different lengths: padding
    settings = dict(do_sample=True, max_new_tokens=6, pad_token_id=tok.pad_token_id, temperature=1.3, top_k=8,
                    output_logits=True, return_dict_in_generate=True)
    assert can_share_prefill(model, encoded, 5, settings)
    torch.manual_seed(11)
    expected = model.generate(**encoded, num_return_sequences=5, **settings)
    torch.manual_seed(11)
    shared = sample_with_shared_prefill(model, encoded, 5, **settings)
    assert shared.sequences.shape == expected.sequences.shape == (15, encoded["input_ids"].shape[1] + 6)
    assert torch.equal(shared.sequences, expected.sequences)
    for step, (ours, theirs) in enumerate(zip(shared.logits, expected.logits, strict=True)):
        torch.testing.assert_close(ours, theirs, msg=f"logits differ at generated token {step}")
    assert len({tuple(row) for row in shared.sequences[:5].tolist()}) > 1  # really sampled, not five copies


def test_shared_prefill_is_not_used_where_it_would_change_the_result():
    model, tok = gpt2().eval(), tokenizer()
    encoded = tok(["1+2=", "3+4="], padding=True, return_tensors="pt")
    assert not can_share_prefill(model, encoded, 1, {})  # one sample: nothing to share
    assert not can_share_prefill(model, encoded, 4, {"num_beams": 4})
    assert not can_share_prefill(model, encoded, 4, {"use_cache": False})
    assert not can_share_prefill(model, {**encoded, "token_type_ids": encoded["input_ids"] * 0}, 4, {})
    assert not can_share_prefill(t5(), encoded, 4, {})
