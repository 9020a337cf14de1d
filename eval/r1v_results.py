"""Rows of R1-V-style result files for compare_judgments.py, and the evidence that a verdict is wrong.

R1-V (github.com/Deep-Agent/R1-V, `src/eval/test_qwen2vl_*.py`) and projects built on its
evaluation scripts (Ocean-R1, github.com/fengzi258/Ocean-R1, `src/eval/`) publish one JSON
object per run: `{"accuracy": percent, "results": [...]}`, one record per test item with the
model's completion `model_output`, the `ground_truth`, the answer their parser took
(`extracted_answer`) and, except in the counting runs, their verdict `is_correct`. Their parsers:
- counting (SuperCLEVR): the digits of the first `<answer>\\s*(\\d+)\\s*</answer>`, right when
  equal to `ground_truth`. These files carry no verdict; that rule, applied to their own
  `extracted_answer`, is their verdict, and its total is checked against the file's `accuracy`
  (a file where it differs is refused);
- GeoQA (R1-V and Ocean-R1): math-verify's `parse` of the whole completion, `<think>` included,
  verified against the parsed ground truth;
- MathVision, MathVerse, MMMU (Ocean-R1): the same, then, if that fails, the last answer tag
  compared with the ground truth exactly, as a number, as a choice letter guessed by a
  keyword heuristic, or by fuzzy string ratio (credited only at ratio 1).

A record becomes one `score` row: task `choice` when the item has lettered options (an
`options` list, a string holding one, or a "Choices:" block in the question) and a letter for
ground truth; `counting` for an integer ground truth without a verdict; `math` otherwise.

Deliberately left out: re-running their parsers (their recorded `extracted_answer` is the
evidence), and any relabelling by hand.
"""

from __future__ import annotations

import ast
import re

from gpg_vlm.rewards.numeric import close, value_of
from gpg_vlm.rewards.reasoning import answers_match, choice_index

_CHOICE_LINE = re.compile(r"^\s*\(?([A-Z])\)?\s*[:.)]\s*(.+?)\s*$")
_LETTER = re.compile(r"\(?([A-Z])\)?")
_PARSED = re.compile(r"\[.*, '(.*)'\]", re.DOTALL)
_RADICAL = re.compile(r"√\{[^{}]*\}|√\d+")
_UNIT_AFTER = re.compile(  # a unit word after a number ("3cm", "8m"), not a variable ("12 x^{2}")
    r"\d\s*(?:\\mathrm\{)?~?(?:[^\W\d_π]{2,}|[mgslhvwjk米秒](?![^\W\d_]))")


def _question(r: dict) -> str | None:
    q = r.get("question")
    if isinstance(q, dict):  # R1-V keeps the prompt record under "question"
        q = q.get("question")
    q = q if isinstance(q, str) else r.get("problem")
    return q if isinstance(q, str) else None


def _options(r: dict, question: str | None) -> list[str] | None:
    """The item's options in letter order: an `options` list (or a string holding one, as the
    MMMU files write it), else the "A: ..." lines of a "Choices:" block in the question."""
    opts = r.get("options")
    if isinstance(opts, str) and opts.strip().startswith("["):
        try:
            opts = ast.literal_eval(opts)
        except (ValueError, SyntaxError):
            opts = None
    if isinstance(opts, list) and opts and all(isinstance(o, (str, int, float)) for o in opts):
        return [str(o) for o in opts]
    if question and "Choices:" in question:
        block = question.rsplit("Choices:", 1)[1]
        lines = [m.groups() for line in block.splitlines() if (m := _CHOICE_LINE.match(line))]
        if lines and [ord(x) - ord("A") for x, _ in lines] == list(range(len(lines))):
            return [text for _, text in lines]
    return None


def _their_verdict(r: dict, where: str) -> bool:
    if "is_correct" in r:
        return r["is_correct"] is True
    if isinstance(r.get("ground_truth"), int):  # the counting script's rule
        return r.get("extracted_answer") is not None and r["extracted_answer"] == r["ground_truth"]
    raise ValueError(f"{where}: no 'is_correct' and no integer 'ground_truth' to recompute it from")


def rows_of(data: dict, where: str) -> list[dict]:
    """compare_judgments' rows for an R1-V-style result file (module docstring)."""
    rows = []
    for i, r in enumerate(data["results"]):
        at = f"{where}: results[{i}]"
        if not isinstance(r, dict) or r.get("model_output") is None or r.get("ground_truth") is None:
            raise ValueError(f"{at}: expected an object with 'model_output' and 'ground_truth'")
        truth, question = r["ground_truth"], _question(r)
        choices = _options(r, question)
        letter = _LETTER.fullmatch(str(truth).strip())
        multi = bool(choices and letter and ord(letter.group(1)) - ord("A") < len(choices))
        task = "choice" if multi else "counting" if isinstance(truth, int) and "is_correct" not in r else "math"
        extraction = r.get("extracted_answer")
        rows.append({
            "pid": r.get("id", i), "completion": str(r["model_output"]), "solution": truth,
            "question": question, "choices": choices if multi else None, "precision": None,
            "task": task, "judged": _their_verdict(r, at),
            "extraction": "" if extraction is None else str(extraction), "prediction": None,
            "answer_type": task, "response": str(r["model_output"]), "query_options": None,
            "source": "r1v",
        })
    stated = data.get("accuracy")
    if isinstance(stated, (int, float)) and rows:
        ours = 100 * sum(r["judged"] for r in rows) / len(rows)
        if abs(ours - stated) > 1e-6:
            raise ValueError(f"{where}: the verdicts give {ours:.4f}% but the file says accuracy {stated}")
    return rows


def their_answer(extraction: str) -> str:
    """Their recorded answer as text: Ocean-R1 writes math-verify's parse as "[9, '9']" (the
    value, then the text it was read from); the text is what was read."""
    m = _PARSED.fullmatch(extraction.strip())
    return m.group(1).replace("\\\\", "\\") if m else extraction.strip()


def authors_error(row: dict, item: dict) -> str | None:
    """Why the authors' verdict on this item is demonstrably wrong, from their own file, or None.

    Called for disagreements only; "their answer" is their recorded `extracted_answer`.
    Mechanical evidence (eval/README.md shows an example of each):
    - "option_text_not_letter": the stated answer (answer tag, box or phrase) is the text of
      the right option, not its letter ("<answer>11</answer>" where B is 11 and the key is
      B), judged wrong: their choice step looks for a letter only;
    - "answer_equals_truth": judged wrong, but their own answer is the ground truth: the
      same text once spaces, `$` and `\\(` `\\)` are dropped ("(0, 0)" for "(0,0)"), or the
      same number ("4.0" for "4", "3*pi" for "3π");
    - "nothing_extracted": judged wrong, their parser recorded no answer at all, but the
      completion states one (in its answer tag, its last `\\boxed{}` or a final-answer phrase,
      lenient steps 1-3) and we credit it;
    - "truth_misread": their verifier did not read the ground truth's value. Judged right
      with an answer equal to the ground truth with its radical deleted, or to the number
      before it ("5" for "5√{3}", "2" for "2√{2}-2": "√{3}" is not LaTeX, and math-verify
      reads no radical there); or judged wrong while their answer is the stated one and the
      ground truth writes a "√" radical or a unit after the number ("\\sqrt{3}" for "√{3}",
      "3" for "3cm");
    - "extraction_not_the_final_answer": the completion states its answer (lenient steps 1-3)
      and their answer is another one, read from the reasoning by math-verify's parse of the
      whole completion ("<answer>62°</answer>" after "angle C = 31.0 degrees" in the
      reasoning, read as 31);
    - "credited_without_an_answer": judged right, but the completion has no answer tag and
      never closes its `<think>` (it stopped or was cut off mid-reasoning): the credit is for
      a number in the reasoning.
    """
    theirs, truth, answer = their_answer(row["extraction"]), str(row["solution"]), item["answer"]
    final = item["extracted_by"] in ("tag", "boxed", "phrase")  # the completion states its answer
    choices = row["choices"]
    if choices and final and not row["judged"]:
        key = choice_index(truth, choices)
        if key is not None and choice_index(answer, choices) == key and not _LETTER.fullmatch(answer.strip()):
            return "option_text_not_letter"
    if not row["judged"] and theirs and not choices and _same_value(theirs, truth):
        return "answer_equals_truth"
    if not row["judged"] and final and not theirs:
        return "nothing_extracted"
    read_final = final and (answers_match(theirs, answer) or answers_match(answer, theirs))
    if row["judged"] and "√" in truth and value_of(theirs) is not None:
        rests = (value_of(_RADICAL.sub("", truth)), value_of(truth.split("√", 1)[0]))
        if any(r is not None and close(value_of(theirs), r) for r in rests):
            return "truth_misread"
    if not row["judged"] and read_final and not choices and ("√" in truth or _UNIT_AFTER.search(truth)):
        return "truth_misread"
    if final and not read_final:
        return "extraction_not_the_final_answer"
    text = row["completion"]
    if row["judged"] and item["extracted_by"] == "none" and re.search(r"<think>", text, re.I) \
            and not re.search(r"</think>", text, re.I):
        return "credited_without_an_answer"
    return None


def _same_value(a: str, b: str) -> bool:
    """The same answer text once spaces and math delimiters are dropped, or the same number."""
    if _canonical(a) == _canonical(b):
        return True
    va, vb = value_of(a), value_of(b)
    return va is not None and vb is not None and close(va, vb)


def _canonical(text: str) -> str:
    return "".join(text.replace("\\(", "").replace("\\)", "").replace("$", "").split())
