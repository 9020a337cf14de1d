"""Agreement of `gpg-vlm score` with MathVista's own per-item judgments.

MathVista (lupantech/MathVista, results/*/output_*.json) publishes, for each model and each
testmini problem, the model's free-text `response`, the answer its GPT-4 step extracted from
it (`extraction`), and its verdict `true_false`. This script turns such a file (the published
JSON object keyed by pid, or a JSONL of the same records) into `score`'s rows and scores them
in-process with the training reward (gpg_vlm.score.score_records: task `choice` for
multi_choice rows, `math` otherwise, with the row's `precision`), then reports item-by-item
agreement with `true_false`. Two readings:

- `--read extraction` (default): the completion is `<answer>{extraction}</answer>`, so only
  our answer comparison is measured against MathVista's, on the same extracted answers;
- `--read response`: the completion is the model's own free text, scored with `--extract`
  (lenient by default), so our rule-based extraction replaces their GPT-4 step as well;
- `--read execution`: the same for the printed output of the model's program, in the
  program-of-thought runs (`output_*_2shot_code*.json`).

Every disagreement is checked for evidence, in their own file, that their verdict is wrong
(`authors_error`); agreement is reported over all items and over the items without such
evidence.

R1-V-style result files (`{"accuracy": ..., "results": [...]}`, as R1-V and Ocean-R1 publish
them for GeoQA, SuperCLEVR counting, MathVision, MMMU and MathVerse) are recognised by their
shape and read by `r1v_results.py` (its docstring: the reader, their parsers, and its own
evidence rules); there the completion is the only text, so `--read` does not apply.

Records without a verdict or an answer are left out; a record `score` refuses as a bad row
(e.g. an answer that is none of its choices) is counted under `bad_rows`, not compared.

    python eval/compare_judgments.py output_gpt4.json [more files...] [--read response] [--show 10]
    python eval/compare_judgments.py geoqa_test_qwen2vl_7b_grpo_2epochs_legacy.json [--extract strict]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import r1v_results
from gpg_vlm.rewards.reasoning import choice_index
from gpg_vlm.score import score_records
from gpg_vlm.score_rows import BadRow


_QUERY_OPTION = re.compile(r"^\(([A-Z])\) (.*)$", re.MULTILINE)
_INVENTED = re.compile(r"\(([A-Z])\)")


def load_records(path: Path) -> list[dict] | dict:
    """MathVista's records (a list), or an R1-V-style file as it is (a dict with "results")."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return data
    return list(data.values()) if isinstance(data, dict) else list(data)


def _verdict(value) -> bool:
    """MathVista writes true_false as a bool, or as "True"/"False" in some result files."""
    return value is True or str(value).strip().lower() == "true"


def _choices(record: dict):
    choices = record.get("choices")
    return choices if isinstance(choices, list) else None


def _query_options(query) -> list[str] | None:
    """The lettered options "(A) text" as the prompt (`query`) showed them to the model."""
    runs = []  # a few-shot prompt lists its examples' options first: the last run from "(A)" is the item's
    for letter, text in _QUERY_OPTION.findall(query) if isinstance(query, str) else []:
        if letter == "A" or not runs:
            runs.append([])
        runs[-1].append(text.strip())
    return runs[-1] if runs else None


def authors_error(row: dict, item: dict) -> str | None:
    """Why MathVista's verdict on this item is demonstrably wrong, from its own file, or None.

    Only mechanical evidence counts (eval/README.md shows an example of each):
    - "empty_response": the model wrote nothing and the item is judged right;
    - "prompt_options_differ": the prompt listed its lettered options in another order (or
      set) than the `choices` the verdict maps letters by;
    - "invented_options": every line of the response is "(X) text" with X beyond the options
      (the model continued the option list and chose nothing), judged right;
    - "no_option_credited": their own extraction selects no option (a refusal, "N/A", a letter
      beyond the options) and the item is judged right: the credit is their scorer's
      nearest-option guess, not the response;
    - "option_text_read_as_letter": their extraction is an option's own text ("(b)") that their
      scorer read as a letter and mapped to another option;
    - "extraction_contradicts_response": the response's final-answer phrase, or the choice it
      opens with, selects one option (a letter, and its text agrees when given) and their
      extraction another ("The correct answer is (B) 50°." with B = 50°, extracted as "D");
    - "extraction_misses_stated_answer": the same, but their extraction selects no option
      (it is the answer to a question the model went on to invent, "455" miles) and the item
      is judged wrong by their nearest-option guess.
    """
    if row["judged"] and row["response"] is not None and not row["response"].strip():
        return "empty_response"  # (a file without responses says nothing here)
    choices = row["choices"]
    if not choices:
        return None
    if row["query_options"] and row["query_options"] != [str(c).strip() for c in choices]:
        return "prompt_options_differ"
    lines = [line.strip() for line in (row["response"] or "").splitlines() if line.strip()]
    if row["judged"] and lines and all(
            (m := _INVENTED.match(line)) and ord(m.group(1)) - ord("A") >= len(choices) for line in lines):
        return "invented_options"
    theirs = choice_index(row["extraction"], choices)
    if row["judged"] and theirs is None:
        return "no_option_credited"
    texts = [str(c).strip() for c in choices]
    if row["extraction"].strip() in texts and row["prediction"] != row["extraction"].strip():
        return "option_text_read_as_letter"
    ours = choice_index(item["answer"] or "", choices)
    if item["extracted_by"] in ("phrase", "lead") and ours is not None and ours != theirs:
        return "extraction_contradicts_response" if theirs is not None else "extraction_misses_stated_answer"
    return None


def to_score_rows(records: list[dict], read: str = "extraction") -> list[dict]:
    """One `score` row per record that has a judgment; its pid and verdict kept alongside."""
    rows, shown = [], "response" if read == "extraction" else read  # the text the model's answer is in
    for r in records:
        if "true_false" not in r or r.get("answer") is None:
            continue
        extraction = r.get("extraction")
        extraction = "" if extraction is None else str(extraction)
        multi = r.get("question_type") == "multi_choice"
        precision = r.get("precision") if r.get("answer_type") == "float" else None
        if isinstance(precision, str):  # some files write "1.0" or "None"
            precision = int(float(precision)) if precision.replace(".", "").isdigit() else None
        completion = (f"<answer>{extraction}</answer>" if read == "extraction"
                      else str(r.get(read) or ""))
        rows.append({
            "pid": r.get("pid"), "completion": completion, "solution": r["answer"],
            "question": r.get("question"),
            "choices": _choices(r) if multi else None, "precision": precision,
            "task": "choice" if multi else "math", "judged": _verdict(r["true_false"]),
            "extraction": extraction, "prediction": r.get("prediction"),
            "answer_type": r.get("answer_type"),
            "response": None if r.get(shown) is None else str(r[shown]),
            "query_options": _query_options(r.get("query")) if multi else None,
        })
    return rows


def _score(rows: list[dict], task: str, extract: str) -> tuple[list, list]:
    """(reward or None per row, bad rows) scored in-process, one call for the good rows."""
    good, bad = [], []
    for i, row in enumerate(rows):
        try:
            score_records([row], task, extract)  # the CLI's row checks, one row at a time
            good.append(i)
        except BadRow as exc:
            bad.append({"pid": row["pid"], "reason": str(exc).split(": ", 1)[-1]})
    items = score_records([rows[i] for i in good], task, extract)
    out = [None] * len(rows)
    for i, item in zip(good, items):
        out[i] = item
    return out, bad


def compare(records: list[dict] | dict, read: str = "extraction", extract: str | None = None,
            where: str = "<records>") -> dict:
    """Agreement of our scoring with the verdicts in `records` (load_records' result)."""
    if isinstance(records, dict):  # an R1-V-style file: the completion is all there is to read
        read, rows = "response", r1v_results.rows_of(records, where)
    else:
        rows = to_score_rows(records, read)
    extract = extract or ("strict" if read == "extraction" else "lenient")
    items, bad_rows = {}, []
    for task in ("choice", "math", "counting"):
        part = [r for r in rows if r["task"] == task]
        scored, bad = _score(part, task, extract)
        items.update((id(r), s) for r, s in zip(part, scored))
        bad_rows += bad
    confusion, disagreements, steps, authors_errors = Counter(), [], Counter(), Counter()
    for r in rows:
        item = items[id(r)]
        if item is None:
            continue
        ours = item["reward"] >= 1.0
        steps[item["extracted_by"]] += 1
        confusion[(ours, r["judged"])] += 1
        if ours != r["judged"]:
            reason = (r1v_results.authors_error if r.get("source") == "r1v" else authors_error)(r, item)
            if reason:
                authors_errors[reason] += 1
            disagreements.append({"authors_error": reason,"pid": r["pid"], "ours": ours, "theirs": r["judged"],
                                  "answer_type": r["answer_type"], "extraction": r["extraction"],
                                  "our_answer": item["answer"], "extracted_by": item["extracted_by"],
                                  "prediction": r["prediction"], "solution": r["solution"],
                                  "choices": r["choices"], "completion": r["completion"]})
    n = sum(confusion.values())
    agree = confusion[(True, True)] + confusion[(False, False)]
    shown = sum(authors_errors.values())
    return {"n": n, "read": read, "extract": extract, "agreement": agree / n if n else 0.0,
            "authors_errors": dict(authors_errors),
            "agreement_without_authors_errors": agree / (n - shown) if n > shown else 0.0,
            "ours_right_theirs_wrong": confusion[(True, False)],
            "ours_wrong_theirs_right": confusion[(False, True)],
            "accuracy_ours": sum(v for (o, _), v in confusion.items() if o) / max(1, n),
            "accuracy_theirs": sum(v for (_, t), v in confusion.items() if t) / max(1, n),
            "extracted_by": dict(steps), "bad_rows": bad_rows, "disagreements": disagreements}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path,
                   help="MathVista output_*.json (or .jsonl) files, or R1-V-style result files")
    p.add_argument("--read", choices=("extraction", "response", "execution"), default="extraction",
                   help="score their extracted answer, the model's own free-text response, or the "
                        "output of its program (MathVista's program-of-thought runs)")
    p.add_argument("--extract", choices=("strict", "lenient"), default=None,
                   help="extraction mode (default: strict for extraction, lenient for response)")
    p.add_argument("--show", type=int, default=5, help="print this many disagreements per file")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = p.parse_args(argv)
    results, total, agree, shown = {}, 0, 0, Counter()
    for path in args.files:
        result = compare(load_records(path), args.read, args.extract, where=str(path))
        results[path.name] = result
        total, agree = total + result["n"], agree + round(result["agreement"] * result["n"])
        shown.update(result["authors_errors"])
        print(f"{path.name}: {result['n']} items, agreement {100 * result['agreement']:.2f}% "
              f"(ours {100 * result['accuracy_ours']:.2f}% vs theirs {100 * result['accuracy_theirs']:.2f}%; "
              f"we accept {result['ours_right_theirs_wrong']} they reject, "
              f"we reject {result['ours_wrong_theirs_right']} they accept; "
              f"{len(result['bad_rows'])} bad rows; by step {result['extracted_by']}; "
              f"their flag demonstrably wrong {result['authors_errors']}, agreement without those "
              f"{100 * result['agreement_without_authors_errors']:.2f}%)")
        for d in result["disagreements"][: args.show]:
            print(f"  pid {d['pid']}: ours={d['ours']} theirs={d['theirs']} "
                  f"{'authors error ' + d['authors_error'] + '; ' if d['authors_error'] else ''}ours read "
                  f"{d['our_answer']!r} ({d['extracted_by']}), theirs {d['extraction']!r} -> "
                  f"{d['prediction']!r}; solution={d['solution']!r} choices={d['choices']}")
    if len(args.files) > 1 and total:
        n_shown = sum(shown.values())
        print(f"all files: {total} items, agreement {100 * agree / total:.2f}%; their flag demonstrably "
              f"wrong on {n_shown} ({dict(shown)}); agreement on the other {total - n_shown} items "
              f"{100 * agree / max(1, total - n_shown):.2f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
