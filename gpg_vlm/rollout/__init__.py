"""Rollout engines: whatever samples the G completions per prompt that a training step scores.

An engine implements `RolloutEngine` (below); the trainer builds one with `make_engine` at
set-up, calls `generate` once per batch of prompts and `sync_weights` after every optimizer
step. `hf` (gpg_vlm.rollout.hf) samples with the policy model itself in this process; `vllm`
(gpg_vlm.rollout.vllm) with a vLLM engine colocated in this process (options: its model_dir,
seed and GPU settings).

Contract every engine keeps: the log-probs it reports are those of
`gpg_vlm.models.forward.policy_scores` (temperature applied, suppressed ids masked) at the
sampled tokens, 0 where the completion mask is 0, so the training forward recomputes the
same numbers.

Deliberately left out: engines that need packages the project does not require (a vLLM
engine imports vllm only when it is asked for).
"""

from __future__ import annotations

from typing import Protocol

import torch

from gpg_vlm.models.batch import PromptBatch, Rollout
from gpg_vlm.rollout.hf import HFRollout


class RolloutSetupError(ValueError):
    """An engine cannot be built for this model or these settings; one line says what to change."""


class RolloutError(RuntimeError):
    """An engine failed while sampling or loading weights; the trainer stops, the last step saved."""


class RolloutEngine(Protocol):
    def generate(self, batch: PromptBatch, group_size: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, min_new_tokens: int = 0) -> Rollout:
        """G completions per prompt of `batch` (rows of one prompt contiguous), with the sampled
        log-probs after temperature and masking (Rollout.logprobs, 0 where masked)."""

    def sync_weights(self, model) -> None:
        """Called by the trainer after every optimizer step with the (unwrapped) policy model;
        the HF loop shares the model and does nothing; vLLM loads the weights and resets caches."""

    def close(self) -> None:
        """Release what the engine holds (processes, memory); the engine is not used after."""


ENGINES = ("hf", "vllm")


def make_engine(name: str, adapter, **options) -> RolloutEngine:
    """The rollout engine `name` for the policy of `adapter` (a VLMAdapter)."""
    if name == "hf":
        if options:
            raise ValueError(f"rollout engine 'hf' takes no options, got {', '.join(sorted(options))}")
        return HFRollout(adapter)
    if name == "vllm":
        from gpg_vlm.rollout.vllm import VLLMRollout  # vllm is imported only here

        return VLLMRollout(adapter, **options)
    raise ValueError(f"unknown rollout engine {name!r}; valid: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "HFRollout", "RolloutEngine", "RolloutError", "RolloutSetupError", "make_engine"]
