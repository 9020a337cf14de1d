"""Reports of a training run: summary.json, report.md and curves.png from its metrics.

Reads only what the trainer logged (one dict per step or evaluation), so a report can be
rebuilt from any run's metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path


SMOOTH = 10  # steps in the rolling mean of the per-step curves


def _series(history: list[dict], key: str, x: str) -> tuple[list, list]:
    pts = [(h[x], h[key]) for h in history if key in h and x in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(task: str, algorithm: str, run: dict) -> dict:
    history = run["history"]
    evals = [h for h in history if "eval/accuracy" in h]
    steps = [h for h in history if "reward" in h]
    accuracy = [h["eval/accuracy"] for h in evals]
    return {
        "task": task,
        "algorithm": algorithm,
        "metric": "mean IoU" if task == "grounding" else "accuracy",
        "accuracy_before": accuracy[0] if accuracy else None,
        "accuracy_after": accuracy[-1] if accuracy else None,
        "accuracy_peak": max(accuracy) if accuracy else None,
        "seconds": round(run["seconds"], 1),
        "steps": run["steps"],
        "seconds_per_step": round(run["seconds"] / max(1, run["steps"]), 3),
        "informative_fraction_last50": _mean([h["informative_fraction"] for h in steps[-50:]]),
        "updates": sum(1 for h in steps if h.get("updated")),
        "by_answer": run.get("by_answer"),
        "never_answered": sorted(k for k, v in run.get("by_answer", {}).items()
                                 if v["answer_share"] == 0),
    }


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def rolling_mean(ys: list[float], k: int) -> list[float]:
    """Mean of each value and the k - 1 before it (fewer at the start)."""
    return [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1])
            for i in range(len(ys))]


def plot(path: Path, runs: dict[str, list[dict]], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "held-out mean IoU" if task == "grounding" else "held-out accuracy"
    panels = [("reward", "training reward"), ("eval/accuracy", metric), ("alpha", "alpha")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for row, (x, xlabel) in enumerate((("step", "step"), ("train_seconds", "training seconds"))):
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for name, history in runs.items():
                xs, ys = _series(history, key, x)
                if key.startswith("eval") or len(ys) <= SMOOTH:
                    ax.plot(xs, ys, label=name, marker="o" if key.startswith("eval") else None,
                            markersize=3)
                    continue
                # per-step series are noisy (alpha flips between two values each step and
                # would draw as a solid band): the raw values faint, a rolling mean on top
                raw = ax.plot(xs, ys, linewidth=0.5, alpha=0.25)[0]
                ax.plot(xs, rolling_mean(ys, SMOOTH), color=raw.get_color(),
                        label=f"{name} (mean of {SMOOTH})")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if key == "eval/accuracy":
                ax.set_ylim(0, 1)
            ax.legend()
    fig.suptitle(f"gpg-vlm demo: Fashion-MNIST {task}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(out: Path, task: str, results: dict, settings: dict, total_seconds: float,
                  compare: bool = False) -> dict:
    """summary.json, curves.png and report.md; `settings` is shown as given (a flat dict)."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(task, name, run) for name, run in results.items()}
    if compare:
        summary = {"task": task, "compare": summaries, "total_seconds": round(total_seconds, 1)}
    else:
        (summary,) = summaries.values()
        summary = {**summary, "total_seconds": round(total_seconds, 1)}
    summary["settings"] = settings
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot(out / "curves.png", {n: r["history"] for n, r in results.items()}, task)
    metric = "mean IoU" if task == "grounding" else "accuracy"
    lines = [f"# gpg-vlm demo: Fashion-MNIST {task}", "",
             f"| algorithm | {metric} before (after warm-up) | {metric} after | peak | steps | "
             "training seconds | s/step |", "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {_pct(s['accuracy_before'])} | {_pct(s['accuracy_after'])} | "
                     f"{_pct(s['accuracy_peak'])} | {s['steps']} | {s['seconds']} | "
                     f"{s['seconds_per_step']} |")
    for name, run in results.items():
        if run.get("by_answer"):
            lines += ["", f"{name}, held-out by true answer (greedy): accuracy and the share of "
                      "all answers naming it (0: the policy no longer says it at all)", "",
                      "| answer | n | accuracy | share of answers |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_pct(v['accuracy'])} | {_pct(v['answer_share'])} |"
                      for k, v in run["by_answer"].items()]
    lines += ["", "Settings:", "", "```", json.dumps(settings, indent=1), "```",
              "", "![curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return summary


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"
