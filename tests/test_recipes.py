"""The paper's recipes parse into TrainConfig and run one real training step on a tiny model.

Each recipe keeps all of its own keys except those a CPU test cannot afford (sizes, dtype);
the data are Fashion-MNIST rows of the recipe's task, so its rewards see the right columns.
"""

from pathlib import Path

import pytest
import torch
import yaml

from gpg_vlm.config import TrainConfig

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = {  # recipe -> (Fashion-MNIST task with the same reward, tiny model family)
    "qwen2vl2b_sat_cvbench.yaml": ("spatial", "qwen2_vl"),  # multiple choice reasoning
    "qwen2vl2b_lisa_grounding.yaml": ("grounding", "qwen2_vl"),
    "qwen2vl2b_fewshot_classification.yaml": ("classification", "qwen2_vl"),
    "qwen25vl3b_geoqa.yaml": ("counting", "qwen2_5_vl"),  # numeric answers
    "qwen35_sat_cvbench.yaml": ("spatial", "qwen3_5"),  # the hybrid linear-attention decoder
}
CPU_SIZED = dict(dtype="float32", max_steps=1, prompts_per_step=2, group_size=2,
                 max_new_tokens=4, max_resample_tries=0, eval_data=None, tensorboard=False)


@pytest.fixture(scope="module")
def fm_rows(tmp_path_factory):
    from gpg_vlm.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("fm_recipes")
    assert prepare(["fashion-mnist", "--out", str(out), "--train-size", "4", "--test-size", "1",
                    "--tasks", "spatial", "grounding", "classification", "counting"]) == 0
    return out


def test_every_recipe_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_keeps_the_paper_settings(name):
    cfg = TrainConfig.from_yaml(CONFIGS / name)
    assert (cfg.algorithm, cfg.scale_by_std, cfg.group_size) == ("gpg", False, 8)
    assert cfg.learning_rate == 1e-6 and cfg.beta_th == 0.4 and cfg.temperature == 1.0
    assert cfg.max_pixels == 401408 and cfg.dtype == "bfloat16"
    assert cfg.model.startswith("/path/to/") and cfg.data.startswith("/path/to/")
    placeholders = {k for k, v in yaml.safe_load((CONFIGS / name).read_text()).items()
                    if isinstance(v, str) and v.startswith("/path/to/")}
    assert placeholders == {"model", "data", "eval_data"}  # the only things to fill in


# A random model's 4-token completions are never correct, so the recipe's own rewards alone
# would leave every group uninformative and the step would make no update. This planted reward
# alternates within each group (G = 2) and outweighs the recipe's (at most 2 in total), so the
# one step must update, and the recipe's rewards are still computed on its task's columns.
SIGNAL = {"rewards_for_tests:alternating_reward": 10.0}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_one_step_on_cpu(name, tiny_dirs, fm_rows, tmp_path):
    from gpg_vlm.train import Trainer

    task, family = RECIPES[name]
    cfg = TrainConfig.from_yaml(CONFIGS / name)
    cfg = cfg.replace(model=str(tiny_dirs(family)), data=str(fm_rows / f"{task}_train.jsonl"),
                      output_dir=str(tmp_path / "run"), rewards={**cfg.rewards, **SIGNAL}, **CPU_SIZED)
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    (step,) = [h for h in history if "loss" in h]
    assert step["informative_fraction"] == 1.0 and step["updated"] is True, step
    assert torch.isfinite(torch.tensor(step["loss"])) and step["loss"] != 0.0
    for reward in cfg.rewards:  # the recipe's rewards ran on the task's columns
        assert f"reward/{reward}" in step
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))
