"""Bounded JSON: the one JSON reader of every loader.

`parse_json(text, where)` is the one JSON reader of every loader (train, eval, score): a
record nested deeper than `MAX_JSON_DEPTH` or holding an integer of more than
`MAX_INT_DIGITS` digits is a `DataError` naming the place, never a RecursionError or
Python's 4300-digit ValueError (and never seconds spent converting a huge integer).

The prompts the model can take are checked in data/prompts.py, once a tokenizer is loaded.
"""

from __future__ import annotations

import json
from typing import Any

from gpg_vlm.data.schema import DataError

MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 300  # about the float range (1.8e308); longer integers are no number a row needs


class _LongInt(ValueError):
    pass


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _LongInt(f"an integer of {digits} digits (the limit is {MAX_INT_DIGITS})")
    return int(text)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str | bytes, where: str) -> Any:
    """One JSON document; DataError naming `where` for invalid, too deep or too large input."""
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    except _LongInt as exc:
        raise DataError(f"{where}: JSON holds {exc}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: invalid JSON: {exc}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise DataError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value
