"""Datasets: one schema (`Row`), safe image loading, benchmark adapters, the Fashion-MNIST suite.

See data/README.md for the schema. Nothing here imports torch or transformers.
"""

from gpg_vlm.data.benchmarks import ADAPTERS, load_benchmark
from gpg_vlm.data.loading import Rows, Skipped, load_rows, save_jsonl
from gpg_vlm.data.schema import TASKS, DataError, Row, make_row

__all__ = ["ADAPTERS", "TASKS", "DataError", "Row", "Rows", "Skipped", "load_benchmark", "load_rows", "make_row", "save_jsonl"]
