"""Read a short answer as one real number: "140°", "8√{3}", "\\frac{2}{5}√{5}", "1,000", "four".

`value_of(text)` returns a float or None; it never raises and never evaluates anything
unbounded. Steps:

1. Clean-up: NFKC (after turning ² and ³ into ^2 and ^3), LaTeX spacing and delimiters
   (`$`, `\\(`, `\\left`, `\\,` ...) removed, `\\text{..}`/`\\mathrm{..}` unwrapped, degree
   marks (°, ^\\circ, \\degree) and % removed, × · \\cdot -> *, ÷ \\div -> /, − -> -,
   \\sqrt and the plain-text word "sqrt" -> √ (so "2sqrt(3)" reads as "2√{3}"), \\pi and "pi"
   -> π, \\dfrac/\\tfrac -> \\frac, and no space before a "^" (so the unit "\\mathrm{cm}^3",
   unwrapped, stays one word "cm^3").
2. Framing: a leading "the (final) answer is" / "answer:" is dropped; if the text holds "=",
   only what follows the last "=" is read ("x = 5", "∠C = 180 - 40 = 140").
3. Thousands separators: commas in groups of three ("12,345.6"); "3,5" is not a number.
4. Number words: a leading "zero".."ninety-nine" is read as its digits.
5. Grammar: + - * / ^ (exponent at most 64 in size), parentheses and braces, implicit
   products where the right factor is √, π, \\frac or a bracket ("8√{3}", "2π", "3(√2+1)")
   but never two bare numbers ("2 3" is not 6), √x, √{x}, \\sqrt[n]{x}, \\frac{a}{b}, π,
   decimals and e-notation, at most 16 levels of nesting.
6. Units: after the expression only unit words may follow: letters (any script, so "cm",
   "米", "海里" and "平方米" are units) with optional exponents ("cm^{2}", "m/s"), at most
   four words. Connectives ("3 or 5", "4 and 5", "3 to 4", "5 or more") and one-letter words
   that read as variables ("2x") make the text not a number.

Deliberately left out: variables and symbolic algebra (reasoning.py hands those to
math-verify), complex numbers, number words beyond ninety-nine, unit conversion (2 m is
not 200 cm), percent semantics (50% reads as 50).
"""

import math
import re
import unicodedata

MAX_LENGTH = 200
_MAX_DEPTH = 16
_MAX_EXPONENT = 64

_REPLACEMENTS = [
    ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
    ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\!", ""), ("\\ ", ""), ("~", ""),
    ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("$", ""),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""),
    ("\\%", ""), ("%", ""),
    ("\\cdot", "*"), ("\\times", "*"), ("×", "*"), ("·", "*"), ("⋅", "*"),
    ("\\div", "/"), ("÷", "/"), ("−", "-"), ("–", "-"),
    ("\\sqrt", "√"), ("\\pi", "π"),
]
_UNWRAP = re.compile(r"\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{([^{}]*)\}")
_BEFORE_EXPONENT = re.compile(r"\s+(?=\^)")
_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\b\s*(?::\s*)?|:\s*)", re.I
)
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_PI_WORD = re.compile(r"(?<![^\W\d_])pi(?![^\W\d_])", re.I)
_SQRT_WORD = re.compile(r"(?<![^\W\d_])sqrt(?![^\W\d_])", re.I)  # a word: not "isqrt", "sqrts"
_TOKEN = re.compile(
    r"\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d{1,3})?|\.\d+(?:[eE][-+]?\d{1,3})?"
    r"|\\frac|[-+*/^(){}\[\]√π])"
)
_UNIT_WORD = re.compile(r"[^\W\d_]+\.?(?:\^\{?\d\}?\^?)?")
_CONNECTIVES = {
    "or", "and", "to", "nor", "not", "than", "more", "less", "about", "approximately",
    "approx", "around", "nearly", "roughly", "between", "either", "neither", "maybe",
    "perhaps", "plus", "minus", "times", "over", "of", "is", "are", "point", "hundred",
    "thousand", "million", "billion", "dozen", "half", "quarter", "x", "y", "z",
}
_ONE_LETTER_UNITS = set("mgslhvwjk米秒")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_NUMBER_WORDS = re.compile(
    r"^(%s)(?:[\s-]+(%s))?(?![^\W\d_])" % ("|".join(_TENS + _ONES[::-1]), "|".join(_ONES[1:10])),
    re.I,
)


def clean(text: str) -> str:
    """Steps 1-4 of the module docstring: a cleaned, lower-case string ready for the grammar."""
    text = text.replace("²", "^2").replace("³", "^3")
    text = unicodedata.normalize("NFKC", text).strip()
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _UNWRAP.sub(r" \1 ", text)
    text = _BEFORE_EXPONENT.sub("", text)  # "\\mathrm{cm}^3" unwrapped is "cm ^3": one unit word
    text = _PREFIX.sub("", text.strip())
    if "=" in text:
        text = text.rsplit("=", 1)[1]
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text.strip())
    text = _PI_WORD.sub("π", text)
    text = _SQRT_WORD.sub("√", text)
    m = _NUMBER_WORDS.match(text)
    if m:
        first, second = m.group(1).lower(), m.group(2)
        if second is None or first in _TENS:
            value = _WORD_VALUES[first] + (_WORD_VALUES[second.lower()] if second else 0)
            text = str(value) + text[m.end():]
    return text.strip()


class _Parser:
    """Recursive descent over the tokens of a cleaned string; every method returns a float."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError("unexpected token")
        self.pos += 1
        return tok

    def expr(self) -> float:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ValueError("too deep")
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        self.depth -= 1
        return value

    def term(self) -> float:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                right = self.unary()
                value = value * right if tok == "*" else value / right  # ZeroDivisionError caught
            elif tok in ("√", "π", "\\frac", "(", "{", "["):
                value = value * self.power()
            else:
                return value

    def unary(self) -> float:
        if self.peek() in ("+", "-"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary() if self.peek() in ("+", "-") else self.atom()
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError("exponent too large")
        return base ** exponent

    def group(self) -> float:
        closing = {"(": ")", "{": "}", "[": "]"}[self.take()]
        value = self.expr()
        self.take(closing)
        return value

    def atom(self) -> float:
        tok = self.peek()
        if tok is None:
            raise ValueError("missing operand")
        if tok == "π":
            self.take()
            return math.pi
        if tok in ("(", "{", "["):
            return self.group()
        if tok == "\\frac":
            self.take()
            if self.peek() != "{":
                raise ValueError("\\frac needs braces")
            numerator = self.group()
            return numerator / self.group()
        if tok == "√":
            self.take()
            degree = self.group() if self.peek() == "[" else 2.0
            radicand = self.atom()
            if radicand < 0 or degree == 0:
                raise ValueError("no real root")
            return radicand ** (1.0 / degree)
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            return float(tok)
        raise ValueError("unexpected token")


def _is_unit(rest: str) -> bool:
    words = [w for w in re.split(r"[\s/*]+", rest.strip()) if w]
    if len(words) > 4:
        return False
    for w in words:
        if not _UNIT_WORD.fullmatch(w):
            return False
        letters = re.match(r"[^\W\d_]+", w).group(0)
        if letters in _CONNECTIVES or (len(letters) == 1 and letters not in _ONE_LETTER_UNITS):
            return False
    return True


def value_of(text) -> float | None:
    """The finite real value of a short answer, or None when it is not exactly one number."""
    if not isinstance(text, str) or len(text) > MAX_LENGTH:
        return None
    text = clean(text)
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens or not _is_unit(text[pos:].lower()):
        return None
    parser = _Parser(tokens)
    try:
        value = parser.expr()
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if parser.pos != len(tokens) or isinstance(value, complex) or not math.isfinite(value):
        return None
    return float(value)


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    """Equal within a relative `rel` of the larger magnitude (exactly equal when one is 0)."""
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
