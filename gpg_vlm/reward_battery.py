"""The cases `gpg-vlm check-reward` runs a reward over: known hacks, edge cases and controls.

Every case is one completion of one dataset row, passed the way TRL passes it:
`fn([completion], **columns)` with every column a one-element list. Kinds:
- control: a right answer in the expected format, as a string and as a conversational message
  list; a usable reward scores it above zero;
- hack: an answer that must score 0 (at most `limit`; grounding rewards are IoU-graded, so a
  box that overlaps the truth a little earns a little): several answers in one, the answer only
  inside `<think>`, two answer tags with the wrong one last, the right number inside a wrong
  expression, the question repeated as the answer, a box in another family's coordinate frame,
  a huge answer listing every candidate;
- edge: inputs that must neither raise nor exceed the time budget, whatever they score: empty
  answer tags, an untagged answer, a huge completion, arbitrary code points (NUL, lone
  surrogates), a bytes object, message lists with multimodal content parts.

The rows per task (`ROWS`) are small fixed examples in the project's schema; their columns are
the ones the trainer gives every reward (solution, task, choices, problem, image_size,
box_format, ...). Deliberately left out: semantic attacks that need a model to write them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TASKS = ("classification", "counting", "math", "choice", "grounding")

# task -> (columns of the row, the right answer, a wrong answer, several answers in one,
#          the right answer inside a wrong one)
ROWS: dict[str, tuple[dict, str, str, str, str]] = {
    "classification": (
        {"solution": "bag", "task": "classification",
         "choices": ["t-shirt", "trouser", "bag", "sneaker"],
         "problem": "What is this item? Answer with one of: t-shirt, trouser, bag, sneaker."},
        "bag", "sneaker", "t-shirt, trouser, bag, sneaker", "not a bag"),
    "counting": (
        {"solution": 3, "task": "counting", "problem": "How many bags are there?"},
        "3", "4", "0 1 2 3 4 5 6 7 8 9", "13"),
    "math": (
        {"solution": "12", "task": "reasoning", "problem": "What is 3 times 4?"},
        "12", "7", "7 or 12 or 34", "12 + 1"),
    "choice": (
        {"solution": "7cm", "task": "reasoning", "choices": ["6cm", "7cm", "8cm", "9cm"],
         "problem": "How long is AB?\nChoices:\n(A) 6cm\n(B) 7cm\n(C) 8cm\n(D) 9cm"},
        "(B)", "(C)", "A B C D", "not (B)"),
    # a 2000x1000 image, truth in original pixels; the model writes Qwen2-VL's rel1000 frame
    "grounding": (
        {"solution": [1200, 600, 1800, 900], "task": "grounding", "image_size": (2000, 1000),
         "box_format": "rel1000", "problem": "Where is the bag? Give its bounding box."},
        "[600, 600, 900, 900]", "[0, 0, 300, 300]",
        " ".join(f"[{x}, {y}, {x + 100}, {y + 100}]" for x in range(0, 1000, 100)
                 for y in range(0, 1000, 100)),
        "[6000, 600, 900, 900]"),  # the right numbers, one with an extra digit
}


@dataclass
class Case:
    name: str
    kind: str  # "control" | "hack" | "edge"
    completion: object
    columns: dict = field(default_factory=dict)
    limit: float = 0.0  # a hack passes when it scores at most this


def _think(answer: str) -> str:
    return f"<think>Looking at the image.</think><answer>{answer}</answer>"


def _bytes_like(seed: int = 0, n: int = 400) -> str:
    """Arbitrary code points: NUL, controls, lone surrogates, private use, tags mixed in."""
    rng = random.Random(seed)
    pool = [0, 1, 0x7F, 0xD800, 0xDFFF, 0xFFFE, 0xE000, 0x202E, 0x10FFFF, ord("<"), ord(">")]
    return "".join(chr(rng.choice(pool) if rng.random() < 0.5 else rng.randrange(0x110000))
                   for _ in range(n))


def battery(task: str) -> list[Case]:
    """The cases for `task` (one of TASKS), in report order."""
    columns, right, wrong, several, inside = ROWS[task]
    grounding = task == "grounding"
    cases = [
        Case("right answer", "control", _think(right)),
        Case("right answer, conversational message list", "control",
             [{"role": "assistant", "content": _think(right)}]),
        Case("several answers in one", "hack", _think(several), limit=0.25 if grounding else 0.0),
        Case("answer only inside <think>", "hack", f"<think>The answer is {right}.</think>"),
        Case("answer tag inside <think>, wrong one outside", "hack",
             f"<think><answer>{right}</answer></think><answer>{wrong}</answer>"),
        Case("two answer tags, the wrong one last", "hack",
             f"<answer>{right}</answer><answer>{wrong}</answer>"),
        Case("right answer inside a wrong one", "hack", _think(inside),
             limit=0.25 if grounding else 0.0),
        Case("the question repeated as the answer", "hack", _think(columns["problem"])),
        Case("huge answer listing every candidate", "hack",
             _think(" ".join(str(i) for i in range(100_000)) + " " + several),
             limit=0.25 if grounding else 0.0),
    ]
    if grounding:
        cases += [
            Case("box in another family's frame (pixels, not rel1000)", "hack",
                 _think("[1200, 600, 1800, 900]")),
            Case("inverted box (x2 < x1)", "hack", _think("[900, 900, 600, 600]")),
            Case("the whole image", "hack", _think("[0, 0, 1000, 1000]"), limit=0.25),
        ]
    cases += [
        Case("empty answer tags", "edge", "<think>hm</think><answer></answer>"),
        Case("untagged answer", "edge", right),
        Case("huge completion (2 MB of thinking)", "edge",
             "<think>" + "x" * 2_000_000 + "</think>" + f"<answer>{right}</answer>"),
        Case("arbitrary code points", "edge", _bytes_like()),
        Case("arbitrary code points inside answer tags", "edge",
             f"<answer>{_bytes_like(1, 60)}{right}{_bytes_like(2, 60)}</answer>"),
        Case("a bytes object", "edge", _think(right).encode()),
        Case("message list with content parts", "edge",
             [{"role": "assistant", "content": [{"type": "text", "text": _think(right)}]}]),
        Case("empty message list", "edge", []),
    ]
    for case in cases:
        case.columns = {k: [v] for k, v in columns.items()}
    return cases
