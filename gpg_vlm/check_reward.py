"""`gpg-vlm check-reward MODULE:FUNCTION --task TASK`: lint a reward against known hacks.

Runs any TRL-style reward (`fn(completions, **columns) -> list[float]`, a user's or a built-in
name such as `reasoning`) over the cases of reward_battery.py and prints, per case, the score
and the verdict:
- ok;
- ABOVE ZERO: a hack scored more than it may (0, or its IoU allowance for boxes);
- MISSED: a control (a right answer, also as a conversational message list) scored 0;
- RAISED: the call raised (type and message shown);
- TIMEOUT: the call did not return within `--budget` seconds;
- BAD RETURN: not one real number per completion.
Exit status 0 when every case is ok, 1 otherwise, 2 for a reward that cannot be loaded.

Isolation: the cases run one by one in a worker process (forked where the platform allows,
so a reward defined in a test module works too), with an address-space limit (`--memory-mb`).
The parent waits at most the budget for each answer, plus once a grace period (`--grace`): a
call that finishes within it is repeated in the now warm worker and judged by the repeat, so a
library imported on first use is not taken for a hang. A worker that overruns is killed and a
fresh one continues with the next case, so a hang or a runaway allocation in the reward can
never block the tool.

Deliberately left out: rewards that need a model or a server (run them yourself), and any
judgement of how well a reward ranks partially right answers.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time

from gpg_vlm.reward_battery import TASKS, Case, battery
from gpg_vlm.rewards import resolve_reward


def _load(spec: str):
    return resolve_reward(spec)


def _check_return(values, n: int) -> str | None:
    """Why `values` is not n real numbers, or None when it is."""
    if not isinstance(values, (list, tuple)):
        return f"returned {type(values).__name__}, expected a list of {n} floats"
    if len(values) != n:
        return f"returned {len(values)} values for {n} completions"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"returned {v!r}, not a finite real number"
    return None


def _worker(spec: str, cases: list[Case], conn, memory_mb: int) -> None:
    """Run the cases the parent asks for (by index) and send back one result each."""
    try:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # no limit where the platform refuses one
    fn = _load(spec)
    while True:
        index = conn.recv()
        if index is None:
            return
        case = cases[index]
        try:
            values = fn([case.completion], **case.columns)
            problem = _check_return(values, 1)
            result = ("bad", problem) if problem else ("ok", float(values[0]))
        except BaseException as exc:  # noqa: BLE001 - the point is to report whatever it raises
            result = ("raised", f"{type(exc).__name__}: {str(exc)[:200]}")
        conn.send(result)


class _Runner:
    """A worker process that can be replaced when it overruns its budget."""

    def __init__(self, spec: str, cases: list[Case], memory_mb: int):
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.args = (spec, cases, memory_mb)
        self.proc = None

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(*self.args[:2], child, self.args[2]),
                                     daemon=True)
        self.proc.start()

    def _ask(self, wait: float):
        """The worker's answer to the case sent last, within `wait` seconds, or None."""
        if not self.conn.poll(wait):
            return None
        try:
            return self.conn.recv()
        except EOFError:  # the worker died (e.g. killed by the memory limit)
            exit_code, self.proc = self.proc.exitcode, None
            return "raised", f"the worker process died (exit {exit_code})"

    def run(self, index: int, budget: float, grace: float) -> tuple[str, object, float, str]:
        """(status, value, seconds, note) of one case.

        A call over the budget gets `grace` more seconds: if it then returns, it is run again
        in the now warm worker and judged by that second call, so one-time start-up work (a
        library imported on first use) is not reported as a hang; otherwise it is killed.
        """
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.monotonic()
        self.conn.send(index)
        answer, note = self._ask(budget), ""
        if answer is None:
            late = self._ask(grace)
            if late is not None and self.proc is not None:  # finished late: repeat it, warm
                note = f"first call {time.monotonic() - start:.1f} s: start-up"
                start = time.monotonic()
                self.conn.send(index)
                answer = self._ask(budget)
            else:
                answer = late  # None (still running) or the report of a dead worker
        if answer is None:
            self.close()
            return "timeout", None, time.monotonic() - start, note
        return (*answer, time.monotonic() - start, note)

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None


def verdict(case: Case, status: str, value) -> str:
    if status == "timeout":
        return "TIMEOUT"
    if status == "raised":
        return "RAISED"
    if status == "bad":
        return "BAD RETURN"
    if case.kind == "hack" and value > case.limit:
        return "ABOVE ZERO"
    if case.kind == "control" and value <= 0:
        return "MISSED"
    return "ok"


def check(spec: str, task: str, budget: float = 5.0, memory_mb: int = 8192,
          grace: float = 60.0) -> list[dict]:
    """One record per case: name, kind, status, score (or message), seconds, verdict."""
    cases = battery(task)
    runner = _Runner(spec, cases, memory_mb)
    records = []
    try:
        for i, case in enumerate(cases):
            status, value, seconds, note = runner.run(i, budget, grace)
            records.append({"name": case.name, "kind": case.kind, "status": status, "note": note,
                            "score": value if status == "ok" else None,
                            "message": value if status in ("raised", "bad") else None,
                            "seconds": seconds, "limit": case.limit,
                            "verdict": verdict(case, status, value)})
    finally:
        if runner.proc is not None:
            runner.conn.send(None)
            runner.proc.join(2)
            runner.close()
    return records


def report(spec: str, task: str, budget: float, records: list[dict]) -> str:
    lines = [f"check-reward {spec} --task {task} (budget {budget:g} s per case)", "",
             f"{'case':<58} {'kind':<8} {'score':>7}  result"]
    for r in records:
        score = f"{r['score']:.3f}" if r["score"] is not None else "-"
        result = r["verdict"]
        if r["message"]:
            result += f" ({r['message']})"
        elif r["note"]:
            result += f" ({r['note']})"
        elif r["verdict"] == "ok" and r["kind"] == "hack" and r["limit"] and r["score"]:
            result += f" (<= {r['limit']:g}: partial overlap)"
        lines.append(f"{r['name']:<58} {r['kind']:<8} {score:>7}  {result}")
    count = lambda v: sum(r["verdict"] == v for r in records)  # noqa: E731
    lines += ["", f"{count('ABOVE ZERO')} hack(s) score above zero (boxes: above their IoU "
                  f"allowance), {count('RAISED')} raise, "
                  f"{count('TIMEOUT')} exceed the budget, {count('BAD RETURN')} bad return(s), "
                  f"{count('MISSED')} control(s) missed"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpg-vlm check-reward", description=__doc__.splitlines()[0])
    p.add_argument("reward", help="MODULE:FUNCTION, or a built-in reward name (e.g. reasoning)")
    p.add_argument("--task", required=True, choices=TASKS, help="which battery of rows to use")
    p.add_argument("--budget", type=float, default=5.0, help="seconds per case (default 5)")
    p.add_argument("--memory-mb", type=int, default=8192, help="address-space limit of the worker")
    p.add_argument("--grace", type=float, default=60.0,
                   help="extra seconds a call over the budget may take once (start-up work) before "
                        "it is killed; the case is then run again and judged by that call")
    args = p.parse_args(argv)
    if not (args.budget > 0 and math.isfinite(args.budget) and 0 <= args.grace < math.inf) \
            or args.memory_mb < 256:
        print("gpg-vlm check-reward: --budget must be > 0, --grace >= 0 and --memory-mb >= 256",
              file=sys.stderr)
        return 2
    try:
        _load(args.reward)  # import errors are one line here, not one per case
    except ValueError as exc:
        print(f"gpg-vlm check-reward: {exc}", file=sys.stderr)
        return 2
    records = check(args.reward, args.task, args.budget, args.memory_mb, args.grace)
    print(report(args.reward, args.task, args.budget, records))
    return 0 if all(r["verdict"] == "ok" for r in records) else 1
