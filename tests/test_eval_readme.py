"""eval/README.md's commands stay valid: each `gpg-vlm eval` line parses with the command's own
parser, names a known benchmark, and its prompt template matches the recipe it evaluates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from gpg_vlm.evaluate import BENCHMARK_NAMES, _parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "eval" / "README.md").read_text(encoding="utf-8")
RECIPE = {"cvbench": "qwen2vl2b_sat_cvbench", "lisa": "qwen2vl2b_lisa_grounding",
          "fewshot": "qwen2vl2b_fewshot_classification", "geoqa": "qwen25vl3b_geoqa"}


def eval_commands() -> list[list[str]]:
    text = README.replace("\\\n", " ")
    lines = [line.split("#")[0] for line in text.splitlines() if line.strip().startswith("gpg-vlm eval")]
    return [shlex.split(line.strip().replace("$d", "pets"))[2:] for line in lines]


def test_every_eval_command_parses_and_matches_its_recipe():
    commands = eval_commands()
    assert len(commands) == 4
    for argv in commands:
        args = _parser().parse_args(argv)
        assert args.benchmark in BENCHMARK_NAMES
        recipe = yaml.safe_load((ROOT / "configs" / f"{RECIPE[args.benchmark]}.yaml").read_text())
        assert args.prompt_template == recipe["prompt_template"], args.benchmark
        assert args.max_new_tokens == recipe["max_new_tokens"], args.benchmark


def test_every_paper_number_of_the_design_is_beside_its_command():
    for number in ("76.15", "51.8", "89.0", "51.33"):
        assert re.search(rf"\*\*{re.escape(number)}\*\*", README), number  # in the table
        assert re.search(rf"# paper: [^\n]*\b{re.escape(number)}\b", README), number  # by its command
