"""Rewards used by the trainer tests (importable as `rewards_for_tests:NAME`).

A random tiny model never writes a correct answer, so these give a signal that varies
within groups from the first step.
"""


def parity_reward(completions, **columns):
    """1.0 for an even number of characters: informative on almost any group."""
    return [float(len(c) % 2 == 0) for c in completions]


def zero_reward(completions, **columns):
    """0.0 everywhere: no group is ever informative."""
    return [0.0 for _ in completions]


def nan_reward(completions, **columns):
    return [float("nan") for _ in completions]


def alternating_reward(completions, **columns):
    """1.0 for every other completion: each group of an even size is informative, whatever the text."""
    return [float(i % 2) for i in range(len(completions))]
