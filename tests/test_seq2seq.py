"""transformers' Seq2SeqTrainer on Ray (`raytrainer.Seq2SeqTrainer`): generation on the workers gives transformers'
predictions."""

import datasets
import numpy as np
import pytest
import transformers
from transformers import DataCollatorForSeq2Seq

import raytrainer
from _iterative_fixtures import arithmetic, t5, tokenizer


def seq2seq_data(n: int, seed: int) -> datasets.Dataset:
    tok = tokenizer()
    prompts = arithmetic.addition_prompts(n, seed)
    return datasets.Dataset.from_dict({
        "input_ids": [tok(p)["input_ids"] for p in prompts],
        "labels": [tok(arithmetic.answer(p))["input_ids"] + [tok.eos_token_id] for p in prompts]})


def settings(tmp_path, name: str) -> dict:
    return dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, per_device_eval_batch_size=3,
                max_steps=4, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                predict_with_generate=True, generation_max_length=6)


@pytest.mark.usefixtures("ray_session")
def test_predict_with_generate_gives_transformers_predictions(tmp_path):
    tok = tokenizer()
    train, test = seq2seq_data(16, seed=0), seq2seq_data(11, seed=1)  # 11 rows: the last batch is uneven
    kwargs = dict(train_dataset=train, data_collator=DataCollatorForSeq2Seq(tok), processing_class=tok)
    theirs = transformers.Seq2SeqTrainer(model=t5(), args=transformers.Seq2SeqTrainingArguments(
        **settings(tmp_path, "hf")), **kwargs)
    theirs.train()
    expected = theirs.predict(test)
    # On one worker, as in one process. (On 2 workers one row of the uneven last batch comes back twice, 12 rows for
    # these 11, as transformers' own Seq2SeqTrainer gives them under `torchrun --nproc_per_node 2`.)
    ours = raytrainer.Seq2SeqTrainer(model=t5(), args=raytrainer.Seq2SeqTrainingArguments(
        **settings(tmp_path, "rt")), **kwargs)
    assert isinstance(ours, transformers.Seq2SeqTrainer) and isinstance(ours.args, raytrainer.TrainingArguments)
    ours.train()
    predicted = ours.predict(test)
    assert predicted.predictions.shape == expected.predictions.shape
    assert np.array_equal(predicted.predictions, expected.predictions)
    assert np.array_equal(predicted.label_ids, expected.label_ids)
    assert predicted.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=1e-5)
