"""`raytrainer train CONFIG.yaml`: config parsing, overrides, clear errors, and building model and data.

These tests never start Ray: every check here must fail fast on the driver (`no_ray_start` makes connecting to Ray
or starting workers raise in each of them).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raytrainer.cli import main
from raytrainer.cli.config import ConfigError, load_job_config
from raytrainer.cli.build import build_training_job

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "job_submit"
pytestmark = [pytest.mark.usefixtures("no_ray_start"), pytest.mark.quick]
TINY_GPT2 = "{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 64}"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    sys.path.insert(0, str(EXAMPLE))
    try:
        from prepare_data import sentences, train_tokenizer
    finally:
        sys.path.remove(str(EXAMPLE))
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sentences(64, seed=0)).save_pretrained(folder)
    return folder


def write_config(folder: Path, text: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def job_folder(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"the cat sees a red ball {i}"} for i in range(10)])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "a dog likes the old house"}] * 3)
    write_config(tmp_path, f"""\
        model:
          config: {TINY_GPT2}
          tokenizer: {tokenizer_dir}
        data:
          train: train.jsonl
          eval: eval.jsonl
          max_length: 16
        training:
          output_dir: {tmp_path / 'out'}
          learning_rate: 1e-3
          max_steps: 3
        """)
    return tmp_path


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as raised:
        load_job_config(path, list(overrides))
    return str(raised.value)


def test_help_documents_the_file_format():
    result = subprocess.run([sys.executable, "-m", "raytrainer", "train", "--help"], capture_output=True,
                            text=True, check=True)
    for expected in ("model:", "data:", "training:", "--set", "save_to_disk", "TrainingArguments", "RAY_ADDRESS"):
        assert expected in result.stdout


def test_valid_config_builds_model_data_and_arguments(job_folder, tokenizer_dir):
    config = load_job_config(job_folder / "job.yaml", ["training.max_steps=7", "model.config.n_layer=1"])
    job = build_training_job(config)
    assert job.args.max_steps == 7
    assert job.args.learning_rate == 1e-3  # `1e-3` is a string to YAML 1.1; converted to the field's float
    assert job.model.config.n_layer == 1 and job.model.config.vocab_size == len(job.tokenizer)
    assert type(job.model).__name__ == "GPT2LMHeadModel"
    assert len(job.train_dataset) == 10 and len(job.eval_dataset) == 3
    assert job.train_dataset.column_names == ["input_ids", "attention_mask"]
    assert max(len(ids) for ids in job.train_dataset["input_ids"]) <= 16
    batch = job.data_collator([job.train_dataset[0], job.train_dataset[1]])
    assert "labels" in batch and batch["labels"].shape == batch["input_ids"].shape


def test_bare_training_field_override_is_a_shortcut(job_folder):
    config = load_job_config(job_folder / "job.yaml", ["num_workers=2", "seed=7"])
    assert config.training["num_workers"] == 2 and config.training["seed"] == 7


def test_bad_yaml_names_the_line(tmp_path):
    path = write_config(tmp_path, "model:\n  config: {model_type: gpt2\ndata:\n  train: x\n")
    message = config_error(path)
    assert "job.yaml line" in message and "not valid YAML" in message


def test_json_config_and_its_errors_name_the_line(job_folder):
    config = load_job_config(job_folder / "job.yaml")
    document = {"model": {"config": config.model["config"], "tokenizer": str(config.model["tokenizer"])},
                "data": {"train": "train.jsonl"}, "training": {"output_dir": "out", "max_stesp": 2}}
    path = job_folder / "job.json"
    text = json.dumps(document, indent=2)
    line = text.splitlines().index('    "max_stesp": 2') + 1
    path.write_text(text)
    message = config_error(path)
    assert f"job.json line {line}:" in message and "'max_steps'" in message
    path.write_text(text.replace('"max_stesp": 2', '"max_steps": 2,'))  # a trailing comma
    assert f"job.json line {line + 1}, column 3: not valid JSON" in config_error(path)


def test_unknown_training_field_names_line_and_suggests(job_folder):
    path = job_folder / "job.yaml"
    path.write_text(path.read_text().replace("learning_rate:", "learnig_rate:"))
    message = config_error(path)
    assert "job.yaml line 10" in message and "'learnig_rate'" in message and "'learning_rate'" in message


def test_unknown_section_and_model_key(job_folder):
    path = job_folder / "job.yaml"
    assert "Did you mean 'training'" in config_error(path, ["trainig.seed=1"])
    message = config_error(path, ["model.tokenzier=x"])
    assert "--set model.tokenzier" in message and "'tokenizer'" in message


def test_missing_paths_are_named(job_folder):
    path = job_folder / "job.yaml"
    message = config_error(path, ["data.eval=missing/*.parquet"])
    assert "data.eval='missing/*.parquet' does not exist" in message
    assert "model.tokenizer='/nowhere' does not exist" in config_error(path, ["model.tokenizer=/nowhere"])
    assert "does not exist" in config_error(job_folder / "absent.yaml")


def test_model_needs_exactly_one_source(job_folder):
    path = job_folder / "job.yaml"
    assert "exactly one of model.path" in config_error(path, ["model.path=."])
    assert "model.task='regression' is not supported" in config_error(path, ["model.task=regression"])


def test_invalid_training_values_are_reported(job_folder):
    path = job_folder / "job.yaml"
    assert "training.max_steps='many' is not a valid int" in config_error(path, ["max_steps=many"])
    with pytest.raises(ConfigError, match="num_workers=0 is invalid"):
        build_training_job(load_job_config(path, ["num_workers=0"]))


def test_resume_needs_an_existing_checkpoint(job_folder):
    path = job_folder / "job.yaml"
    with pytest.raises(ConfigError, match="holds no complete checkpoint-<step> folder"):
        build_training_job(load_job_config(path, ["resume_from_checkpoint=true"]))
    (job_folder / "out" / "checkpoint-4").mkdir(parents=True)  # cut off mid-write: no trainer_state.json yet
    with pytest.raises(ConfigError, match="holds no complete checkpoint-<step> folder"):
        build_training_job(load_job_config(path, ["resume_from_checkpoint=true"]))
    (job_folder / "out" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert build_training_job(load_job_config(path, ["resume_from_checkpoint=true"])).args.max_steps == 3
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        build_training_job(load_job_config(path, ["resume_from_checkpoint=nowhere/checkpoint-9"]))


def test_missing_text_column_lists_columns(job_folder):
    with pytest.raises(ConfigError, match=r"no text column 'body'.*\['text'\]"):
        build_training_job(load_job_config(job_folder / "job.yaml", ["data.text_column=body"]))


def test_main_reports_errors_without_starting_ray(job_folder, capsys):
    assert main(["train", str(job_folder / "job.yaml"), "--set", "training.bogus=1"]) == 2
    assert "raytrainer: error:" in capsys.readouterr().err
    assert main(["train", str(job_folder / "job.yaml"), "--dry-run"]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out


def test_parquet_csv_and_save_to_disk_data(tmp_path, tokenizer_dir):
    import datasets

    rows = {"text": ["a dog sees the sky", "the cat reads", "my friend builds a boat", "a child paints"],
            "label": [0, 1, 1, 0]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "eval.csv"), index=False)
    splits = {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows).select([0])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": splits["train"]}).save_to_disk(str(tmp_path / "train_only"))
    write_config(tmp_path, f"""\
        model: {{config: {TINY_GPT2}, task: sequence-classification, tokenizer: {tokenizer_dir}}}
        data: {{train: train.parquet, eval: eval.csv}}
        training: {{output_dir: out}}
        """)
    job = build_training_job(load_job_config(tmp_path / "job.yaml"))
    assert job.model.config.num_labels == 2 and type(job.model).__name__ == "GPT2ForSequenceClassification"
    assert job.train_dataset["labels"] == rows["label"] and job.eval_dataset["labels"] == rows["label"]
    saved = build_training_job(load_job_config(tmp_path / "job.yaml", ["data.train=saved", "data.eval=saved"]))
    assert len(saved.train_dataset) == 4 and len(saved.eval_dataset) == 1  # eval falls back to the test split
    with pytest.raises(ConfigError, match=r"splits \['train'\], none named validation"):
        build_training_job(load_job_config(tmp_path / "job.yaml", ["data.eval=train_only"]))
