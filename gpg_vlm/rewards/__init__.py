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
- `resolve_reward(spec)`: a built-in name or "package.module:function" from a config, checked
  when resolved (before any model loads): it must take the completions first and accept
  `**columns`, and may require no argument that is not one of `COLUMNS`.
- `call_reward(name, fn, completions, columns)`: the one way the trainer calls a reward: an
  exception, or a return value that is not exactly B finite real numbers (a dict, None, a
  string, a scalar, a wrong length, NaN), is a `RewardError` of one line naming the reward.
- Budgets: the symbolic check runs under a hard time and memory budget (bounded.py); an item
  that hits it scores 0. `take_over_budget()` -> {"time": n, "memory": m}, the items that
  hit a budget since its previous call (per process): the trainer logs their sum per step.

Deliberately left out: weighting and summing rewards (the trainer does that and logs each
reward separately), and any reward that needs a model.
"""

import functools
import importlib
import inspect
import math
import numbers

from gpg_vlm.rewards._columns import check_columns, per_item
from gpg_vlm.rewards.answer import extract_answer, is_well_formatted
from gpg_vlm.rewards.bounded import take_over_budget
from gpg_vlm.rewards.classification import classification_reward
from gpg_vlm.rewards.grounding import grounding_reward
from gpg_vlm.rewards.reasoning import reasoning_reward

__all__ = [
    "COLUMNS", "RewardError", "accuracy_reward", "call_reward", "classification_reward",
    "extract_answer", "format_reward", "grounding_reward", "reasoning_reward",
    "resolve_reward", "take_over_budget",
]

# The columns the trainer and `gpg-vlm eval` pass to every reward (tasks.reward_columns);
# `precision` only when some row of the dataset has one.
COLUMNS = ("solution", "task", "choices", "problem", "image_size", "model_image_size",
           "box_format", "precision")


class RewardError(ValueError):
    """A reward that cannot be used or whose call failed; the message names the reward."""

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


def _check_signature(spec: str, fn) -> None:
    """Refuse a function the trainer could not call as fn(completions, **columns)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: its calls are checked
        return
    kinds = [p.kind for p in params]
    takes_first = params and kinds[0] in (inspect.Parameter.POSITIONAL_ONLY,
                                          inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          inspect.Parameter.VAR_POSITIONAL)
    if not takes_first:
        raise RewardError(f"reward {spec!r} must take the completions as its first argument")
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        raise RewardError(f"reward {spec!r} must accept **columns (every dataset column is passed "
                          f"as a keyword: {', '.join(COLUMNS)})")
    for p in params[1:]:
        required = p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_ONLY)
        if required and p.name not in COLUMNS:
            raise RewardError(f"reward {spec!r} requires argument {p.name!r}, which is no column "
                              f"(the columns are {', '.join(COLUMNS)}); give it a default")


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def reward_values(name: str, values, n: int) -> list[float]:
    """`values` as n floats; RewardError naming the reward unless exactly n finite real numbers."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays and torch tensors
    if values is None or isinstance(values, (dict, str, bytes, numbers.Number)):
        kind = "None" if values is None else f"a {type(values).__name__} {_describe(values)}"
        raise RewardError(f"reward {name!r} returned {kind}; it must return a list of {n} numbers, "
                          "one per completion")
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {name!r} returned a {type(values).__name__}; it must return a "
                          f"list of {n} numbers")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward {name!r}: value {i} is {_describe(v)} ({type(v).__name__}), "
                              "not a real number")
        try:
            f = float(v)
        except (OverflowError, TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r}: value {i} is {_describe(v)}; rewards must be finite")
        out.append(f)
    return out


def call_reward(name: str, fn, completions: list, columns: dict) -> list[float]:
    """fn(completions, **columns) as B floats; RewardError naming `name` if it raises or misbehaves."""
    try:
        values = fn(completions, **columns)
    except Exception as exc:  # noqa: BLE001 - a user's reward may raise anything: name it
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {str(exc)[:200]}") from exc
    return reward_values(name, values, len(completions))


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
    _check_signature(spec, fn)
    if not options:
        return fn
    params = inspect.signature(fn).parameters
    named = {k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(options) - named)
    if unknown:
        raise ValueError(f"reward {spec!r} has no option(s) {unknown}; it takes {sorted(named)}")
    return functools.update_wrapper(functools.partial(fn, **options), fn)
