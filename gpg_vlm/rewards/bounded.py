"""Hard time and memory budgets for the one reward check that can run away: math-verify.

Some short answers make sympy work for minutes and gigabytes (`(((9^{99})^{99})^{99})^{99}`
evaluates a 90-million-digit integer; `(a+b+c+d+e+f+g+h)^{40}` expands millions of terms),
and math-verify's own timeouts use signal alarms, which work only on the main thread. So a
`Worker` runs the check in a separate Python process, started once and reused:

- each call gets `time_s` seconds of wall-clock time (default `TIME_S`); past it the worker is
  killed and the item scores as a failed check (False); a spare worker, started beforehand,
  takes the next call, and a new spare starts in the background;
- the worker's address space is capped at `memory_bytes` (RLIMIT_AS, default `MEMORY_BYTES`):
  sympy meets a MemoryError (or the worker dies) instead of the machine running out, the
  item fails, and the worker is replaced;
- its CPU time per call is capped too (RLIMIT_CPU, a few times `time_s`), so a worker whose
  parent was killed mid-check cannot spin on after it;
- calls from any thread are serialised by a lock; nothing uses signals in the caller.

Every item that hits a budget is counted: `take_over_budget()` returns the counts since its
previous call, `{"time": n, "memory": m}`, and resets them (per process). The trainer logs
their sum as `reward/over_budget` once per step.

The worker is `python -m gpg_vlm.rewards.bounded MODULE:FUNCTION MEMORY_BYTES TIME_S`, speaking
JSON lines on stdin/stdout. Without math-verify installed no worker is started (reasoning.py
checks first); a worker that cannot start otherwise makes every call return False, as if
math-verify were absent, with one warning.

Deliberately left out: a pool of workers (one check at a time is fast enough) and budgets
for the pure-Python rewards, which their input guards bound (100k-character completions of
brackets, tags, digits or carets score in under 0.3 s each).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("gpg_vlm.rewards")

TIME_S = 2.0  # a warmed-up check takes 5-30 ms (first uses of a sympy part up to 0.8 s)
MEMORY_BYTES = 1 << 30  # a warmed-up worker peaks at about 70 MB of address space
START_S = 120.0  # importing sympy on a loaded machine can take many seconds

_counts: Counter = Counter()
_counts_lock = threading.Lock()


def _count(kind: str) -> None:
    with _counts_lock:
        _counts[kind] += 1


def take_over_budget() -> dict[str, int]:
    """Items that hit a budget since the previous call, {"time": n, "memory": m}; resets."""
    with _counts_lock:
        out = {"time": _counts["time"], "memory": _counts["memory"]}
        _counts.clear()
    return out


class _Process:
    """One worker process: its pipes and the bytes of a reply read so far."""

    def __init__(self, argv: list[str]):
        root = str(Path(__file__).resolve().parents[2])  # the folder holding gpg_vlm/
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, env=env)
        self.buffer = b""
        self.ready = False

    def read_line(self, deadline: float) -> bytes | None:
        """One reply line, or None on timeout or when the process is gone."""
        fd = self.popen.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def send(self, args: tuple) -> bool:
        try:
            self.popen.stdin.write(json.dumps({"args": args}).encode() + b"\n")
            self.popen.stdin.flush()
            return True
        except OSError:  # it died between calls
            return False

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()
        self.popen.stdin.close()
        self.popen.stdout.close()


class Worker:
    """A reused worker process running `target` ("module:function") under the budgets.

    A spare process is kept started beside it (after the first is ready, so the two do not
    compete for the CPU while importing): when a check is killed, the next one goes to the
    spare at once instead of waiting seconds for a fresh process to import sympy.
    """

    def __init__(self, target: str, time_s: float = TIME_S, memory_bytes: int = MEMORY_BYTES):
        self.target, self.time_s, self.memory_bytes = target, time_s, memory_bytes
        self.current: _Process | None = None
        self.spare: _Process | None = None
        self.broken = False  # could not start: every call returns the default
        self.lock = threading.Lock()
        atexit.register(self.close)

    def _spawn(self) -> _Process:
        return _Process([sys.executable, "-m", "gpg_vlm.rewards.bounded", self.target,
                         str(self.memory_bytes), str(self.time_s)])

    def _ready(self) -> _Process | None:
        """The process to send the next check to, started and ready; None if it cannot start."""
        if self.current is None:
            self.current, self.spare = self.spare or self._spawn(), None
        proc = self.current
        if not proc.ready:
            line = proc.read_line(time.monotonic() + START_S)
            if line is None or not json.loads(line).get("ready"):
                self.close_unlocked()
                self.broken = True
                log.warning("reward check %s is unavailable (its worker did not start); such "
                            "items score 0", self.target)
                return None
            proc.ready = True
        if self.spare is None:
            self.spare = self._spawn()
        return proc

    def _retire(self) -> None:
        """Kill the current process; the spare takes the next check."""
        if self.current is not None:
            self.current.kill()
            self.current = None

    def call(self, *args, default=False):
        """target(*args) in the worker (JSON-able arguments and result); `default` on any failure."""
        with self.lock:
            for _ in range(2):  # a process that died between calls is replaced once
                proc = None if self.broken else self._ready()
                if proc is None:
                    return default
                if proc.send(args):
                    break
                self._retire()
            else:
                return default
            line = proc.read_line(time.monotonic() + self.time_s)
            reply = json.loads(line) if line is not None else None
            if reply is None or "memory" in reply:
                # a runaway check: alive at its deadline or stopped by its CPU cap (time), or
                # out of memory (a MemoryError reply, or the process died); it is replaced
                code = proc.popen.poll() if line is None else None
                _count("time" if line is None and code in (None, -signal.SIGXCPU) else "memory")
                self._retire()
                return default
            return reply.get("result", default)

    def close_unlocked(self) -> None:
        for proc in (self.current, self.spare):
            if proc is not None:
                proc.kill()
        self.current = self.spare = None

    def close(self) -> None:
        """Stop the worker processes (also at exit); the next call starts them again."""
        with self.lock:
            self.close_unlocked()


def _limit_cpu(seconds: float) -> None:
    """Cap this process's CPU time at what it has used so far plus `seconds`."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cap = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cap, hard))


def _peak_bytes() -> int:
    """The largest address space this process has had (what RLIMIT_AS bounds); 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _serve(target: str, memory_bytes: int, time_s: float) -> None:
    import importlib
    import resource

    logging.disable(logging.CRITICAL)  # math-verify warns on every call with timeouts disabled
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    out = sys.stdout.buffer
    try:
        module_name, _, name = target.partition(":")
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
        if hasattr(module, "warm_up"):  # e.g. imports sympy now, not inside the first timed call
            module.warm_up()
    except Exception:  # noqa: BLE001 - anything that stops the start is "unavailable"
        out.write(b'{"ready": false}\n')
        out.flush()
        return
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        args = json.loads(line)["args"]
        _limit_cpu(4 * time_s + 5)
        try:
            reply = {"result": fn(*args)}
        except MemoryError:
            reply = {"memory": True}
        except Exception:  # noqa: BLE001 - the check itself decides what it catches
            reply = {"result": False}
        if _peak_bytes() > 0.9 * memory_bytes:  # sympy caught a MemoryError itself
            reply = {"memory": True}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
