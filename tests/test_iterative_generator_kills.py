"""The generator actor's process SIGKILLed in the middle of sampling a round and in the middle of loading a weight
sync, with `max_staleness=1` (round k+1 samples while round k trains): the run finishes, the restarted generator
holds the trainer's latest weights bitwise, no round trains on rollouts staler than allowed, and the history is the
one an uninterrupted run gives where the kill leaves it determined.

The kill points are exact: a test-only subclass of the generator actor kills its own process (os.kill of its real
pid, SIGKILL) from a forward hook during `generate` of one round, or after half of one weight version's tensors
are copied in. A marker file makes it happen once, so the replacement generator runs normally."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch

from _iterative_fixtures import arguments, gpt2, tokenizer
from actors.generator import GeneratorActor
from actors.rollouts import read_rollouts
from helpers import process_gone
from raytrainer import IterativeSFTTrainer
from raytrainer.backend.weights import load_slots

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test-only actor and reward go by value
PROMPTS = ["1+2=", "30+4=", "12+12=", "7+40="]
pytestmark = pytest.mark.timeout(300)  # a restart that never gets its weights loops or waits: fail, do not hang
RUN = dict(samples_per_prompt=2, max_staleness=1, generation_kwargs={"max_new_tokens": 3})
ROUNDS = 3


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def _die(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


@ray.remote
class KillableGenerator(GeneratorActor.__ray_actor_class__):
    """The generator, SIGKILLing itself once at `kill_at`: ("sample", round) during that round's `generate`
    (after its second forward pass), or ("load", version) after copying half of that version's tensors."""

    def __init__(self, *args, kill_at: tuple[str, int], marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at, self.marker = kill_at, marker

    def _armed(self, what: str, number: int) -> bool:
        return self.kill_at == (what, number) and not os.path.exists(self.marker)

    def rollout_round(self, round_index, *args, **kwargs):
        if self._armed("sample", round_index):
            forwards = []

            def kill_mid_generation(module, inputs, output):
                forwards.append(1)
                if len(forwards) == 2:  # the prompt's forward and one generated token are done
                    _die(self.marker)

            self.model.register_forward_hook(kill_mid_generation)
        return super().rollout_round(round_index, *args, **kwargs)

    def load_weights(self, payload):
        if self._armed("load", payload.version):
            half = payload.layout.slots[: len(payload.layout.slots) // 2]
            load_slots(self.model, half, [torch.from_numpy(a.copy()) for a in payload.arrays[: len(half)]])
            _die(self.marker)  # the model is now half old, half new weights
        return super().load_weights(payload)

    def receive_weights(self, layout, version):
        if self._armed("load", version):  # the trainer's broadcast of this version is on its way
            _die(self.marker)
        return super().receive_weights(layout, version)

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.weight_version, {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class KillableTrainer(IterativeSFTTrainer):
    """Starts (and restarts) its generator as a `KillableGenerator`; everything else is the product's code."""

    kill_at: tuple[str, int] = ("never", -1)
    marker: str = ""

    def _new_generator(self):
        cpus = self._cpus_per_actor()
        return KillableGenerator.options(num_cpus=cpus, num_gpus=self._gpus_per_actor()).remote(
            self._model_ref, self.tokenizer, is_encoder_decoder=self.is_encoder_decoder,
            num_threads=max(1, int(cpus)), seed=self.args.seed, kill_at=self.kill_at, marker=self.marker)


@pytest.fixture
def run(ray_session, tmp_path):
    made = []

    def run_one(name: str, kill_at=("never", -1), transport=None, **overrides):
        trainer = KillableTrainer(gpt2(), arguments(tmp_path / name), tokenizer())
        trainer._weight_transport = transport  # None: the object store (the CPU default); "gloo": a broadcast group
        trainer.kill_at, trainer.marker = kill_at, str(tmp_path / f"{name}.killed")
        made.append(trainer)
        trainer.train(PROMPTS, length_reward, ROUNDS, **{**RUN, **overrides})
        return trainer

    yield run_one
    for trainer in made:
        trainer.shutdown()


def _killed_pid(trainer) -> int:
    pid = int(Path(trainer.marker).read_text())
    assert process_gone(pid, timeout_s=30), f"the killed generator {pid} is still running"
    assert ray.get(trainer._generator.pid.remote()) != pid
    return pid


def _assert_generator_has_the_latest_weights(trainer) -> None:
    version, weights = ray.get(trainer._generator.weights.remote())
    assert version == trainer._trainer_version == ROUNDS  # one weight version per round
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(weights[name], value), name


def _numbers(history, rounds=slice(None)):
    keys = ("round", "rollout_weight_version", "staleness", "reward_mean", "kept", "loss", "global_step",
            "weight_version")
    return [tuple(h[k] for k in keys) for h in history[rounds]]


@pytest.mark.parametrize("transport", [None, "gloo"])
def test_generator_killed_while_loading_a_weight_sync_gives_the_uninterrupted_run(run, transport):
    """Killed after loading half of version 1 (round 0's sync, queued behind round 1's sampling): the replacement
    loads version 1 whole before sampling round 2, as the uninterrupted generator did, so every number is equal."""
    straight = run("straight", transport=transport)
    killed = run("killed", kill_at=("load", 1), transport=transport)
    _killed_pid(killed)
    assert _numbers(killed.history) == _numbers(straight.history)
    assert [h["staleness"] for h in killed.history] == [0, 1, 1]
    assert [h["generator_restarts"] for h in killed.history] == [0, 1, 1]
    assert killed.history[0]["sync_bytes"] == 0 and straight.history[0]["sync_bytes"] > 0  # the lost sync
    _assert_generator_has_the_latest_weights(killed)


def test_generator_killed_while_sampling_an_overlapped_round_resamples_it_with_the_latest_weights(run, tmp_path):
    """Killed mid-`generate` of round 1 (sampled while round 0 trains, with version 0): round 1 is sampled again
    by the replacement with version 1, which it loads before anything else, so rounds 0 and 1 are those of an
    on-policy (max_staleness=0) run; round 2 is sampled with version 1 while round 1 trains (staleness 1)."""
    on_policy = run("on_policy", max_staleness=0)
    killed = run("killed", kill_at=("sample", 1))
    _killed_pid(killed)
    assert _numbers(killed.history, slice(0, 2)) == _numbers(on_policy.history, slice(0, 2))
    assert [h["rollout_weight_version"] for h in killed.history] == [0, 1, 1]
    assert [h["staleness"] for h in killed.history] == [0, 0, 1]  # never above max_staleness=1
    assert [h["generator_restarts"] for h in killed.history] == [0, 1, 1]
    assert [h["weight_version"] for h in killed.history] == [1, 2, 3]
    # The rollout files hold what was trained on: round 1 rewritten by the replacement, with version 1.
    rollouts = read_rollouts(tmp_path / "killed")
    by_round = {r: {v for rr, v in zip(rollouts.column("round").to_pylist(),
                                       rollouts.column("weight_version").to_pylist()) if rr == r} for r in range(3)}
    assert by_round == {0: {0}, 1: {1}, 2: {1}} and rollouts.num_rows == 3 * 8
    _assert_generator_has_the_latest_weights(killed)
