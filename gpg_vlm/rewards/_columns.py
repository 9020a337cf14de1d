"""Per-completion access to the keyword arguments of a reward function.

TRL calls a reward as `fn(completions, **columns)` where each dataset column is a list with
one value per completion. A `list` argument is therefore a column and must have exactly one
value per completion (anything else is a programming error and raises ValueError naming the
column). For options (`accept_bare`, `iou_threshold`, `box_format`, ...) any non-list value
is broadcast to every completion, so `functools.partial(fn, option=value)` configures a
reward, while a list gives the option per row. Constants that are themselves sequences
(an image size for the whole batch) must be passed as a tuple, never as a list.
"""


def per_item(name: str, value, n: int) -> list:
    """`value` as one entry per completion: a list is checked, anything else broadcast."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(
                f"reward column {name!r} has {len(value)} values for {n} completions"
            )
        return value
    return [value] * n


def check_columns(columns: dict, n: int) -> None:
    """Raise ValueError if any list-valued column does not have one value per completion."""
    for name, value in columns.items():
        per_item(name, value, n)
