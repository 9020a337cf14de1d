"""Answer extraction in two modes: `strict` (the training reward's) and `lenient` (for evaluation).

`extract(completion, mode, task)` returns `(answer, step)`: the answer text (None when there is
none) and the name of the step that found it. Pure standard library; never raises on any
completion (strings, TRL message lists, anything else counts as "").

strict — the training reward's rule (answer.py): the last well-formed `<answer>...</answer>`
outside `<think>` blocks; anything else has no answer. Step name "tag" (or "none").

lenient — for models that do not follow the answer format (base models, other projects'
published outputs). The first of these steps that finds something wins; every step reads only
the text outside `<think>` blocks, as the training reward does:
1. "tag": the answer tag, exactly as in strict mode. A completion that has a tag pair is never
   read further, even when the tag is empty, so a lenient score is never a second chance for
   a completion that did answer.
2. "boxed": the content of the last `\\boxed{...}` (braces balanced; `\\fbox{}` too).
3. "phrase": the last explicit final-answer phrase — "the (final/correct) answer is X",
   "answer: X", "the correct option/choice is X", "final answer X" — up to the end of its
   line, cut at the end of the sentence (a "." that is not a decimal point, "!" or "?"), with
   Markdown emphasis and `$` removed.
4. "last_line": the last non-empty line, read by task:
   - math, counting, choice: its last number ("-3", "1,000", "2.5", "3/4") or choice letter,
     whichever comes last; a letter counts only as "(B)", "[B]", "B." / "B)" / "B:" at a word
     start, or a line that is only the letter ("B", "**B**");
   - grounding: the whole line, if it holds a bracket of four numbers or a point pair;
   - classification: the whole line (the class name must then be all that line says, since
     the classification reward compares whole answers).
If no step finds anything the answer is None (step "none"). The answer is then compared with
the solution by the same rewards and the same normalisation as in training (`as_tagged`
wraps it in answer tags for them), so lenient differs from strict only in where it looks.

Deliberately left out: model-based extraction (MathVista's GPT-4 step), multi-line answers
outside tags, and answers in languages other than English for the phrase step.
"""

from __future__ import annotations

import re

from gpg_vlm.rewards.answer import completion_text, extract_answer, strip_think

MODES = ("strict", "lenient")
TASKS = ("classification", "counting", "math", "choice", "grounding")
MAX_SCAN = 200_000  # lenient steps 2-4 read at most the last this many characters

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE = re.compile(
    r"(?:\b(?:final|correct)\s+(?:answer|option|choice)(?:\s+letter)?\b"
    r"(?:[^.:=\n]{0,60}?\bis\b|\s*[:=])?"
    r"|\banswer\s*(?:is\b|:|=|would\s+be\b|should\s+be\b)"
    r"|\b(?:option|choice)\s+(?=\(?[A-Z]\)?\W*$))",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|\.(?=\s|$)|[!?](?=\s|$)")
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
_LETTER = re.compile(r"\(([A-Z])\)|\[([A-Z])\]|(?<![\w(\[])([A-Z])[.):](?!\w)")
_ONLY_LETTER = re.compile(r"[\s*_`'\"(\[]*([A-Z])[\s*_`'\".)\]:]*")
_BOX_HINT = re.compile(r"\[\s*-?\d[^\[\]]*\]|\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)")
_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)
_SPECIAL = re.compile(r"</s>|<\|[a-z_]{2,20}\|>")  # end-of-text tokens some decoders leave in
_QUOTED = re.compile(r"[\"“]([^\"”\s]{1,20}?)([,.]?)[\"”]")
_FILLER = re.compile(r"^(?:therefore|thus|so|hence|then|clearly|simply)\b[,:]?\s*", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{([^{}]*)\}")
_COURTESY = re.compile(r"hope (?:this|that|it) (?:helps|answers)|let me know|other questions|feel free to"
                       r"|anything else|help you with|^`{3}\w*$", re.IGNORECASE)
_INNER_LETTER = re.compile(r"\([A-Z]\)")


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, else None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _tidy(text: str) -> str:
    """An answer without Markdown emphasis, quotes, math dollars, \\text{} and edge punctuation."""
    text = _TEXT_CMD.sub(r"\1", text.replace("**", "").replace("__", "").replace("`", ""))
    text = _QUOTED.sub(r"\1\2", text)  # '"C," which is' -> 'C, which is'

    text = _FILLER.sub("", text.strip()).strip().strip("$\"'“”").strip()
    return text.rstrip(".,;:!?").strip().strip("\"'“”").strip()


def _first_clause(text: str) -> str:
    """`text` up to its first ", " or "; " outside brackets (the rest explains the answer)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth <= 0 and ch in ",;" and text[i + 1:i + 2] == " " and i > 0:
            return text[:i]
    return text


def _phrase(text: str) -> str | None:
    """What follows the last final-answer phrase, to the end of its sentence, else None."""
    for m in reversed(list(_PHRASE.finditer(text))):
        rest = text[m.end():].split("\n", 1)[0].lstrip(" \t:*_")
        boxed = _boxed(rest)
        if boxed:
            return boxed
        end = _SENTENCE_END.search(rest)
        piece = _QUOTED.sub(r"\1\2", rest[:end.start()] if end else rest)
        answer = _tidy(_first_clause(_FILLER.sub("", piece.strip("*_ ")).strip()))
        letter = _INNER_LETTER.search(answer)
        if letter and 0 < len(answer[:letter.start()].split()) <= 3:  # "still (B) No", "∠2 = (C) 15°"
            answer = answer[letter.start():]
        if answer:
            return answer
    return None


def _last_line(text: str, task: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    while lines and _COURTESY.search(lines[-1]) and not re.search(r"\d", lines[-1]):
        lines.pop()  # "I hope this helps!" after the answer
    if not lines:
        return None
    line = lines[-1]
    if task == "classification":
        return _tidy(line) or None
    if task == "grounding":
        return line if _BOX_HINT.search(line) else None
    only = _ONLY_LETTER.fullmatch(line)
    if only:
        return only.group(1)
    found = [(m.end(), m.group(0).replace(",", "")) for m in _NUMBER.finditer(line)]
    found += [(m.end(), next(g for g in m.groups() if g)) for m in _LETTER.finditer(line)]
    return max(found)[1] if found else None


def lenient_answer(completion, task: str = "math") -> tuple[str | None, str]:
    """(answer, step) by the lenient steps of the module docstring; never raises."""
    tagged = extract_answer(completion)
    if tagged is not None:
        return tagged, "tag"
    text = _SPECIAL.sub(" ", strip_think(completion_text(completion))[-MAX_SCAN:])
    for step, answer in (("boxed", _boxed(text)), ("phrase", _phrase(text))):
        answer = _tidy(answer) if answer else answer
        if answer:
            return _ANSWER_TAG.sub(" ", answer).strip(), step
    answer = _last_line(text, task)
    if answer:
        return _ANSWER_TAG.sub(" ", answer).strip(), "last_line"
    return None, "none"


def extract(completion, mode: str = "strict", task: str = "math",
            accept_bare: bool = False) -> tuple[str | None, str]:
    """(answer, step) of one completion in `mode` ("strict" or "lenient"); never raises.

    `accept_bare` applies to strict mode only (answer.py): the whole visible text is the
    answer when the completion has no answer tag at all.
    """
    try:
        if mode == "lenient":
            return lenient_answer(completion, task)
        answer = extract_answer(completion, accept_bare=accept_bare)
        step = "tag" if answer is not None and extract_answer(completion) is not None else "bare"
        return (answer, step) if answer is not None else (None, "none")
    except Exception:  # a guard: regexes and slicing should not raise, but no input may crash scoring
        return None, "none"


def as_tagged(answer: str | None) -> str:
    """A completion holding exactly `answer` in answer tags, for the strict rewards ("" if None)."""
    return "" if answer is None else f"<answer>{answer}</answer>"
