"""Verifiable rewards: the only teacher in GPG, and the metrics of every evaluation.

Every reward has the TRL signature `fn(completions, **columns) -> list[float]`: one float per
completion, each dataset column a list with one value per completion (_columns.py), options
as keyword arguments that `functools.partial` or `resolve_reward(spec, **options)` fixes.
They are pure Python (no torch, no transformers), deterministic, and never raise on any
completion or malformed column value (that item scores 0.0); a list column whose length
differs from `completions` raises ValueError naming it.

- `format_reward`: answer.py; `classification_reward`: classification.py;
  `reasoning_reward`: reasoning.py (numbers in numeric.py); `grounding_reward`: grounding.py.
- `accuracy_reward(completions, task, **columns)`: a mixed-task batch, dispatched per
  completion on the `task` column ("counting" is numeric reasoning).
- `resolve_reward(spec)`: a built-in name or "package.module:function" from a config.

Deliberately left out: weighting and summing rewards (the trainer does that and logs each
reward separately), and any reward that needs a model.
"""

import functools
import importlib
import inspect

from gpg_vlm.rewards._columns import check_columns, per_item
from gpg_vlm.rewards.answer import extract_answer, is_well_formatted
from gpg_vlm.rewards.classification import classification_reward
from gpg_vlm.rewards.grounding import grounding_reward
from gpg_vlm.rewards.reasoning import reasoning_reward

__all__ = [
    "accuracy_reward", "classification_reward", "extract_answer", "format_reward",
    "grounding_reward", "reasoning_reward", "resolve_reward",
]

TASK_REWARDS = {
    "classification": classification_reward,
    "grounding": grounding_reward,
    "reasoning": reasoning_reward,
    "counting": reasoning_reward,
}


def format_reward(completions: list, answer_only=False, **columns) -> list[float]:
    """1.0 iff a completion is `<think>..</think><answer>..</answer>` (answer.py), else 0.0."""
    n = len(completions)
    check_columns(columns, n)
    flags = per_item("answer_only", answer_only, n)
    return [1.0 if is_well_formatted(c, answer_only=a is True) else 0.0
            for c, a in zip(completions, flags)]


def accuracy_reward(completions: list, task: list, **columns) -> list[float]:
    """The task's own reward for each completion of a mixed batch.

    Options given as non-list keywords reach every task's reward (an option a reward does
    not know is ignored by it, like any unused column). An unknown task is a data error and
    raises ValueError naming the row.
    """
    n = len(completions)
    check_columns(columns, n)
    tasks = per_item("task", task, n)
    rewards = []
    for i, (completion, name) in enumerate(zip(completions, tasks)):
        fn = TASK_REWARDS.get(name) if isinstance(name, str) else None
        if fn is None:
            raise ValueError(
                f"row {i}: unknown task {name!r}; expected one of {sorted(TASK_REWARDS)}"
            )
        row = {k: [v[i]] if isinstance(v, list) else v for k, v in columns.items()}
        rewards.extend(fn([completion], **row))
    return rewards


BUILTIN_REWARDS = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "classification": classification_reward,
    "reasoning": reasoning_reward,
    "grounding": grounding_reward,
}


def _import_reward(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def resolve_reward(spec: str, **options):
    """The reward function a config names: a built-in name or "package.module:function".

    `options` are fixed with functools.partial and must be keyword parameters of the
    function (a misspelled option would otherwise pass silently as an unused column).
    """
    if not isinstance(spec, str):
        raise ValueError(f"reward spec must be a string, got {spec!r}")
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"reward {spec!r}: expected 'package.module:function'")
        fn = _import_reward(spec)
    elif spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
    else:
        raise ValueError(
            f"unknown reward {spec!r}; use one of {sorted(BUILTIN_REWARDS)} "
            "or 'package.module:function'"
        )
    if not options:
        return fn
    params = inspect.signature(fn).parameters
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(options) - named)
    if unknown:
        raise ValueError(f"reward {spec!r} has no option(s) {unknown}; it takes {sorted(named)}")
    return functools.update_wrapper(functools.partial(fn, **options), fn)
