"""Iterative SFT (rejection sampling) on Ray actors: TRL's `IterativeSFTTrainer` API, a generator actor that
samples and a trainer actor that trains on the kept rollouts."""
