"""Agreement of `gpg-vlm score` with MathVista's own per-item judgments.

MathVista (lupantech/MathVista, results/*/output_*.json) publishes, for each model and each
testmini problem, the model's free-text `response`, the answer its GPT-4 step extracted from
it (`extraction`), and its verdict `true_false`. This script turns such a file (the published
JSON object keyed by pid, or a JSONL of the same records) into `score`'s input, with the
extracted answer as the completion's answer (`<answer>{extraction}</answer>`), scores it with
the training reward (task `choice` for multi_choice rows, `math` otherwise, with the row's
`precision`) and reports item-by-item agreement with `true_false`.

What it measures: our answer comparison against MathVista's normalisation on the same
extracted answers. It does not measure answer extraction: MathVista uses GPT-4 for that, and
our reward reads only `<answer>` tags.

    python eval/compare_judgments.py output_gpt4.json [more files...] [--show 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def load_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return list(data.values()) if isinstance(data, dict) else list(data)


def to_score_rows(records: list[dict]) -> list[dict]:
    """One `score` row per record that has a judgment; its pid and verdict kept alongside."""
    rows = []
    for r in records:
        if "true_false" not in r or r.get("answer") is None:
            continue
        extraction = r.get("extraction")
        extraction = "" if extraction is None else str(extraction)
        multi = r.get("question_type") == "multi_choice"
        rows.append({
            "pid": r.get("pid"),
            "completion": f"<answer>{extraction}</answer>",
            "solution": r["answer"],
            "choices": r.get("choices") if multi else None,
            "precision": r.get("precision") if r.get("answer_type") == "float" else None,
            "task": "choice" if multi else "math",
            "judged": bool(r["true_false"]),
            "prediction": r.get("prediction"),
            "answer_type": r.get("answer_type"),
        })
    return rows


def score(rows: list[dict], task: str) -> list[float]:
    """Rewards from the real command line, so the comparison covers `gpg-vlm score` itself."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.json"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        cmd = [sys.executable, "-m", "gpg_vlm.cli", "score", "--predictions", str(src),
               "--task", task, "--output", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return [item["reward"] for item in json.loads(out.read_text())["items"]]


def compare(records: list[dict]) -> dict:
    rows = to_score_rows(records)
    rewards = {}
    for task in ("choice", "math"):
        part = [r for r in rows if r["task"] == task]
        if part:
            rewards.update(zip((id(r) for r in part), score(part, task)))
    confusion, disagreements = Counter(), []
    for r in rows:
        ours = rewards[id(r)] >= 1.0
        confusion[(ours, r["judged"])] += 1
        if ours != r["judged"]:
            disagreements.append({"pid": r["pid"], "ours": ours, "theirs": r["judged"],
                                  "answer_type": r["answer_type"], "extraction": r["completion"][8:-9],
                                  "prediction": r["prediction"], "solution": r["solution"],
                                  "choices": r["choices"]})
    n = len(rows)
    agree = confusion[(True, True)] + confusion[(False, False)]
    return {"n": n, "agreement": agree / n if n else 0.0,
            "ours_right_theirs_wrong": confusion[(True, False)],
            "ours_wrong_theirs_right": confusion[(False, True)],
            "accuracy_ours": sum(v for (o, _), v in confusion.items() if o) / max(1, n),
            "accuracy_theirs": sum(v for (_, t), v in confusion.items() if t) / max(1, n),
            "disagreements": disagreements}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="MathVista output_*.json (or .jsonl) files")
    p.add_argument("--show", type=int, default=5, help="print this many disagreements per file")
    args = p.parse_args(argv)
    for path in args.files:
        result = compare(load_records(path))
        print(f"{path.name}: {result['n']} items, agreement {100 * result['agreement']:.2f}% "
              f"(ours {100 * result['accuracy_ours']:.2f}% vs theirs {100 * result['accuracy_theirs']:.2f}%; "
              f"we accept {result['ours_right_theirs_wrong']} they reject, "
              f"we reject {result['ours_wrong_theirs_right']} they accept)")
        for d in result["disagreements"][: args.show]:
            print(f"  pid {d['pid']}: ours={d['ours']} theirs={d['theirs']} extraction={d['extraction']!r} "
                  f"prediction={d['prediction']!r} solution={d['solution']!r} choices={d['choices']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
