"""sharding: fsdp (torch FSDP2) against DDP, two CPU processes under torchrun (gloo).

One torchrun runs this file as a worker (`__main__` below), so the imports are paid once: in
each process it trains the same tiny config under ddp and under fsdp (rollout through the
gathered parameters, gradient accumulation over several micro-batches, more on one process
than on the other, clipping, a checkpoint at steps 2 and 3), resumes each run's checkpoint-2 under the other sharding, and trains once more
under fsdp with another learning rate as the negative control. The test compares what the
processes report: per-step losses and gradient norms, parameter checksums, checkpoint files.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
TOL = 1e-5


def _close(a: list, b: list, tol: float = TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tiny_dirs, fm_data, tmp_path_factory):
    import socket

    # the conftest free_port fixture is function-scoped (this fixture is shared); its recipe:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("fsdp")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port), str(Path(__file__)),
            str(tiny_dirs("qwen2_vl")), str(fm_data / "classification_train.jsonl"), str(root)]
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "returned a view tensor" not in run.stderr  # FSDP2's warning about its backward hook
    return root, json.loads((root / "report.json").read_text())


def test_fsdp_steps_equal_ddp(runs):
    root, report = runs
    ddp, fsdp, other_lr = report["ddp"], report["fsdp"], report["fsdp_lr"]
    assert len(ddp["loss"]) == 3 and all(ddp["updated"]) and all(fsdp["updated"])
    # accumulation (no sync until the last micro-batch) ran, with more micro-batches on one
    # process than on the other at some step (the other ran dummies: FSDP needs equal counts)
    assert fsdp["micro_batches"] == ddp["micro_batches"]
    assert any(len(set(c)) > 1 and max(c) >= 2 for c in fsdp["micro_batches"]), fsdp["micro_batches"]
    assert _close(fsdp["loss"], ddp["loss"]), (fsdp["loss"], ddp["loss"])
    assert _close(fsdp["grad_norm"], ddp["grad_norm"]), (fsdp["grad_norm"], ddp["grad_norm"])
    assert fsdp["grad_norm"][0] > 0.1  # max_grad_norm clipped at 0.1: the global norm matters
    # every process ends with the same full weights, equal to DDP's
    assert len(set(fsdp["checksums"])) == 1
    assert _close(fsdp["checksums"], ddp["checksums"]), (fsdp["checksums"], ddp["checksums"])
    # negative control: another learning rate moves step 2 onwards far past the tolerance
    assert other_lr["loss"][0] == pytest.approx(ddp["loss"][0], abs=TOL)  # same first step
    assert abs(other_lr["loss"][1] - ddp["loss"][1]) > 100 * TOL
    assert not _close(other_lr["checksums"], ddp["checksums"])
    # the vLLM weight sync's view (gpg_vlm/rollout/vllm.py full_weights): whole, equal to DDP's
    assert fsdp["engine_weights"][0] == ddp["engine_weights"][0]
    assert _close(fsdp["engine_weights"][1:], ddp["engine_weights"][1:])


def test_fsdp_checkpoint_is_an_ordinary_checkpoint(runs):
    from safetensors.torch import load_file

    from gpg_vlm.models.adapter import VLMAdapter

    root, report = runs
    a = load_file(root / "ddp" / "checkpoint-3" / "model.safetensors")
    b = load_file(root / "fsdp" / "checkpoint-3" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= TOL, worst
    opt_a = torch.load(root / "ddp" / "checkpoint-3" / "optimizer.pt", weights_only=False)["optimizer"]
    opt_b = torch.load(root / "fsdp" / "checkpoint-3" / "optimizer.pt", weights_only=False)["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # same layout, keyed by index
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        for key, value in state.items():
            other = opt_b["state"][i][key]
            assert other.shape == value.shape and torch.allclose(other, value, atol=1e-6, rtol=1e-4), (i, key)
    # what `gpg-vlm eval` loads: the gathered weights, whole
    loaded = dict(VLMAdapter.from_pretrained(root / "fsdp" / "checkpoint-3", device="cpu").model.named_parameters())
    assert all(torch.equal(loaded[k], b[k]) for k in b if k in loaded)


def test_checkpoints_resume_across_shardings(runs):
    _, report = runs
    ddp = report["ddp"]
    # an fsdp checkpoint resumed under ddp, and a ddp checkpoint under fsdp: step 3 as the
    # uninterrupted run (its loss, then the weights after its Adam update)
    for name in ("ddp_from_fsdp", "fsdp_from_ddp"):
        run = report[name]
        assert _close(run["loss"], ddp["loss"][2:]), (name, run["loss"], ddp["loss"])
        assert _close(run["checksums"], ddp["checksums"]), (name, run["checksums"], ddp["checksums"])


def test_fsdp_refuses_lora_in_one_line(tiny_dirs, fm_data, tmp_path):
    from helpers import make_config

    from gpg_vlm.config import ConfigError

    with pytest.raises(ConfigError, match="'sharding': fsdp with LoRA"):
        make_config(tiny_dirs, fm_data, tmp_path, sharding="fsdp", lora_r=4)
    with pytest.raises(ConfigError, match="'sharding': 'zero3' is not one of ddp, fsdp"):
        make_config(tiny_dirs, fm_data, tmp_path, sharding="zero3")


def test_accelerate_fsdp_launcher_is_refused_in_one_line():
    """accelerate's FSDP launcher (on GPUs; on CPU accelerate stops first) names what to use."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from gpg_vlm.config import ConfigError
    from gpg_vlm.dist import Processes

    acc = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True,
                          distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="set sharding: fsdp in the training config") as caught:
        Processes(acc, "fsdp")
    assert "\n" not in str(caught.value)
    acc.distributed_type = DistributedType.MULTI_CPU
    assert Processes(acc, "fsdp").fsdp and not Processes(acc, "ddp").fsdp
    acc.num_processes = 1  # one process: nothing to shard
    assert not Processes(acc, "fsdp").fsdp


# ------------------------------------------------------------------ the worker (torchrun)
def uneven_reward(completions, **columns):
    """Parity of the length on process 0; on process 1 only in its first group (G = 4), so the
    processes train different numbers of completions, hence of micro-batches."""
    first_only = os.environ.get("RANK") == "1"
    return [float(len(c) % 2 == 0) if i < 4 or not first_only else 0.0 for i, c in enumerate(completions)]


def _train(model: str, data: str, out: Path, resume: Path | None = None, **changes) -> dict:
    """Train one config in this process; what the test compares (the same on every process)."""
    from gpg_vlm.config import TrainConfig
    from gpg_vlm.train import Trainer

    values = dict(model=model, data=data, output_dir=str(out), group_size=4, prompts_per_step=4,
                  max_new_tokens=6, learning_rate=1e-3, max_steps=3, save_steps=2, save_total_limit=3,
                  rewards={"test_fsdp:uneven_reward": 1.0}, tensorboard=False,
                  lr_schedule="constant", max_resample_tries=0, max_grad_norm=0.1,
                  micro_batch_tokens=64)  # small enough for several micro-batches per process
    values.update(changes)
    trainer = Trainer(TrainConfig(**values), resume=resume)
    history = trainer.train()
    steps = [h for h in history if "loss" in h]
    return {**_metrics(history, steps), "engine_weights": _engine_weights(trainer)}


def _engine_weights(trainer) -> list:
    """(name count, checksum) of what the vLLM weight sync would send, taken as train.py does
    (inside the rollout's gathered parameters); under fsdp its state_dict holds DTensors."""
    from gpg_vlm.rollout.vllm import full_weights

    with trainer.procs.full_parameters(trainer.scorer, trainer.adapter.model):
        weights = dict(full_weights(trainer.adapter.model))
    names = sorted(weights)
    return [len(names), float(sum((weights[k].double() * (i + 1)).sum() for i, k in enumerate(names)))]


def _metrics(history: list, steps: list) -> dict:
    return {"loss": [h["loss"] for h in steps], "grad_norm": [h.get("grad_norm", 0.0) for h in steps],
            "updated": [h["updated"] for h in steps],
            "checksums": next(h["parameter_checksums"] for h in history if "parameter_checksums" in h),
            "micro_batches": [h.get("micro_batches_per_process") for h in steps]}


def _worker(model: str, data: str, root: str) -> None:
    root = Path(root)
    report = {
        "ddp": _train(model, data, root / "ddp"),
        "fsdp": _train(model, data, root / "fsdp", sharding="fsdp"),
        "fsdp_lr": _train(model, data, root / "fsdp_lr", sharding="fsdp", learning_rate=3e-3,
                          max_steps=2),
    }
    report["ddp_from_fsdp"] = _train(model, data, root / "ddp_from_fsdp",
                                     resume=root / "fsdp" / "checkpoint-2")
    report["fsdp_from_ddp"] = _train(model, data, root / "fsdp_from_ddp", sharding="fsdp",
                                     resume=root / "ddp" / "checkpoint-2")
    if os.environ.get("RANK") == "0":
        (root / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
