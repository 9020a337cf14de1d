"""The `gpg-vlm` command line: one subcommand per job, each implemented in its own module.

Each subcommand's module exposes `main(argv: list[str]) -> int` and parses its own
arguments; this file only dispatches, so `gpg-vlm --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("gpg_vlm.tiny", "build a small random Qwen-VL checkpoint offline"),
    "make-real-model": ("gpg_vlm.real_shapes", "build a random bf16 checkpoint of a real Qwen-VL shape"),
    "estimate": ("gpg_vlm.estimate", "expected peak memory per device of a training config"),
    "prepare-data": ("gpg_vlm.data.prepare", "build the Fashion-MNIST task suite as JSONL + PNG"),
    "train": ("gpg_vlm.train", "GPG / GRPO / Dr.GRPO training from a YAML config"),
    "eval": ("gpg_vlm.evaluate", "evaluate a checkpoint on a benchmark"),
    "export": ("gpg_vlm.export", "write a checkpoint as a plain Hugging Face / PEFT folder"),
    "score": ("gpg_vlm.score", "score pre-generated completions with the training rewards"),
    "check-reward": ("gpg_vlm.check_reward", "run a reward function over known hacks and edge cases"),
    "demo": ("gpg_vlm.demo", "CPU demo: warm-up, then GPG on Fashion-MNIST"),
    "bench": ("bench.harness", "side-by-side speed and memory benchmark against TRL"),
}
# Commands whose code lives in the source checkout beside the package, not in the package itself.
CHECKOUT = Path(__file__).resolve().parent.parent
CHECKOUT_PACKAGES = ("bench",)


def checkout_module(module_name: str):
    """Import `module_name` (e.g. "bench.harness") from the source checkout this package runs from.

    Raises LookupError with a one-line reason when the package is installed without its checkout.
    """
    top = module_name.split(".")[0]
    where = CHECKOUT / top / "__init__.py"
    if not where.is_file():
        raise LookupError(f"this needs the source checkout ({top}/ beside gpg_vlm/, not found at "
                          f"{where.parent}); clone the repository and run it from there")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    module = importlib.import_module(module_name)
    if not Path(module.__file__).resolve().is_relative_to(CHECKOUT):  # another `bench` shadows ours
        raise LookupError(f"{module_name} was imported from {module.__file__}, not from {CHECKOUT}")
    return module


def _usage() -> str:
    lines = ["usage: gpg-vlm COMMAND [options]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<16} {text}")
    lines.append("")
    lines.append("Run `gpg-vlm COMMAND --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from gpg_vlm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name == "bench" and rest[:1] in (["scale"], ["sweep"]):
        return _bench_scale(rest[0], rest[1:])
    if name not in COMMANDS:
        print(f"gpg-vlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        if module_name.split(".")[0] in CHECKOUT_PACKAGES:
            module = checkout_module(module_name)
        else:
            module = importlib.import_module(module_name)
    except LookupError as exc:
        print(f"gpg-vlm {name}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("gpg_vlm"):
            print(f"gpg-vlm: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main([*rest]) or 0)


def _bench_scale(name: str, argv: list[str]) -> int:
    """`gpg-vlm bench scale` / `bench sweep`: the real-shape benches, bench/scale.py and
    bench/sweep.py in the source checkout."""
    try:
        module = checkout_module(f"bench.{name}")
    except LookupError as exc:
        print(f"gpg-vlm bench {name}: {exc}", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
