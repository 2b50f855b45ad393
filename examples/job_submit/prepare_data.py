"""Write a small text corpus and a tokenizer trained on it next to job.yaml (no downloads needed).

    python examples/job_submit/prepare_data.py            # writes data/ and tokenizer/ beside this file
    python examples/job_submit/prepare_data.py --out DIR  # or into DIR
"""

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child", "the robot", "our team"]
VERBS = ["sees", "likes", "finds", "follows", "builds", "paints", "reads", "carries"]
OBJECTS = ["a red ball", "the old house", "a small boat", "the green tree", "a long letter", "the blue sky"]
ENDINGS = ["in the morning", "after lunch", "near the river", "every day", "with great care", "at night"]


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]) + "."
            for _ in range(count)]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--train-examples", type=int, default=512)
    options = parser.parse_args()
    (options.out / "data").mkdir(parents=True, exist_ok=True)
    for name, texts in (("train", sentences(options.train_examples, seed=0)), ("eval", sentences(64, seed=1))):
        with open(options.out / "data" / f"{name}.jsonl", "w") as file:
            file.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    train_tokenizer(sentences(options.train_examples, seed=0)).save_pretrained(options.out / "tokenizer")
    print(f"wrote {options.out / 'data'} and {options.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
