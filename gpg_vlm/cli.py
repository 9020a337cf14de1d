"""The `gpg-vlm` command line: one subcommand per job, each implemented in its own module.

Each subcommand's module exposes `main(argv: list[str]) -> int` and parses its own
arguments; this file only dispatches, so `gpg-vlm --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("gpg_vlm.tiny", "build a small random Qwen-VL checkpoint offline"),
    "prepare-data": ("gpg_vlm.data.prepare", "build the Fashion-MNIST task suite as JSONL + PNG"),
    "train": ("gpg_vlm.train", "GPG / GRPO / Dr.GRPO training from a YAML config"),
    "eval": ("gpg_vlm.evaluate", "evaluate a checkpoint on a benchmark"),
    "export": ("gpg_vlm.export", "write a checkpoint as a plain Hugging Face / PEFT folder"),
    "score": ("gpg_vlm.score", "score pre-generated completions with the training rewards"),
    "demo": ("gpg_vlm.demo", "CPU demo: warm-up, then GPG on Fashion-MNIST"),
    "bench": ("gpg_vlm.bench", "side-by-side speed and memory benchmark against TRL"),
}


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
    if name not in COMMANDS:
        print(f"gpg-vlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("gpg_vlm"):
            print(f"gpg-vlm: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main([*rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
