"""`gpg-vlm prepare-data fashion-mnist --out DIR`: write the Fashion-MNIST task suite.

Writes DIR/{task}_{train,test}.jsonl in the gpg_vlm schema, with PNGs under DIR/images/.
Train rows draw only from the official train split, test rows only from t10k.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gpg_vlm.data import fashion_mnist as fm
from gpg_vlm.data.loading import save_jsonl
from gpg_vlm.data.schema import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpg-vlm prepare-data", description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["fashion-mnist"], help="the dataset to build")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    p.add_argument("--train-size", type=int, default=1000, help="rows per task from the train split")
    p.add_argument("--test-size", type=int, default=200, help="rows per task from the t10k split")
    p.add_argument("--tasks", nargs="+", choices=list(fm.TASKS), default=list(fm.TASKS), help="tasks to build")
    p.add_argument("--image-size", type=int, default=56, help="side of classification images, px")
    p.add_argument("--canvas-size", type=int, nargs=2, default=list(fm.CANVAS), metavar=("MIN", "MAX"),
                   help="side range of grounding/counting/spatial canvases, px")
    p.add_argument("--source", type=Path, default=None, help="folder with the idx .gz files (default: Debian package)")
    p.add_argument("--require-full", action="store_true", help="fail instead of falling back to the committed sample")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        source = fm.find_source(args.source, args.require_full)
        args.out.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", args.train_size), ("test", args.test_size)):
            data = fm.load_split(split, source)
            for task in args.tasks:
                rows = fm.build_tasks(task, split, n, args.seed, args.out, image_size=args.image_size,
                                      canvas=tuple(args.canvas_size), source=data)
                path = args.out / f"{task}_{split}.jsonl"
                save_jsonl(rows, path)
                print(f"{path}: {len(rows)} rows from {len(data)} {split} images in {source}")
    except DataError as exc:
        print(f"gpg-vlm prepare-data: {exc}", file=sys.stderr)
        return 1
    return 0
