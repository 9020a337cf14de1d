"""Answer extraction in two modes: `strict` (the training reward's) and `lenient` (for evaluation).

`extract(completion, mode, task, choices=None)` returns `(answer, step)`: the answer text
(None when there is none) and the name of the step that found it. Pure standard library; never raises on any
completion (strings, TRL message lists, anything else counts as "").

strict — the training reward's rule (answer.py): the last well-formed `<answer>...</answer>`
outside `<think>` blocks; anything else has no answer. Step name "tag" (or "none").

lenient — for models that do not follow the answer format (base models, other projects'
published outputs). The first of these steps that finds something wins; every step reads only
the text outside `<think>` blocks, as the training reward does, with two exceptions for models
that put everything in their reasoning: steps 2 and 3 also read a `<think>` left open to the
end (a base model that opens one and never closes it, then ends "The final answer is
\\boxed{40}."), and steps 1-3 read the last think block of a completion that writes nothing
outside its think blocks ("<think>... so the answer is <answer>B</answer></think>"). An
explicit answer (a tag, a box, a final-answer phrase) is the model's answer wherever it
wrote it when it wrote nothing else; the guesses of steps 4-6 (an opening letter, a named
option, the last number) never read reasoning:
1. "tag": the answer tag, exactly as in strict mode, with one repair: a `<think>` that is never
   closed ends where the first `<answer>` after it begins ("<think> ... <answer>C</answer>"
   reads C; the model forgot `</think>` but did start answering), where strict mode reads the
   whole rest as reasoning. A closed think block still hides everything in it (unless the
   completion is all reasoning, above). A completion
   that has a tag pair is never read further, even when the tag is empty, so a lenient score
   is never a second chance for a completion that did answer.
2. "boxed": the content of the last `\\boxed{...}` (braces balanced; `\\fbox{}` too).
3. "phrase": the last explicit final-answer phrase — "the (final/correct) answer is X",
   "answer: X", "the correct option/choice is X", "is option (X)", "final answer X", and the
   Chinese "答案是 X" / "答案：X" / "选项X" / "故选X" (a letter there is read alone) — up to
   the end of its line, cut at the end of the sentence (a "." that is not a decimal point, "!"
   or "?"), with Markdown emphasis, `$` and hedges ("definitely", "most likely") removed. A
   phrase followed by "," or ";" instead of an answer (an echoed prompt: "the correct option
   letter, e.g., A, B") is passed over for the one before it. For math and counting, a prose
   answer that holds exactly one number ("Answer: There are 5 objects left") is that number,
   not counting numbers the question states when others remain.
   With the item's options known (`choices`), the phrase and lead answers "(D) 145°" where
   the text after the letter names no option (by text, value or as a phrase) are read as the
   letter alone: the letter is the choice made, the rest a wrong working value. A letter whose
   text names another option is left as it is, and the reward scores that contradiction 0.
Steps 4 and 5 run only for a choice item whose options are known:
4. "lead": the choice the response opens with — a letter at the start of its first line
   ("B.", "(A) ...", "C - ...", "C" alone on the line) with the rest of that sentence, or a
   word-like option followed by punctuation or the line end ("No, the function is ...", but
   not "Yes, no, maybe": a first line naming two options opens with none).
5. "option_text": the one word-like option (not a bare letter, a number or an expression) that
   the whole text names as a whole phrase — case, hyphens and a plural "s" folded ("the PDE
   Refiner" names "PDE-Refiner"); an option named only inside a longer named one ("quarter" in
   "quarter past") does not count; two or more named options are no answer.
6. "last_line": the last non-empty line, read by task:
   - math, counting, choice: its last number ("-3", "1,000", "2.5", "3/4") or choice letter,
     whichever comes last; a letter counts only as "(B)", "[B]", "B." / "B)" / "B:" at a word
     start, or a line that is only the letter ("B", "**B**"); for a choice item with known
     options only a letter or number that selects an option counts (the 40 in "ranked 40th"
     is no answer to a yes/no question); with the question known (`question`), a number it
     states gives way to another number on the line ("There are 3 bars with values below
     40." for "How many bars are below 40?" reads 3), but is read when it is the only one;
   - grounding: the whole line, if it holds a bracket of four numbers or a point pair;
   - classification: the whole line (the class name must then be all that line says, since
     the classification reward compares whole answers).
If no step finds anything the answer is None (step "none"). The answer is then compared with
the solution by the same rewards and the same normalisation as in training (`as_tagged`
wraps it in answer tags for them), so lenient differs from strict only in where it looks.

Deliberately left out: model-based extraction (MathVista's GPT-4 step, which also infers
"Yes" from "the number of X is greater than Y"), nearest-option guessing (MathVista maps even
"N/A" to its most similar option), number words in the last line ("the two people" is no
answer 2), multi-line answers outside tags, and phrases in languages other than English and
Chinese.
"""

from __future__ import annotations

import re

from gpg_vlm.rewards.answer import completion_text, extract_answer, strip_think
from gpg_vlm.rewards.numeric import value_of
from gpg_vlm.rewards.reasoning import choice_index

MODES = ("strict", "lenient")
TASKS = ("classification", "counting", "math", "choice", "grounding")
MAX_SCAN = 200_000  # lenient steps 2-6 read at most the last this many characters

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_PHRASE = re.compile(
    r"(?:\b(?:final|correct)\s+(?:answer|option|choice)(?:\s+letter)?\b"
    r"(?:[^.:=\n]{0,60}?\b(?-i:is)\b|\s*[:=])?"  # lower-case "is": not the "Is" of a quoted question
    r"|\banswer\s*(?:is\b|:|=|would\s+be\b|should\s+be\b)"
    r"|\b(?:option|choice)\s+(?=\(?[A-Z]\)?\W*$)"
    r"|\bis\s+(?:option|choice)\s+(?=\((?-i:[A-Z])\)|(?-i:[A-Z])\b)"
    r"|答案\s*(?:是|为|應為|应为)?|故选|选项\s*(?=(?-i:[A-Z])))",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"(?<!\d)\.(?!\d)|\.(?=\s|$)|[!?](?=\s|$)")
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
_LETTER = re.compile(r"\(([A-Z])\)|\[([A-Z])\]|(?<![\w(\[/])([A-Z])[.):](?!\w)")
_ONLY_LETTER = re.compile(r"[\s*_`'\"(\[]*([A-Z])[\s*_`'\".)\]:]*")
_BOX_HINT = re.compile(r"\[\s*-?\d[^\[\]]*\]|\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)")
_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)
_SPECIAL = re.compile(r"</s>|<\|[a-z_]{2,20}\|>")  # end-of-text tokens some decoders leave in
_QUOTED = re.compile(r"[\"“]([^\"”\s]{1,20}?)([,.]?)[\"”]")
_FILLER = re.compile(r"^(?:therefore|thus|so|hence|then|clearly|simply|definitely|probably|obviously"
                     r"|(?:most\s+)?likely)\b[,:]?\s*", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{([^{}]*)\}")
_COURTESY = re.compile(r"hope (?:this|that|it) (?:helps|answers)|let me know|other questions|feel free to"
                       r"|anything else|help you with|^`{3}\w*$", re.IGNORECASE)
_INNER_LETTER = re.compile(r"\([A-Z]\)")
_LETTER_THEN_TEXT = re.compile(r"\(?([A-Z])(?:\)|[.:]|(?=\s))[.:]?\s+(\S.*)", re.DOTALL)
_LEAD = re.compile(r"\s*[*_`]*(?:\(([A-Z])\)|([A-Z])(?:[.):,]|\s+-\s|[*_`]*\s*$))")
_CJK_LETTER = re.compile(r"\(?([A-Z])\)?\s*(?=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]|$)")
_WORDY = re.compile(r"[A-Za-z]{3,}")
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)
_OPEN_ANSWER = re.compile(r"<answer>", re.IGNORECASE)


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
    """What follows the last final-answer phrase, to the end of its sentence, else None.

    A phrase followed by punctuation instead of an answer ("the correct option letter, e.g.,
    A, B" in an echoed prompt) is passed over for the one before it."""
    for m in reversed(list(_PHRASE.finditer(text))):
        rest = text[m.end():].split("\n", 1)[0].lstrip(" \t:：*_")
        cjk = _CJK_LETTER.match(rest)
        if cjk:  # "选项A正确", "答案：C。"
            return cjk.group(1)
        if not rest or rest[0] in ",;":
            continue
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


def _last_line(text: str, task: str, choices=None, question=None) -> str | None:
    """Step 6 of the module docstring: the last number or letter of the last line."""
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
    found = _unstated([(m.end(), m.group(0).replace(",", "")) for m in _NUMBER.finditer(line)], question)
    found += [(m.end(), next(g for g in m.groups() if g)) for m in _LETTER.finditer(line)]
    if choices:  # only what selects an option can answer a choice question
        found = [f for f in found if choice_index(f[1], choices) is not None]
    return max(found)[1] if found else None


def _unstated(found: list[tuple[int, str]], question) -> list[tuple[int, str]]:
    """`found` (position, number) without the numbers the question states, if any remain."""
    stated = {_number(n) for n in _NUMBER.findall(question)} if isinstance(question, str) else set()
    kept = [f for f in found if _number(f[1]) not in stated]
    return kept or found


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "")) if "/" not in text else None
    except ValueError:
        return None


def _sole_number(answer: str, question=None) -> str:
    """A prose answer that holds exactly one number ("There are 5 objects left") -> that number;
    numbers the question states do not count when others remain ("3 bars below 40")."""
    if value_of(answer) is not None or "\\" in answer or not _WORDY.search(answer):
        return answer
    numbers = _unstated([(m.end(), m.group(0)) for m in _NUMBER.finditer(answer)], question)
    return numbers[0][1].replace(",", "") if len(numbers) == 1 else answer


def _fold(text: str) -> str:
    """Case, hyphens and plural "s" folded, for naming options in prose: "PDE Refiner" names
    "PDE-Refiner", "the superior lobe" names "Superior lobes"."""
    words = re.sub(r"(?<=\w)[-‐–](?=\w)", " ", text).casefold().split()
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and w[-2].isalpha() else w for w in words)


def _option_keys(choices) -> list[str | None]:
    """Per choice, its folded text if it is word-like (not a bare letter, not a number or
    expression), else None: only such options can be recognised by name in prose."""
    keys = []
    for c in choices:
        c = " ".join(str(c).split())
        wordy = len(c) > 1 and not re.fullmatch(r"\(?[A-Za-z]\)?", c) and value_of(c) is None
        keys.append(_fold(c) if wordy else None)
    return keys


def _named_option(text: str, choices) -> int | None:
    """Index of the one word-like option that `text` names as a whole phrase, else None.

    An option named only inside a longer named option ("quarter" in "quarter past") does not
    count; two or more named options are no answer."""
    folded = _fold(text)
    keys = _option_keys(choices)
    named = {i for i, k in enumerate(keys)
             if k and re.search(r"(?<!\w)" + re.escape(k) + r"(?!\w)", folded)}
    named = {i for i in named if not any(j != i and keys[i] in keys[j] for j in named)}
    return named.pop() if len(named) == 1 else None


def _lead(text: str, choices) -> str | None:
    """The choice a response opens with, else None: a letter ("B.", "(A) ...", "C - ...", "C"
    alone on the first line) with the rest of its first sentence, or a word-like option
    followed by punctuation or the line end ("No, the function is ...")."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    m = _LEAD.match(first)
    if m and len(lines) > 1 and _LEAD.match(lines[1]):
        return None  # "(A) yes\n(B) no ...": a list of options (an echoed prompt), no choice
    if m:
        rest = first[m.end():].strip(" *_`-")
        end = _SENTENCE_END.search(rest)
        rest = _tidy(rest[:end.start()] if end else rest)
        return _letter_choice(f"({m.group(1) or m.group(2)}) {rest}".strip(), choices)
    head = _fold(first).lstrip("*_`")
    keys = _option_keys(choices)
    for i, key in enumerate(keys):
        if key and head.startswith(key) and re.match(r"[\s*_`]*(?:[.,!;:]|$)", head[len(key):]):
            rest = head[len(key):]  # "Yes, no, maybe" opens with no single option
            others = [k for k in keys if k and k != key and re.search(rf"(?<!\w){re.escape(k)}(?!\w)", rest)]
            return None if others else str(choices[i])
    return None


def _letter_choice(answer: str, choices) -> str:
    """"(D) 145°" where 145° names none of the options -> "(D)": the letter is the choice made,
    the rest a wrong working value or an explanation. A letter whose text names another
    option, by value, text or as a phrase, is left as it is (the reward scores such a
    self-contradiction 0), and so is a letter beyond the options."""
    m = _LETTER_THEN_TEXT.fullmatch(answer)
    if not m or ord(m.group(1)) - ord("A") >= len(choices):
        return answer
    index, rest = ord(m.group(1)) - ord("A"), m.group(2).strip()
    named = {choice_index(rest, choices), choice_index(_sole_number(rest), choices),
             _named_option(rest, choices)} - {None}
    return f"({m.group(1)})" if named <= {index} else answer


def _choice_steps(text: str, choices):
    """Lenient steps 4 and 5 for a choice item with its options known."""
    yield "lead", _lead(text, choices)
    index = _named_option(text, choices)
    yield "option_text", None if index is None else str(choices[index])


def _close_open_think(text: str) -> str:
    """`text` with a never-closed trailing `<think>` closed just before the first `<answer>`
    after it (lenient step 1); unchanged when there is no such think or no such answer tag."""
    tags = list(_THINK_TAG.finditer(text))
    if not tags or tags[-1].group(0)[1] == "/":
        return text
    answer = _OPEN_ANSWER.search(text, tags[-1].end())
    return text if answer is None else text[:answer.start()] + "</think>" + text[answer.start():]


def _open_think_shown(text: str) -> str:
    """`text` without the `<think>` tag of a block left open to the end, so that its content
    is visible; closed blocks are untouched."""
    tags = list(_THINK_TAG.finditer(text))
    if not tags or tags[-1].group(0)[1] == "/":
        return text
    return text[:tags[-1].start()] + " " + text[tags[-1].end():]


def _last_think_block(text: str) -> str:
    """The content of the last think block of a completion that is all reasoning, as an open
    block (so that steps 1-3 read it and steps 4-6 do not); "" when there is none."""
    tags = list(_THINK_TAG.finditer(text))
    opens = [m for m in tags if m.group(0)[1] != "/"]
    if not opens:
        return text
    close = next((m for m in tags if m.group(0)[1] == "/" and m.start() > opens[-1].start()), None)
    inner = text[opens[-1].end():close.start() if close else len(text)]
    return "<think>" + _close_open_think("<think>" + inner)[len("<think>"):]


def lenient_answer(completion, task: str = "math", choices=None, question=None) -> tuple[str | None, str]:
    """(answer, step) by the lenient steps of the module docstring; never raises."""
    full = _close_open_think(completion_text(completion))
    if not strip_think(full).strip():  # all reasoning: steps 1-3 read its last think block
        full = _last_think_block(full)
    tagged = extract_answer(full)
    if tagged is not None:
        return tagged, "tag"
    text = _SPECIAL.sub(" ", strip_think(full)[-MAX_SCAN:])
    stated = _SPECIAL.sub(" ", strip_think(_open_think_shown(full))[-MAX_SCAN:])  # steps 2 and 3
    choices = [str(c) for c in choices] if isinstance(choices, (list, tuple)) and choices else None
    for step, answer in (("boxed", _boxed(stated)), ("phrase", _phrase(stated))):
        answer = _tidy(answer) if answer else answer
        if answer and step == "phrase" and task in ("math", "counting") and not choices:
            answer = _sole_number(answer, question)
        if answer and choices:
            answer = _letter_choice(answer, choices)
        if answer:
            return _ANSWER_TAG.sub(" ", answer).strip(), step
    for step, answer in _choice_steps(text, choices) if choices else ():
        if answer:
            return answer, step
    answer = _last_line(text, task, choices, question)
    if answer:
        return _ANSWER_TAG.sub(" ", answer).strip(), "last_line"
    return None, "none"


def extract(completion, mode: str = "strict", task: str = "math",
            accept_bare: bool = False, choices=None, question=None) -> tuple[str | None, str]:
    """(answer, step) of one completion in `mode` ("strict" or "lenient"); never raises.

    `accept_bare` applies to strict mode only (answer.py): the whole visible text is the
    answer when the completion has no answer tag at all. `choices` (the item's options, or
    None) and `question` (its text, or None) are read by lenient mode only.
    """
    try:
        if mode == "lenient":
            return lenient_answer(completion, task, choices, question)
        answer = extract_answer(completion, accept_bare=accept_bare)
        step = "tag" if answer is not None and extract_answer(completion) is not None else "bare"
        return (answer, step) if answer is not None else (None, "none")
    except Exception:  # a guard: regexes and slicing should not raise, but no input may crash scoring
        return None, "none"


def as_tagged(answer: str | None) -> str:
    """A completion holding exactly `answer` in answer tags, for the strict rewards ("" if None)."""
    return "" if answer is None else f"<answer>{answer}</answer>"
