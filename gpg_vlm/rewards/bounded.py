"""Hard time and memory budgets for the one reward check that can run away: math-verify.

Some short answers make sympy work for minutes and gigabytes (`(((9^{99})^{99})^{99})^{99}`
evaluates a 90-million-digit integer; `(a+b+c+d+e+f+g+h)^{40}` expands millions of terms),
and math-verify's own timeouts use signal alarms, which work only on the main thread. So a
`Worker` runs the check in a separate Python process, started once and reused:

- each call gets `time_s` seconds of wall-clock time (default `TIME_S`); past it the worker is
  killed and the item scores as a failed check (False); a fresh worker starts at once, in the
  background, for the next call;
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
JSON lines on stdin/stdout; if it cannot start (math-verify not installed, no subprocesses)
every call returns False, as if math-verify were absent, with one warning.

Deliberately left out: a pool of workers (one check at a time is fast enough: about 10 ms
each) and budgets for the pure-Python rewards, which are bounded by their input guards.
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

TIME_S = 2.0  # a symbolic check normally takes 5-50 ms
MEMORY_BYTES = 1 << 30  # the worker with sympy loaded uses about 250 MB
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


class Worker:
    """One reused worker process running `target` ("module:function") under the budgets."""

    def __init__(self, target: str, time_s: float = TIME_S, memory_bytes: int = MEMORY_BYTES):
        self.target, self.time_s, self.memory_bytes = target, time_s, memory_bytes
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.broken = False  # could not start: every call returns the default
        self.lock = threading.Lock()
        self.buffer = b""
        atexit.register(self.close)

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding gpg_vlm/
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpg_vlm.rewards.bounded", self.target,
             str(self.memory_bytes), str(self.time_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.ready, self.buffer = False, b""

    def _read_line(self, deadline: float) -> bytes | None:
        """One reply line, or None on timeout or when the worker is gone."""
        fd = self.proc.stdout.fileno()
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

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc = None

    def _ensure_ready(self) -> bool:
        if self.proc is None:
            self._start()
        if self.ready:
            return True
        line = self._read_line(time.monotonic() + START_S)
        if line is None or not json.loads(line).get("ready"):
            self._kill()
            self.broken = True
            log.warning("reward check %s is unavailable (its worker did not start); such items "
                        "score 0", self.target)
            return False
        self.ready = True
        return True

    def call(self, *args, default=False):
        """target(*args) in the worker (JSON-able arguments and result); `default` on any failure."""
        with self.lock:
            if self.broken or not self._ensure_ready():
                return default
            try:
                self.proc.stdin.write(json.dumps({"args": args}).encode() + b"\n")
                self.proc.stdin.flush()
            except OSError:  # the worker died between calls
                self._restart()
                return default
            line = self._read_line(time.monotonic() + self.time_s)
            reply = json.loads(line) if line is not None else None
            if reply is None or "memory" in reply:
                # a runaway check: killed at its time budget, or it ran out of memory (a
                # MemoryError reply, or the worker died); either way a fresh worker is started
                code = self.proc.poll() if line is None else None
                # alive at the deadline, or stopped by its CPU cap: time; else it ran out of memory
                _count("time" if line is None and code in (None, -signal.SIGXCPU) else "memory")
                self._restart()
                return default
            return reply.get("result", default)

    def _restart(self) -> None:
        self._kill()
        self._start()  # in the background: its imports overlap with the caller's work

    def close(self) -> None:
        with self.lock:
            self._kill()


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
