"""Shared fixtures: tiny checkpoints of each family and Fashion-MNIST rows, built once per test
session, and free ports for multi-process tests. Plain helper functions are in helpers.py.

Test checkpoints use a larger initialisation (std 0.2 instead of Qwen's 0.02) so that the
log-probs depend strongly on every input: a scrambled patch or a wrong position changes them
by far more than the tolerances the tests use.
"""

import importlib.util
import socket
import sys

import pytest
import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")
TEST_INIT_STD = 0.2


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> path of an `xs` checkpoint, built on first use."""
    from gpg_vlm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = make_tiny_model(family, "xs", root / family, seed=0,
                                            init_std=TEST_INIT_STD)
        return built[family]

    return get


@pytest.fixture(scope="session")
def adapters(tiny_dirs):
    """family -> a loaded VLMAdapter (fp32, CPU), loaded on first use."""
    from gpg_vlm.models.adapter import VLMAdapter

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = VLMAdapter.from_pretrained(tiny_dirs(family), device="cpu")
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def fm_data(tmp_path_factory):
    """A few Fashion-MNIST classification rows (real images, from the committed sample)."""
    from gpg_vlm.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("fm")
    assert prepare(["fashion-mnist", "--out", str(out), "--train-size", "32", "--test-size", "8",
                    "--tasks", "classification", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def fm_mixed(tmp_path_factory):
    """Three classification and two counting Fashion-MNIST rows in one schema file."""
    from gpg_vlm.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("fm_eval")
    assert prepare(["fashion-mnist", "--out", str(out), "--train-size", "1", "--test-size", "3",
                    "--tasks", "classification", "counting"]) == 0
    lines = (out / "classification_test.jsonl").read_text().splitlines()
    lines += (out / "counting_test.jsonl").read_text().splitlines()[:2]
    (out / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return out / "mixed.jsonl"


@pytest.fixture
def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released) for torchrun."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rewards the config can name as planted_rewards:NAME (written into a folder on sys.path)
PLANTED_REWARDS = '''
calls = [0]

def huge_reward(completions, **columns):
    """1e308 is finite in float64 but inf in float32: the advantages, then the loss, are NaN."""
    return [1e308 if len(c) % 2 == 0 else 0.0 for c in completions]

def huge_once_reward(completions, **columns):
    calls[0] += 1
    if calls[0] == 1:
        return huge_reward(completions)
    return [float(len(c) % 2 == 0) for c in completions]
'''


@pytest.fixture
def plant_module(tmp_path, monkeypatch):
    """plant_module(name, source) -> folder: a Python module written into a folder on sys.path
    (and, through helpers.env, on PYTHONPATH for subprocesses), forgotten again after the test."""
    names = []

    def plant(name: str, source: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(folder))
        sys.modules.pop(name, None)
        names.append(name)
        return folder

    yield plant
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def planted(plant_module):
    """A folder on sys.path holding planted_rewards.py (rewards a config names as planted_rewards:NAME)."""
    return plant_module("planted_rewards", PLANTED_REWARDS)


@pytest.fixture
def one_thread():
    """Runs compared with a subprocess (OMP_NUM_THREADS=1) use one thread here too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Deselect (not skip) the tests marked `vllm` where vLLM is not installed, unless the marker
    expression asks for them by name (`-m vllm` then fails loudly instead of running nothing)."""
    if importlib.util.find_spec("vllm") is not None or "vllm" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("vllm") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("vllm")])
        items[:] = keep
