"""Steps 1-3 of a training step: draw prompts, sample G completions each, score, apply beta_th.

`Sampler.collect()` returns a `Collected`: this process's N / world_size groups, informative
ones first, with every reward's values. The prompt order (`PromptStream`) is identical on every
process; the sampling generator is per process. Deliberately left out: advantages, losses and
the update (gpg_vlm.train), and the sampling loop itself (the rollout engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gpg_vlm import algo
from gpg_vlm.models.batch import PromptBatch, Rollout
from gpg_vlm.config import ConfigError, TrainConfig
from gpg_vlm.dist import Processes
from gpg_vlm.rewards import (RewardError, accuracy_reward, call_reward, resolve_reward,
                             take_over_budget)
from gpg_vlm.tasks import reward_columns, row_category, samples_of


class TrainingError(RuntimeError):
    """The run cannot go on (a reward failed, too many non-finite steps); the message says why."""


class PromptStream:
    """Prompt indices in a fresh seeded permutation each epoch; identical on every process."""

    def __init__(self, n_rows: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n_rows, self.seed, self.epoch, self.cursor = n_rows, seed, epoch, cursor
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n_rows, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor >= self.n_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            k = min(n - len(out), self.n_rows - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + k])
            self.cursor += k
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


@dataclass
class Collected:
    """Steps 1-3 on one process: the groups kept for training."""

    rows: list                       # (N_local,) dataset rows, one per prompt
    batch: PromptBatch               # their encoded prompts
    rollout: Rollout                 # (N_local * G,) completions, the G of one prompt contiguous
    scores: dict[str, torch.Tensor]  # reward name -> (N_local * G,) float64; 'total', 'accuracy'
    tries: int                       # extra prompt draws that beta_th asked for
    reward_seconds: float = 0.0      # time spent in the reward functions


class Sampler:
    """Draws this process's prompts from `rows` and turns them into scored groups."""

    def __init__(self, cfg: TrainConfig, adapter, engine, procs: Processes, rows: list, rewards: dict):
        self.cfg, self.adapter, self.engine, self.procs, self.rows = cfg, adapter, engine, procs, rows
        self.n_local = cfg.prompts_per_step // procs.world
        self.rewards = rewards  # name -> function (resolve_rewards)
        self.stream = PromptStream(len(rows), cfg.seed)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + procs.index)

    def samples(self, rows):
        return samples_of(rows, self.cfg.prompt_template)

    def collect(self, gathered_parameters) -> Collected:
        """Sample and score until beta_th is met (or the tries run out); keep N / world_size groups.

        `gathered_parameters()` is entered around generation (sharded weights made whole)."""
        cfg, G = self.cfg, self.cfg.group_size
        chunks, tries, reward_seconds = [], 0, 0.0
        while True:
            rows = [self.rows[i] for i in self.stream.take(self.n_local)]
            batch = self.adapter.encode(self.samples(rows))
            with gathered_parameters():
                rollout = self.engine.generate(batch, G, max_new_tokens=cfg.max_new_tokens,
                                               temperature=cfg.temperature, top_p=cfg.top_p,
                                               top_k=cfg.top_k, generator=self.generator)
            t = time.perf_counter()
            columns = reward_columns(rows, batch, rollout.prompt_index.tolist(), self.adapter.box_format)
            scores = score_completions(self.rewards, cfg.rewards, rollout.texts, columns)
            reward_seconds += time.perf_counter() - t
            chunks.append(Collected(rows, batch, rollout, scores, tries))
            informative = self.procs.sum(
                sum(int(algo.informative_groups(c.scores["total"], G).sum()) for c in chunks))
            if informative >= cfg.beta_th * cfg.prompts_per_step or tries >= cfg.max_resample_tries:
                break
            tries += 1
        rows = [r for c in chunks for r in c.rows]
        batch = PromptBatch.concat([c.batch for c in chunks], self.adapter.pad_token_id)
        rollout = Rollout.concat([c.rollout for c in chunks], self.adapter.pad_token_id)
        scores = {k: torch.cat([c.scores[k] for c in chunks]) for k in chunks[0].scores}
        keep = algo.select_groups(scores["total"], G, self.n_local)  # (N_local,) informative first
        keep_rows = algo.group_rows(keep, G)  # (N_local * G,)
        return Collected(rows=[rows[i] for i in keep.tolist()], batch=batch.select(keep.tolist()),
                         rollout=rollout.select(keep_rows, torch.arange(self.n_local).repeat_interleave(G)),
                         scores={k: v[keep_rows] for k, v in scores.items()}, tries=tries,
                         reward_seconds=reward_seconds)


def resolve_rewards(cfg: TrainConfig) -> dict:
    """Reward name -> function; user reward code is imported here, and only when named."""
    try:
        return {name: resolve_reward(name, answer_only=cfg.answer_only) if name == "format"
                else resolve_reward(name) for name in cfg.rewards}
    except ValueError as exc:
        raise ConfigError(f"config key 'rewards': {exc}") from None


def score_completions(rewards: dict, weights: dict, texts: list[str], columns: dict) -> dict:
    """Step 2: each reward's values (B,) by name, their weighted sum 'total', and 'accuracy'."""
    scores, total = {}, torch.zeros(len(texts), dtype=torch.float64)
    for name, fn in rewards.items():
        try:  # exactly B finite numbers, or one line naming the reward
            values = torch.tensor(call_reward(name, fn, texts, columns), dtype=torch.float64)
        except RewardError as exc:
            raise TrainingError(str(exc)) from exc
        scores[name] = values
        total += weights[name] * values
    scores["total"] = total
    scores["accuracy"] = torch.tensor(accuracy_reward(texts, **columns), dtype=torch.float64)
    return scores


def rollout_metrics(step: int, cfg: TrainConfig, got: Collected, informative: int, alpha: float) -> dict:
    """The step's record before the update: rewards, informative groups, lengths, per-task accuracy."""
    lengths = got.rollout.completion_mask.sum(-1).float()
    m = {
        "step": step,
        "reward": float(got.scores["total"].mean()),
        "informative_fraction": informative / cfg.prompts_per_step,
        "alpha": float(alpha),
        "resample_tries": got.tries,
        "completion_length_mean": float(lengths.mean()),
        "completion_length_max": int(lengths.max()),
        "truncated_fraction": float(got.rollout.truncated.float().mean()),
    }
    for name in cfg.rewards:
        m[f"reward/{name}"] = float(got.scores[name].mean())
    # symbolic checks stopped at their time or memory budget (scored 0), this process
    m["reward/over_budget"] = sum(take_over_budget().values())
    tasks = [row_category(got.rows[i]) for i in got.rollout.prompt_index.tolist()]
    for task in sorted(set(tasks)):
        sel = torch.tensor([t == task for t in tasks])
        m[f"accuracy/{task}"] = float(got.scores["accuracy"][sel].mean())
    return m
