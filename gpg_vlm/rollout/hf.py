"""HFRollout: sampling with the policy model itself, token by token, in this process.

The N prompts are prefilled once (each image encoded once) and the cache is repeated G times
(keys and values, and the convolution and recurrent states of linear-attention layers:
gpg_vlm.models.cache), so the B = N*G completions of a step share their prompts' work. A model
whose cache holds a layer type that module cannot repeat prefills each prompt G times instead.
Each step scores the next token with `gpg_vlm.models.forward.policy_scores` (the distribution
the training forward uses) and reports the log-prob of the sampled token under it; top-k /
top-p and `min_new_tokens` shape what is sampled, never the reported log-probs. Positions
(M-RoPE) come from the adapter and are passed explicitly, so no cached model state is used.

Decoding copies nothing per token: the keys and values go into cache buffers reserved for the
prompt plus `max_new_tokens` (`cache.reserve`) and the attention mask is built once at its full
width and sliced. Completions that finished leave the decoding batch (their cache rows, logits,
positions and mask rows are dropped, `COMPACT_SHARE`) and their outputs stay where they were
written. Sampling draws one uniform per completion per step for all B completions, finished or
not, so the tokens a seed gives do not depend on when rows were dropped.

Shape letters: N prompts, G completions per prompt, B = N*G completions, b completions still
decoding, L prompt tokens, T completion tokens, V vocabulary.

Deliberately left out: beam search, stop strings, and any batching across steps (the trainer
calls `generate` once per batch of prompts).
"""

from __future__ import annotations

import torch

from gpg_vlm.models import cache as cache_ops
from gpg_vlm.models.adapter import AdapterError, VLMAdapter
from gpg_vlm.models.batch import PromptBatch, Rollout
from gpg_vlm.models.forward import cache_kwargs, output_cache, policy_scores


COMPACT_SHARE = 0.25
"""Finished completions leave the decoding batch once they are at least this share of its rows:
dropping them copies the cache rows that remain, so it is done in batches, not at every EOS."""


class HFRollout:
    """The rollout engine that shares the adapter's model (weights are never copied).

    `compact_share`: finished completions are dropped from the decoding batch once they make up
    this share of it (0: at every finish; above 1: never, every row decodes to the end).
    What is sampled does not depend on it (each row draws from its own uniform every step).
    """

    def __init__(self, adapter: VLMAdapter, compact_share: float = COMPACT_SHARE):
        self.adapter = adapter
        self.compact_share = compact_share

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
        cache, logits, attn, next_pos = self._prefill(batch, group_size, max_new_tokens)
        prompt_len = attn.shape[1] - (max_new_tokens - 1)
        # a cache of unknown layer types cannot drop rows: every row then decodes to the end
        share = self.compact_share if adapter.cache_indexable else float("inf")
        suppressed = adapter.suppressed.to(device)
        eos = torch.tensor(adapter.eos_token_ids, device=device)
        pad = adapter.pad_token_id
        tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)  # (B, T)
        logps = torch.zeros((b, max_new_tokens), device=device)  # (B, T)
        alive = torch.zeros((b, max_new_tokens), dtype=torch.bool, device=device)  # (B, T)
        done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,) the row has ended
        rows = torch.arange(b, device=device)  # (b,) the completion each decoding row is
        for step in range(max_new_tokens):
            scores = policy_scores(logits, temperature, suppressed)  # (b, V)
            logp = torch.log_softmax(scores, dim=-1)
            if step < min_new_tokens:
                scores = scores.index_fill(-1, eos, float("-inf"))
            if temperature <= 0:
                token = scores.argmax(-1)
            else:  # one uniform per completion of the batch, whether it is still decoding or not
                u = _uniforms(b, generator, device)[rows]  # (b,)
                token = _sample(torch.softmax(_filter_top_k_top_p(scores, top_k, top_p), dim=-1), u)
            ended = done[rows]  # (b,)
            token = torch.where(ended, torch.full_like(token, pad), token)
            tokens[rows, step] = token
            alive[rows, step] = ~ended
            logps[rows, step] = logp.gather(-1, token[:, None]).squeeze(-1)
            ended = ended | torch.isin(token, eos)
            done[rows] = ended
            n_ended = int(ended.sum())  # the step's one host sync
            if n_ended == len(rows) or step == max_new_tokens - 1:
                break
            if n_ended and n_ended >= share * len(rows):  # drop the finished rows
                keep = (~ended).nonzero().squeeze(-1)  # (b',)
                cache_ops.select(cache, keep)
                rows, token, attn, next_pos = rows[keep], token[keep], attn[keep], next_pos[keep]
            step_pos = (next_pos + step).view(1, -1, 1).expand(3, -1, 1)  # (3, b, 1)
            out = model(input_ids=token[:, None], attention_mask=attn[:, :prompt_len + step + 1],
                        position_ids=step_pos, use_cache=True, **cache_kwargs(model, cache))
            cache = output_cache(out)
            logits = out.logits[:, -1]
        t = step + 1
        mask = alive[:, :t].long().cpu()  # (B, T)
        completion_ids = tokens[:, :t].cpu()  # (B, T)
        logprobs = torch.where(alive[:, :t], logps[:, :t], 0.0).float().cpu()  # (B, T)
        truncated = ~done.cpu()
        texts = adapter.decode(completion_ids, mask)
        prompt_index = torch.arange(n_prompts).repeat_interleave(group_size)
        return Rollout(prompt_index, completion_ids, mask, logprobs, texts, truncated)

    def _prefill(self, batch: PromptBatch, group_size: int, max_new_tokens: int):
        """Run the prompts once; (cache, last logits (B, V), mask (B, L + T - 1), next position
        (B,)), everything repeated G times; the cache and the mask have room for the T - 1
        completion tokens decoding feeds back (the mask is 1 there: every fed token is attended)."""
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
        if adapter.cache_indexable:
            cache_ops.reserve(cache, input_ids.shape[1] + max_new_tokens - 1)
        # the output layer on a contiguous (N, H) matrix: the model's own `logits_to_keep=1`
        # slice is a strided 3-D view, which torch multiplies through a batched path that
        # first copies the whole (H, V) output weight (seconds per call at V = 151,936 on CPU)
        last = out.last_hidden_state[:, -1].contiguous()  # (N, H)
        logits = model.lm_head(last).repeat_interleave(repeat, 0)  # (B, V)
        attn = attn.repeat_interleave(repeat, 0)  # (B, L)
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], max_new_tokens - 1))], dim=1)
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


def _uniforms(b: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """b uniforms in [0, 1) in float64 (53 random bits), drawn where `generator` lives (the
    trainer's is a CPU one, its state checkpointed the same on every machine) and moved to
    `device`: the same seed samples the same tokens on either, and only b numbers travel."""
    where = generator.device if generator is not None else device
    return torch.rand(b, generator=generator, device=where, dtype=torch.float64).to(device)


def _sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (b, V) by inverse transform of the uniforms `u` (b,) -> (b,).

    Row r takes the first token whose cumulative probability exceeds u_r times the row's total:
    token i is chosen with probability p_i / sum(p) up to float64 rounding, a zero-probability
    token never (its cumulative value equals the one before it). One uniform per row instead of
    torch.multinomial's V exponentials per row (0.5 s per step for 64 rows at V = 151,936 on
    one CPU core).
    """
    cdf = probs.double().cumsum(-1)  # (b, V), non-decreasing
    total = cdf[:, -1:].contiguous()  # (b, 1)
    token = torch.searchsorted(cdf, u[:, None] * total, right=True)  # (b, 1)
    # where rounding puts u * total at the total itself: the last token that adds probability
    last = torch.searchsorted(cdf, total, right=False)  # (b, 1)
    return torch.minimum(token, last).squeeze(-1)
