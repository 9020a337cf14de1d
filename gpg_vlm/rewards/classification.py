"""Classification reward: the answer must name exactly the right class.

Matching is exact after `normalize_text`: Unicode NFKC and case folding, `_` and `-` read
as spaces, runs of whitespace collapsed, punctuation and symbols stripped from both ends
(so "**Cat.**" and "'cat'" are "cat"; inner punctuation such as "o'clock" stays), and one
leading article ("a", "an", "the") dropped when a word starting with a letter follows it
(so "A-10" stays "a 10"), except before nothing but single letters: "A C" is a list of
choice letters (also one per line), not "C". The same normalisation is applied to every
accepted name.

Consequences, on purpose: an answer naming two classes ("cat or dog", "cat, dog") never
equals one name and scores 0, whatever the classes are; so does an empty answer; a class name
found inside a longer answer ("it is a cat") scores 0 — there is no substring matching, since
that is what made peer rewards hackable. Deliberately left out: plurals, synonyms and spelling
variants (list them in `solution` as accepted names instead), fuzzy matching.
"""

import re
import unicodedata

from gpg_vlm.rewards._columns import check_columns, per_item
from gpg_vlm.rewards.answer import extract_answer

_ARTICLE = re.compile(r"(?:a|an|the) (?=[^\W\d_])")
_LETTERS = re.compile(r"[^\W\d_](?: [^\W\d_])*")  # "c", "b d": choice letters, no words


def _is_edge_noise(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PSZC"


def normalize_text(text: str) -> str:
    """Canonical form of a short answer or class name (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.replace("_", " ").replace("-", " ").split())
    start, end = 0, len(text)
    while start < end and _is_edge_noise(text[start]):
        start += 1
    while end > start and _is_edge_noise(text[end - 1]):
        end -= 1
    text = text[start:end]
    m = _ARTICLE.match(text)
    if m is None or _LETTERS.fullmatch(text[m.end():]):
        return text
    return text[m.end():]


def accepted_names(solution) -> set[str]:
    """The normalised accepted names of a solution (a name or a list of names); may be empty."""
    names = [solution] if isinstance(solution, str) else solution
    if not isinstance(names, (list, tuple)):
        return set()
    return {n for n in (normalize_text(x) for x in names if isinstance(x, str)) if n}


def classification_reward(
    completions: list, solution: list, accept_bare=False, **columns
) -> list[float]:
    """1.0 where the answer is exactly one accepted name of `solution` (str or list), else 0.0."""
    n = len(completions)
    check_columns(columns, n)
    rewards = []
    for completion, sol, bare in zip(
        completions, per_item("solution", solution, n), per_item("accept_bare", accept_bare, n)
    ):
        answer = extract_answer(completion, accept_bare=bare is True)
        ok = answer is not None and normalize_text(answer) in accepted_names(sol)
        rewards.append(1.0 if ok else 0.0)
    return rewards
