"""Several samples per prompt with one prefill per prompt (plain torch + transformers, no Ray).

`model.generate(..., num_return_sequences=n)` copies every prompt n times before its first forward
pass, so the prompt is encoded n times. Here a decoder-only model encodes each prompt once (all
tokens but the last), the key/value cache is repeated n times, and `generate` continues from it:
the same samples for a fraction of the prompt work (for short completions, most of the work).
"""

from __future__ import annotations

import inspect

import torch

# Generation settings the shared prefill does not cover: these go through plain `generate`.
_PLAIN_ONLY = ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha", "cache", "past_key_values",
               "inputs_embeds", "position_ids", "token_type_ids")


def can_share_prefill(model, encoded: dict, samples: int, generation_kwargs: dict) -> bool:
    """Whether `sample_with_shared_prefill` applies: a decoder-only model with a key/value cache, several
    samples, prompts of two or more tokens given as ids and mask only, and no beam search, assisted or
    contrastive decoding."""
    config = model.generation_config
    if samples < 2 or model.config.is_encoder_decoder or encoded["input_ids"].shape[1] < 2:
        return False
    if set(encoded.keys()) != {"input_ids", "attention_mask"}:  # e.g. token_type_ids: plain generate uses them
        return False
    if any(key in generation_kwargs for key in _PLAIN_ONLY):
        return False
    if generation_kwargs.get("num_beams", config.num_beams or 1) != 1:
        return False
    return bool(generation_kwargs.get("use_cache", config.use_cache if config.use_cache is not None else True))


def _cache_keyword(model) -> str:
    """Newer transformers name the cache argument `cache`; older ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_with_shared_prefill(model, encoded: dict, samples: int, **generation_kwargs) -> torch.Tensor:
    """Like `model.generate(**encoded, num_return_sequences=samples, **generation_kwargs)` for left-padded
    prompts: returns [len(prompts) * samples, length] token ids, the samples of a prompt consecutive."""
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded tokens
    prefix = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                   position_ids=position_ids[:, :-1], use_cache=True)
    cache = prefix["cache"] if "cache" in prefix else prefix["past_key_values"]
    cache.batch_repeat_interleave(samples)
    return model.generate(input_ids=input_ids.repeat_interleave(samples, dim=0),
                          attention_mask=attention_mask.repeat_interleave(samples, dim=0),
                          **{_cache_keyword(model): cache}, **generation_kwargs)
