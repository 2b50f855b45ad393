"""The shared tiny corpus, the overhead benchmark's bookkeeping and a short run of the demo."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "bench"))

import tiny_corpus  # noqa: E402
import trainer_overhead  # noqa: E402


def test_corpus_is_deterministic_and_its_facts_hold():
    documents = tiny_corpus.generate_documents(50, seed=3)
    assert documents == tiny_corpus.generate_documents(50, seed=3)
    assert documents != tiny_corpus.generate_documents(50, seed=4)
    text = " ".join(documents)
    for animal, food in tiny_corpus.FOOD_OF_ANIMAL.items():
        assert not re.search(rf"the {animal} eats (?!{food} )", text)
    for a, b, total in re.findall(r"(\w+) plus (\w+) is (\w+) \.", text):
        words = tiny_corpus.NUMBER_WORDS
        assert words.index(a) + words.index(b) == words.index(total)


def test_tokenizer_round_trips_and_blocks_have_fixed_length():
    documents = tiny_corpus.generate_documents(300, seed=0)
    tokenizer = tiny_corpus.train_tokenizer(documents, vocab_size=400)
    assert len(tokenizer) <= 400
    assert tokenizer.decode(tokenizer(documents[0])["input_ids"]) == documents[0]
    assert tokenizer.eos_token == tokenizer.pad_token == tiny_corpus.END_OF_TEXT
    blocks = tiny_corpus.token_blocks(documents, tokenizer, block_length=32)
    total_tokens = sum(len(ids) + 1 for ids in tokenizer(documents)["input_ids"])
    assert len(blocks) == total_tokens // 32
    assert all(len(row["input_ids"]) == 32 and row["labels"] == row["input_ids"] for row in blocks)


def test_benchmark_summary_uses_the_driver_clock_and_skips_warmup():
    record = {"step_ends": [10.0, 10.5, 11.0, 11.2, 11.4, 11.6], "step_end_cpu_times": [1, 2, 3, 3.1, 3.2, 3.3],
              "torch_threads": 1}
    summary = trainer_overhead.summarize_call(started=8.0, returned=12.0, step_record=record, warmup_steps=2)
    assert summary["first_step_s"] == pytest.approx(2.0)
    assert summary["step_s"] == pytest.approx(0.2)
    assert summary["step_cpu_s"] == pytest.approx(0.1)
    assert summary["end_to_end_s"] == pytest.approx(4.0)
    assert summary["steps"] == 6


def test_benchmark_rejects_unknown_variants_and_odd_batches_for_two_workers(capsys):
    with pytest.raises(SystemExit):
        trainer_overhead.parse_options(["--variants", "ax"])
    assert "unknown ['x']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        trainer_overhead.parse_options(["--batch", "5"])
    assert "odd" in capsys.readouterr().err


def test_benchmark_quick_run_of_transformers_variant_prints_a_table(tmp_path):
    json_path = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "trainer_overhead.py"), "--quick", "--variants", "a",
         "--steps", "8", "--json-out", str(json_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    row = next(line for line in completed.stdout.splitlines() if line.startswith("| (a)"))
    assert row.count("|") >= 10
    (measurement,) = json.loads(json_path.read_text())["measurements"]["a"]
    assert measurement[0]["steps"] == 8
    assert 0 < measurement[0]["first_step_s"] < measurement[0]["end_to_end_s"]


@pytest.mark.timeout(900)
def test_demo_learns_saves_a_loadable_model_and_plots(tmp_path):
    output_dir = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--output-dir", str(output_dir), "--max-steps", "40"],
        capture_output=True, text=True, timeout=880, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    perplexities = [float(value) for value in re.findall(r"perplexity\s+([\d.]+)", completed.stdout)]
    assert len(perplexities) == 2
    before, after = perplexities
    assert before > 200 and after < before / 10, completed.stdout
    assert (output_dir / "loss_curve.png").stat().st_size > 10_000
    assert (output_dir / "model" / "config.json").exists()
    assert "'the cat eats' ->" in completed.stdout
