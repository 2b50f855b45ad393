"""`Seq2SeqTrainer` and `Seq2SeqTrainingArguments`: transformers' own, on Ray workers (`raytrainer.on_ray`).

`predict_with_generate=True` generates on the workers with transformers' `generate`, each worker on its share of
the examples; `predict()` returns one row per example, in order, as in-process.
"""

from transformers import Seq2SeqTrainer as _Seq2SeqTrainer
from transformers import Seq2SeqTrainingArguments as _Seq2SeqTrainingArguments

from raytrainer.subclasses import on_ray

Seq2SeqTrainer = on_ray(_Seq2SeqTrainer)
Seq2SeqTrainingArguments = on_ray(_Seq2SeqTrainingArguments)
for _made in (Seq2SeqTrainer, Seq2SeqTrainingArguments):
    _made.__module__ = __name__  # importable by name here (pickled by reference)

__all__ = ["Seq2SeqTrainer", "Seq2SeqTrainingArguments"]
