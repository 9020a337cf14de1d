"""Reasoning reward: multiple choice, numbers and mathematical expressions.

`answers_match(answer, solution, choices, precision)` decides one item; `reasoning_reward`
applies it to a batch. A completion without an answer scores 0 (see answer.py).

Multiple choice (a non-empty `choices` list): both the answer and the solution are resolved
to a choice index and compared.
- The answer selects a choice by its text (compared under `_key`, see 4. below), by a letter
  in a common form ("C", "c", "(C)", "(C).", "[C]", "C.", "C)", "C:", after an optional "the answer
  is"/"option"), by a letter followed by that same choice's text ("C) 1", "(C) 1"), or by a
  value equal to exactly one choice's value ("140" selects "140°"). A letter followed by
  anything else ("A or B", "C is right") selects nothing.
- The solution is a choice's text (MathVista), a letter ("(C)", "C", CV-Bench) or a value
  equal to exactly one choice. Text is tried before letters, so choices that are letters
  themselves ("A", "B", ...) still work. A solution that selects no choice scores 0.

Free form (no choices), tried in this order:
1. a letter solution ("(C)") is matched by a letter answer and nothing else;
2. numbers and constant expressions (numeric.py): equal within a relative 1e-6; with an
   integer `precision` (a MathVista column) the answer is first rounded to that many decimals;
3. text equality under `_key`: words normalised as in classification.py ("Yes" = "yes."),
   but text with digits or maths symbols only case- and space-folded, since stripping edge
   punctuation would equate "-5" and "5" or "-x" and "x".
4. math-verify, if installed, for symbolic answers ("x+1" vs "1+x", sets, intervals), only on
   inputs of a harmless shape: both sides at most 200 characters, no English words, only
   harmless LaTeX commands, no factorials, no exponents beyond two digits or nested
   exponents. Both sides are read as LaTeX in full (its default extraction would find "5"
   inside "3 or 5", or 8 inside "8\\sqrt{3}"). Shape guards cannot catch everything
   (`(((9^{99})^{99})^{99})^{99}` passes them), so the check runs in a worker process under
   a hard time and memory budget (bounded.py; its signal-based timeouts are off); an item
   that hits a budget scores 0 and is counted (`take_over_budget()`).

Deliberately left out: partial credit, fuzzy or nearest-choice matching (MathVista's own
scorer picks the most similar choice; we do not), several answers for one question, and
unit conversion.
"""

import importlib.util
import re
import unicodedata

from gpg_vlm.rewards._columns import check_columns, per_item
from gpg_vlm.rewards.answer import extract_answer
from gpg_vlm.rewards.bounded import Worker
from gpg_vlm.rewards.classification import normalize_text
from gpg_vlm.rewards.numeric import MAX_LENGTH, close, value_of

_INTRO = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)(?![a-z])"
    r"\s*(?:is\b\s*)?(?::\s*)?",
    re.I,
)
_LETTER = re.compile(
    r"(?:\(([a-z])\)[.:]?|\[([a-z])\][.:]?|([a-z])(?:[.):]|(?=\s)|$))\s*(.*)", re.I | re.S
)
_SOLUTION_LETTER = re.compile(r"\(?([A-Za-z])\)?\.?")

_SAFE_COMMANDS = {
    "frac", "dfrac", "tfrac", "sqrt", "pi", "cdot", "times", "div", "left", "right", "circ",
    "infty", "pm", "mp", "le", "ge", "leq", "geq", "lt", "gt", "neq", "ne", "cup", "cap",
    "emptyset", "varnothing", "in", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln",
    "alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "sigma", "phi", "omega",
    "angle", "degree",
}
_MATHS = re.compile(r"[\d+\-*/^=√π\\{}()\[\]<>]")
_mv = None  # math_verify module once imported, False when it is not installed


def _key(text: str) -> str:
    """Comparison key of a choice or short answer (module docstring, free form 4.)."""
    if _MATHS.search(text):
        return "".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip(".")
    return normalize_text(text)


def _letter_index(text: str, n_choices: int) -> tuple[int, str] | None:
    """(index, trailing text) of a letter answer such as "(C) 1", or None."""
    m = _LETTER.fullmatch(_INTRO.sub("", text.strip(), count=1))
    if m is None:
        return None
    index = ord((m.group(1) or m.group(2) or m.group(3)).upper()) - ord("A")
    return (index, m.group(4).strip()) if index < n_choices else None


def _value_index(text: str, choices: list[str]) -> int | None:
    value = value_of(text)
    if value is None:
        return None
    hits = [i for i, c in enumerate(choices) if (v := value_of(c)) is not None and close(v, value)]
    return hits[0] if len(hits) == 1 else None


def _choice_index(text: str, choices: list[str], as_solution: bool) -> int | None:
    norm = _key(text)
    texts = [_key(c) for c in choices]
    if norm and norm in texts:
        return texts.index(norm)
    if as_solution:
        m = _SOLUTION_LETTER.fullmatch(text.strip())
        if m and ord(m.group(1).upper()) - ord("A") < len(choices):
            return ord(m.group(1).upper()) - ord("A")
        return _value_index(text, choices)
    lettered = _letter_index(text, len(choices))
    if lettered is not None:
        index, rest = lettered
        if not rest:
            return index
        same = _key(rest) == texts[index] or _value_index(rest, choices) == index
        return index if same else None
    return _value_index(text, choices)


def choice_index(answer: str, choices: list[str]) -> int | None:
    """The index of the choice an answer selects (module docstring, multiple choice), else None."""
    return _choice_index(answer, [str(c) for c in choices], as_solution=False)


def _math_verify():
    global _mv
    if _mv is None:
        try:
            import math_verify
            _mv = math_verify
        except ImportError:
            _mv = False
    return _mv


def _safe_for_math_verify(text: str) -> bool:
    if not text or len(text) > MAX_LENGTH or "!" in text or "binom" in text:
        return False
    if any(cmd not in _SAFE_COMMANDS for cmd in re.findall(r"\\([A-Za-z]+)", text)):
        return False
    if re.search(r"(?<!\\)(?<![A-Za-z])[A-Za-z]{2,}", text):  # English words, not commands
        return False
    for m in re.finditer(r"\^\s*(\{[^{}]*\}|\S)", text):
        exponent = m.group(1)
        if "^" in text[m.end():m.end() + 1] or len(re.sub(r"\D", "", exponent)) > 2:
            return False
    return text.count("^") <= 4 and not re.search(r"\^\s*\{[^}]*\^", text)


# One check of each kind: sympy imports the code for powers, sets, trigonometry... on first
# use, up to 0.8 s each, which must not count against the first timed check of that kind.
_WARM_UP = [("x+1", "1+x"), ("x^2+2x+1", "(x+1)^2"), ("\\frac{1}{2}x", "x/2"), ("[1,2)", "[1,2)"),
            ("\\{1,2\\}", "\\{2,1\\}"), ("\\sqrt{2}x", "x\\sqrt{2}"), ("x \\le 3", "x<=3"),
            ("\\sin(x)^2+\\cos(x)^2", "1"), ("a=b", "b=a")]


def warm_up() -> None:
    """Import math-verify and sympy and run `_WARM_UP` before the first timed check."""
    if not _math_verify():
        raise ImportError("math-verify is not installed")
    for answer, solution in _WARM_UP:
        symbolic_equal(answer, solution)


def symbolic_equal(answer: str, solution: str) -> bool:
    """math-verify's verdict on two LaTeX strings; unbounded, so it runs only in the worker."""
    mv = _math_verify()
    try:
        config = [mv.LatexExtractionConfig()]

        def parse(s):
            return mv.parse(f"${s}$", extraction_config=config, fallback_mode="no_fallback",
                            parsing_timeout=None)

        gold, pred = parse(solution), parse(answer)
        return bool(gold and pred and mv.verify(gold, pred, timeout_seconds=None))
    except MemoryError:
        raise  # the worker reports it as a budget hit
    except Exception:  # math-verify and sympy may raise anything on odd input
        return False


_HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
# started on the first symbolic check; the training process itself never imports sympy
SYMBOLIC = Worker("gpg_vlm.rewards.reasoning:symbolic_equal")


def _verify_symbolically(answer: str, solution: str) -> bool:
    if not (_HAS_MATH_VERIFY and _safe_for_math_verify(answer) and _safe_for_math_verify(solution)):
        return False
    return SYMBOLIC.call(answer, solution, default=False) is True


def _is_precision(p) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and p in range(13)


def answers_match(answer: str, solution, choices=None, precision=None) -> bool:
    """Whether `answer` (already extracted) is correct for `solution`; never raises."""
    if isinstance(solution, bool) or not isinstance(solution, (str, int, float)):
        return False
    solution = str(solution).strip()
    if not solution or not answer:
        return False
    if isinstance(choices, (list, tuple)) and choices:
        if not all(isinstance(c, str) for c in choices):
            return False
        choices = list(choices)
        want = _choice_index(solution, choices, as_solution=True)
        got = _choice_index(answer, choices, as_solution=False)
        return want is not None and got is not None and (
            got == want or _key(choices[got]) == _key(choices[want])
        )
    letter = _SOLUTION_LETTER.fullmatch(solution)
    if letter:
        lettered = _letter_index(answer, 26)
        return lettered is not None and not lettered[1] and lettered[0] == ord(
            letter.group(1).upper()) - ord("A")
    want, got = value_of(solution), value_of(answer)
    if want is not None and got is not None:
        if _is_precision(precision):
            got = round(got, int(precision))
        return close(got, want)
    key = _key(answer)
    if key and key == _key(solution):
        return True
    return _verify_symbolically(answer, solution)


def reasoning_reward(
    completions: list, solution: list, choices=None, precision=None, accept_bare=False,
    **columns,
) -> list[float]:
    """1.0 where the answer matches `solution` (see the module docstring), else 0.0."""
    n = len(completions)
    check_columns(columns, n)
    rows = zip(
        completions, per_item("solution", solution, n), per_item("choices", choices, n),
        per_item("precision", precision, n), per_item("accept_bare", accept_bare, n),
    )
    rewards = []
    for completion, sol, chs, prec, bare in rows:
        answer = extract_answer(completion, accept_bare=bare is True)
        rewards.append(1.0 if answer is not None and answers_match(answer, sol, chs, prec) else 0.0)
    return rewards
