"""Prompts the loaded model can take: checked once a tokenizer is loaded (trainer and eval).

`check_prompts(rows, count, max_tokens, special_tokens, on_bad_row)` runs once a tokenizer
is loaded (trainer and `gpg-vlm eval`): a row whose prompt would be longer than `max_tokens`
tokens, or whose text holds one of the tokenizer's own special tokens, is a bad row, raised
or skipped and counted like any other. `prompt_counter` builds the `count` function from a
tokenizer: tokens of the prompt template around the problem, of the system text, and of
each image as the Qwen-VL resize rules would size it (an image the rules would leave above
`max_pixels`, as a thin strip does, is a bad row too).

Deliberately left out: the exact chat template (the VLM adapter owns it; the few tokens it
adds per turn are a constant `overhead` the caller may pass) and truncation: a prompt over
the limit is refused, never cut.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from gpg_vlm.data.loading import ON_BAD_ROW, Rows, Skipped
from gpg_vlm.data.schema import DataError, Row
from gpg_vlm.resize import smart_resize_rules

log = logging.getLogger("gpg_vlm.data")


def special_tokens_of(tokenizer) -> list[str]:
    """The tokenizer's special tokens: named ones and added tokens marked special."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(t.content for t in added.values() if getattr(t, "special", False))
    return sorted(t for t in tokens if t)


def prompt_counter(tokenizer, template: str = "{problem}", factor: int | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None,
                   overhead: int = 0) -> Callable[[Row], int]:
    """count(row) -> prompt tokens: text (template, system) plus each image's visual tokens.

    Images count only with `factor` (patch * merge), `min_pixels` and `max_pixels` given; their
    sizes come from the headers (cheap). A DataError from `count` names the row.
    """
    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(row: Row) -> int:
        total = overhead + text_tokens(template.replace("{problem}", row.problem))
        if row.system:
            total += text_tokens(row.system)
        if factor is None or not row.images:
            return total
        for i, (w, h) in enumerate(row.image_sizes):
            try:
                rh, rw = smart_resize_rules(h, w, factor, min_pixels, max_pixels)
            except ValueError as exc:
                raise DataError(f"{row.image_where(i)}: {exc}") from None
            if rh * rw > max_pixels:
                raise DataError(f"{row.image_where(i)}: a {w}x{h} image is still {rw}x{rh} = {rw * rh} "
                                f"pixels after resizing, over max_pixels {max_pixels}; crop it")
            total += (rh // factor) * (rw // factor) + 2  # merged patches + vision start/end
        return total

    return count


def _prompt_problem(row: Row, count, max_tokens: int | None, special: list[str]) -> None:
    for name, text in (("problem", row.problem), ("system", row.system or ""),
                       *((f"choices[{i}]", c) for i, c in enumerate(row.choices or []))):
        for token in special:
            if token in text:
                raise DataError(f"{row.source}: field {name!r} holds the tokenizer's special token "
                                f"{token}; the model would read it as a token, not as text")
    if max_tokens is not None:
        n = count(row)
        if n > max_tokens:
            raise DataError(f"{row.source}: the prompt is {n} tokens, over the limit of "
                            f"{max_tokens} (config key max_prompt_tokens)")


def check_prompts(rows: Iterable[Row], count: Callable[[Row], int] | None, max_tokens: int | None,
                  special_tokens: Iterable[str] = (), on_bad_row: str = "error"):
    """Rows whose prompts fit and hold no special token; the others raise or are skipped.

    Returns a `Rows` list; with on_bad_row="skip" its `.skipped` holds the input's skips (when
    `rows` is a `Rows`) followed by the ones found here, each logged with its row.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if max_tokens is not None and count is None:
        raise ValueError("check_prompts: max_tokens needs a count function")
    special = sorted(set(special_tokens))
    kept, skipped = [], list(getattr(rows, "skipped", []))
    new = 0
    for row in rows:
        try:
            _prompt_problem(row, count, max_tokens, special)
        except DataError as exc:
            if on_bad_row == "error":
                raise
            skipped.append(Skipped(row.source, str(exc)))
            log.warning("skipped bad row %s", exc)
            new += 1
            continue
        kept.append(row)
    if new:
        log.warning("skipped %d row(s) whose prompts the model cannot take, kept %d", new, len(kept))
    return Rows(kept, skipped)
