"""HFRollout: sampling with the policy model itself, token by token, in this process.

The N prompts are prefilled once (each image encoded once) and the cache is repeated G times
(keys and values, and the convolution and recurrent states of linear-attention layers:
gpg_vlm.models.cache), so the B = N*G completions of a step share their prompts' work. A model
whose cache holds a layer type that module cannot repeat prefills each prompt G times instead. Each step scores the
next token with `gpg_vlm.models.forward.policy_scores` (the distribution the training forward
uses) and reports the log-prob of the sampled token under it; top-k / top-p and
`min_new_tokens` shape what is sampled, never the reported log-probs. Positions (M-RoPE) come
from the adapter and are passed explicitly, so no cached model state is used.

Shape letters: N prompts, G completions per prompt, B = N*G completions, L prompt tokens,
T completion tokens, V vocabulary.

Deliberately left out: beam search, stop strings, and any batching across steps (the trainer
calls `generate` once per batch of prompts).
"""

from __future__ import annotations

import torch

from gpg_vlm.models import cache as cache_ops
from gpg_vlm.models.adapter import AdapterError, VLMAdapter
from gpg_vlm.models.batch import PromptBatch, Rollout
from gpg_vlm.models.forward import cache_kwargs, output_cache, policy_scores


class HFRollout:
    """The rollout engine that shares the adapter's model (weights are never copied)."""

    def __init__(self, adapter: VLMAdapter):
        self.adapter = adapter

    @torch.no_grad()
    def generate(self, batch: PromptBatch, group_size: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, min_new_tokens: int = 0) -> Rollout:
        """Sample `group_size` completions for each prompt of `batch` (rows of a prompt contiguous).

        `temperature <= 0` samples greedily. `min_new_tokens` forbids the EOS tokens for that
        many first tokens (with `max_new_tokens` equal to it, every completion has exactly that
        length: the benchmark uses it to make generation work equal).
        """
        if group_size < 1:
            raise AdapterError(f"group_size must be >= 1, got {group_size}")
        if max_new_tokens < 1:
            raise AdapterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        adapter, model = self.adapter, self.adapter.model
        device = adapter.device
        n_prompts = batch.num_prompts
        b = n_prompts * group_size
        cache, logits, attn, next_pos = self._prefill(batch, group_size)
        suppressed = adapter.suppressed.to(device)
        eos = torch.tensor(adapter.eos_token_ids, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, alive = [], [], []
        for step in range(max_new_tokens):
            scores = policy_scores(logits, temperature, suppressed)  # (B, V)
            logp = torch.log_softmax(scores, dim=-1)
            if step < min_new_tokens:
                scores = scores.index_fill(-1, eos, float("-inf"))
            if temperature <= 0:
                token = scores.argmax(-1)
            else:
                probs = torch.softmax(_filter_top_k_top_p(scores, top_k, top_p), dim=-1)
                token = _sample(probs, generator)  # (B,)
            token = torch.where(finished, torch.full_like(token, adapter.pad_token_id), token)
            alive.append(~finished)
            tokens.append(token)
            logps.append(logp.gather(-1, token[:, None]).squeeze(-1))
            finished = finished | torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones((b, 1))], dim=-1)
            step_pos = (next_pos + step).view(1, b, 1).expand(3, b, 1)
            out = model(input_ids=token[:, None], attention_mask=attn, position_ids=step_pos,
                        use_cache=True, **cache_kwargs(model, cache))
            cache = output_cache(out)
            logits = out.logits[:, -1]
        completion_ids = torch.stack(tokens, dim=1).cpu()  # (B, T)
        mask = torch.stack(alive, dim=1).long().cpu()  # (B, T)
        logprobs = (torch.stack(logps, dim=1).float().cpu() * mask)  # (B, T)
        truncated = ~finished.cpu()
        texts = adapter.decode(completion_ids, mask)
        prompt_index = torch.arange(n_prompts).repeat_interleave(group_size)
        return Rollout(prompt_index, completion_ids, mask, logprobs, texts, truncated)

    def _prefill(self, batch: PromptBatch, group_size: int):
        """Run the prompts once; (cache, last logits (B, V), mask (B, L), next position (B,)),
        everything repeated G times."""
        adapter, model = self.adapter, self.adapter.model
        device = adapter.device
        repeat = group_size
        if not adapter.cache_indexable:  # a cache we cannot repeat: prefill each prompt G times
            batch = batch.select([i for i in range(batch.num_prompts) for _ in range(group_size)])
            repeat = 1
        input_ids = batch.input_ids.to(device)
        attn = batch.attention_mask.to(device)
        mm = batch.mm_token_type_ids.to(device)
        grid = batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None
        pos = adapter.positions(input_ids, attn, mm, grid)  # (3, N, L)
        out = model.model(
            input_ids=input_ids, attention_mask=attn, position_ids=pos,
            pixel_values=batch.pixel_values.to(device, model.dtype) if grid is not None else None,
            image_grid_thw=grid, mm_token_type_ids=mm, use_cache=True)
        cache = output_cache(out)
        if repeat > 1:  # keys/values and linear-attention states, row i -> rows i*G .. i*G+G-1
            cache_ops.repeat(cache, repeat)
        # the output layer on a contiguous (N, H) matrix: the model's own `logits_to_keep=1`
        # slice is a strided 3-D view, which torch multiplies through a batched path that
        # first copies the whole (H, V) output weight (seconds per call at V = 151,936 on CPU)
        last = out.last_hidden_state[:, -1].contiguous()  # (N, H)
        logits = model.lm_head(last).repeat_interleave(repeat, 0)  # (B, V)
        attn = attn.repeat_interleave(repeat, 0)  # (B, L)
        next_pos = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(repeat, 0)  # (B,)
        return cache, logits, attn, next_pos

    def sync_weights(self, model) -> None:
        """Nothing to do: this engine samples with the policy model itself."""

    def close(self) -> None:
        """Nothing to release: the model belongs to the adapter."""


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf what top-k and top-p (nucleus) exclude. (B, V) -> (B, V)"""
    if top_k and top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (B, V) -> (B,), drawn where `generator` lives.

    The trainer's generator is a CPU one (its state is checkpointed the same on every machine);
    torch.multinomial refuses a CPU generator for CUDA probabilities, so those rows are drawn
    on the CPU: one (B, V) copy per step, and the same seed samples the same tokens on either.
    """
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
