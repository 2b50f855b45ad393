"""A small generated English-like corpus, a byte-level BPE tokenizer trained on it, and fixed-length
token blocks for causal language modelling. Shared by `examples/demo.py` and `bench/trainer_overhead.py`
so that neither needs anything from the Hugging Face Hub.

The text has learnable structure (fixed facts, counting, small sums) mixed with free choices, so a
tiny GPT-2 goes from the perplexity of a uniform guess (about the vocabulary size) to a few units.
"""

import random

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"

NAMES = ["anna", "ben", "carla", "david", "emma", "felix", "grace", "hugo", "iris", "jonas"]
PLACES = ["market", "river", "school", "garden", "station", "library", "harbour", "forest"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
# Each animal always eats the same food: a fact the model can learn exactly.
FOOD_OF_ANIMAL = {"cat": "fish", "dog": "bones", "horse": "hay", "bird": "seeds", "rabbit": "carrots",
                  "bear": "honey", "mouse": "cheese", "cow": "grass"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty"]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        animal = rng.choice(list(FOOD_OF_ANIMAL))
        return f"the {animal} eats {FOOD_OF_ANIMAL[animal]} ."
    if kind == 1:
        return f"{rng.choice(NAMES)} went to the {rng.choice(PLACES)} on {rng.choice(DAYS)} ."
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]} ."
    if kind == 3:
        start = rng.randrange(15)
        return "count " + " ".join(NUMBER_WORDS[start:start + rng.randint(3, 6)]) + " ."
    return f"{rng.choice(NAMES)} has a {rng.choice(COLORS)} {rng.choice(list(FOOD_OF_ANIMAL))} ."


def generate_documents(num_documents: int, seed: int = 0, sentences_per_document: int = 8) -> list[str]:
    """Return `num_documents` short documents of generated sentences (deterministic for a seed)."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(sentences_per_document)) for _ in range(num_documents)]


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; `<|endoftext|>` is its end-of-text and padding token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def token_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, block_length: int) -> Dataset:
    """Tokenize `texts`, join them with end-of-text tokens and cut the stream into blocks of
    `block_length` tokens (the remainder is dropped). Columns: `input_ids`, `labels` (a copy)."""
    stream: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    blocks = [stream[start:start + block_length]
              for start in range(0, len(stream) - block_length + 1, block_length)]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(block) for block in blocks]})
