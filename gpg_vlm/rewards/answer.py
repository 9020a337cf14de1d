"""Where the answer of a completion is, and whether the completion has the right shape.

A completion is the text a policy wrote for one prompt. Its answer is the content of the LAST
well-formed `<answer>...</answer>` pair outside any `<think>` block (tags case-insensitive,
content may span lines). Rules, chosen so that no reward can read the reasoning:

- Think blocks are blanked out before the answer is looked for. A think block runs from
  `<think>` to the next `</think>`; a `<think>` left open runs to the end of the completion;
  a `</think>` with no open block closes one that started where the previous block ended (or
  at the start), which is what Qwen3 "thinking" chat templates produce: they open the block
  in the prompt, so the completion starts inside it.
- A second `<answer>` before a `</answer>` restarts the pair, so `<answer>a<answer>b</answer>`
  gives "b"; a stray `</answer>` is ignored; an unclosed trailing `<answer>` gives nothing.
- No answer pair: the answer is None (every accuracy reward scores 0), unless the caller
  accepts a bare answer (`accept_bare=True`): then it is the text outside think blocks,
  provided that text holds no answer tag at all.

TRL passes conversational completions as message lists; `completion_text` reduces those to
the text of the last message. Anything that is neither a string nor such a list counts as "".

Deliberately left out: tag variants with spaces or attributes (`< answer>`, `<answer x=1>`),
and any attempt to repair a malformed completion beyond the rules above.
"""

import re

_TAG = re.compile(r"<(/?)(think|answer)>", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)


def completion_text(completion) -> str:
    """The text of one completion: a string as is, a TRL message list as its last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal message parts: keep the text parts
            return "".join(
                p.get("text", "") for p in content
                if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return ""


def strip_think(text: str) -> str:
    """`text` with every think block replaced by one space (see the module docstring)."""
    spans, open_at, last_end = [], None, 0
    for m in re.finditer(r"</?think>", text, re.IGNORECASE):
        closing = m.group(0)[1] == "/"
        if not closing and open_at is None:
            open_at = m.start()
        elif closing:
            spans.append((last_end if open_at is None else open_at, m.end()))
            open_at, last_end = None, m.end()
    if open_at is not None:
        spans.append((open_at, len(text)))
    if not spans:
        return text
    pieces, pos = [], 0
    for start, end in spans:
        pieces.append(text[pos:start])
        pieces.append(" ")  # a space, so that removing a block cannot glue a new tag together
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def extract_answer(completion, accept_bare: bool = False) -> str | None:
    """The stripped answer of a completion, or None when it has none."""
    visible = strip_think(completion_text(completion))
    found, open_end = None, None
    for m in _ANSWER_TAG.finditer(visible):
        if m.group(0)[1] != "/":
            open_end = m.end()
        elif open_end is not None:
            found, open_end = visible[open_end:m.start()], None
    if found is not None:
        return found.strip()
    if accept_bare and _ANSWER_TAG.search(visible) is None:
        return visible.strip()
    return None


def is_well_formatted(completion, answer_only: bool = False) -> bool:
    """True iff the completion is `<think>..</think>` then `<answer>..</answer>`, nothing else.

    Only whitespace may surround the two blocks; neither block may contain a think or answer
    tag; the answer must not be blank (the think block may be, as Qwen3 writes it so when
    thinking is off). `answer_only=True` also accepts a lone answer block. Linear time: the
    tags are listed once instead of backtracking a pattern over a huge completion.
    """
    text = completion_text(completion)
    tags = [(m.group(0).lower(), m.start(), m.end()) for m in _TAG.finditer(text)]
    names = [t[0] for t in tags]
    if names == ["<think>", "</think>", "<answer>", "</answer>"]:
        gaps = [text[:tags[0][1]], text[tags[1][2]:tags[2][1]], text[tags[3][2]:]]
    elif answer_only and names == ["<answer>", "</answer>"]:
        gaps = [text[:tags[0][1]], text[tags[1][2]:]]
    else:
        return False
    if any(g.strip() for g in gaps):
        return False
    return text[tags[-2][2]:tags[-1][1]].strip() != ""
