"""The policy's token scores and the training forward.

`policy_scores` is the one definition of the distribution the policy samples from and is
trained on: logits in fp32, divided by the temperature, with the suppressed ids (vision tokens
and ids the tokenizer cannot produce) at -inf. The rollout engine samples from it and
`TokenScorer` takes its log-softmax, so sampled and trained log-probs are the same
distribution.

`TokenScorer` is the training forward as a torch module (so a data-parallel wrapper sees every
call): it encodes each image once per micro-batch and hands the features to every completion
of its prompt. Positions are computed by the adapter and passed in, never read from cached
model state.

`token_logprobs` turns the final hidden states into those log-probs without ever holding the
full-vocabulary logits of every completion token (64 completions x 700 tokens x 151,936 x 4
bytes would be 27 GB): only unmasked positions are projected, `chunk_tokens` at a time, each
chunk under activation checkpointing so that the backward recomputes one chunk at a time.

Shape letters: p prompts and b completions of one micro-batch, L prompt tokens, T completion
tokens, H hidden width, V vocabulary.

Deliberately left out: sampling (gpg_vlm.rollout) and loading (gpg_vlm.models.adapter).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.utils.checkpoint

from gpg_vlm.models import cache as cache_ops


def policy_scores(logits: torch.Tensor, temperature: float, suppressed: torch.Tensor) -> torch.Tensor:
    """Tempered logits in fp32 with the suppressed ids at -inf. (..., V) -> (..., V)

    `temperature <= 0` (greedy) leaves the logits untempered.
    """
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
    return scores.masked_fill(suppressed.to(scores.device), float("-inf"))


@functools.lru_cache(maxsize=None)
def _cache_keyword(module_type: type) -> str:
    params = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: torch.nn.Module, cache) -> dict:
    """`{keyword: cache}` for a transformers forward: `cache` where the model takes it (transformers
    >= 5.24, which deprecates `past_key_values` and drops it in 5.40), `past_key_values` before."""
    return {_cache_keyword(type(module)): cache}


def output_cache(out):
    """The KV cache a transformers forward returned, under whichever name its version uses."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


LOGPROB_CHUNK_TOKENS = 1024
"""Completion tokens whose full-vocabulary logits exist at once (forward and backward): 1024 x
151,936 x 4 bytes = 0.6 GB per fp32 copy, against 27 GB for 64 completions x 700 tokens."""


def token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, temperature: float, suppressed: torch.Tensor,
                        chunk_tokens: int = LOGPROB_CHUNK_TOKENS, with_entropy: bool = False):
    """Log-probs (b, T) of the completion tokens, [and entropies (b, T)], 0 where masked.

    Only the unmasked positions get logits, `chunk_tokens` of them at a time; each chunk runs
    under activation checkpointing, so its (chunk, V) logits are freed after the forward and
    recomputed one chunk at a time in the backward: memory grows with `chunk_tokens`, not with
    b x T. `chunk_tokens <= 0` computes all positions in one piece (same values and gradients).
    """
    b, t, h = hidden.shape
    keep = completion_mask.reshape(-1).bool()  # (b*T,)
    where = keep.nonzero().squeeze(-1)  # (n,)
    states = hidden.reshape(b * t, h).index_select(0, where)  # (n, H)
    ids = completion_ids.reshape(b * t).index_select(0, where)  # (n,)
    size = chunk_tokens if chunk_tokens > 0 else max(1, len(where))
    pieces = []
    for start in range(0, len(where), size):
        args = (states[start:start + size], ids[start:start + size])
        if chunk_tokens > 0 and torch.is_grad_enabled() and states.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(
                _chunk_scores, lm_head, *args, temperature, suppressed, with_entropy,
                use_reentrant=False))
        else:
            pieces.append(_chunk_scores(lm_head, *args, temperature, suppressed, with_entropy))
    width = 2 if with_entropy else 1
    flat = (torch.cat(pieces) if pieces
            else hidden.new_zeros((0, width), dtype=torch.float32))  # (n, 1 or 2)
    out = flat.new_zeros((b * t, width)).index_copy(0, where, flat).view(b, t, width)
    return (out[..., 0], out[..., 1]) if with_entropy else out[..., 0]


def _chunk_scores(lm_head, states, ids, temperature: float, suppressed: torch.Tensor,
                  with_entropy: bool) -> torch.Tensor:
    """(n, H) hidden states -> (n, 1) log-probs of `ids`, or (n, 2) with the entropies."""
    all_logp = torch.log_softmax(policy_scores(lm_head(states), temperature, suppressed), dim=-1)  # (n, V)
    logp = all_logp.gather(-1, ids.unsqueeze(-1))  # (n, 1)
    if not with_entropy:
        return logp
    finite = all_logp.masked_fill(suppressed.to(all_logp.device), 0.0)  # no 0 * -inf
    entropy = -(finite.exp() * finite).sum(-1, keepdim=True)  # (n, 1); suppressed add 1 * 0
    return torch.cat([logp, entropy], dim=-1)


class TokenScorer(torch.nn.Module):
    """The training forward as a module, so a data-parallel wrapper sees every call.

    Shared prefix (the default): the p prompts of the micro-batch go through the model once,
    with gradients, their KV cache is indexed out to the b completion rows (`rows`), and only
    the completion tokens run on top of it; gradients from all G completions flow back into
    their prompt's one pass. With gradient checkpointing (which cannot keep a cache) each row
    runs prompt + completion in full, with each image still encoded once (`row_images`); so
    does a model whose cache holds a layer type gpg_vlm.models.cache cannot index (`path()`
    says which one runs; the trainer records it).
    Returns the log-probs (b, T) of the completion tokens under the tempered,
    vision-token-masked distribution; 0 where `completion_mask` is 0.
    """

    def __init__(self, model, suppressed: torch.Tensor, chunk_tokens: int = LOGPROB_CHUNK_TOKENS):
        super().__init__()
        self.model = model
        self.suppressed = suppressed  # (V,) bool, not a parameter
        self.chunk_tokens = chunk_tokens  # output-layer positions whose logits exist at once
        self.cache_indexable = cache_ops.model_cache_indexable(model)

    def path(self) -> str:
        """The forward the next call runs: "shared_prefix" or "full_rows"."""
        if self.cache_indexable and not _activation_checkpointing(self.model):
            return "shared_prefix"
        return "full_rows"

    def forward(self, prompt_ids, prompt_mask, prompt_positions, prompt_mm, pixel_values,
                image_grid_thw, rows, row_images, completion_ids, completion_mask,
                temperature: float, with_entropy: bool = False):
        b, t = completion_ids.shape
        # completion tokens are text: their positions continue from the prompt's largest one
        next_pos = prompt_positions.amax(dim=(0, 2)) + 1  # (p,)
        steps = torch.arange(t, device=completion_ids.device)
        completion_pos = (next_pos[rows, None] + steps).unsqueeze(0).expand(3, -1, -1)  # (3, b, T)
        mask = torch.cat([prompt_mask[rows], completion_mask.long()], dim=1)  # (b, L+T)
        if self.path() == "full_rows":
            hidden = self._full_rows(prompt_ids, prompt_positions, prompt_mm, pixel_values,
                                     image_grid_thw, rows, row_images, completion_ids, mask,
                                     completion_pos)
        else:
            hidden = self._shared_prefix(prompt_ids, prompt_mask, prompt_positions, prompt_mm,
                                         pixel_values, image_grid_thw, rows, completion_ids, mask,
                                         completion_pos)  # (b, T, H)
        return token_logprobs(hidden, self.model.lm_head, completion_ids, completion_mask,
                              temperature, self.suppressed, self.chunk_tokens, with_entropy)

    def _shared_prefix(self, prompt_ids, prompt_mask, prompt_positions, prompt_mm, pixel_values,
                       image_grid_thw, rows, completion_ids, mask, completion_pos):
        """Hidden states (b, T, H) that predict each completion token, prompts run once."""
        out = self.model.model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            mm_token_type_ids=prompt_mm, use_cache=True)
        last = out.last_hidden_state[rows, -1:]  # (b, 1, H): predicts completion token 0
        cache = output_cache(out)
        # each row continues from its own prompt's keys/values and linear-attention states; with
        # gradients, the selected recurrent states must not be overwritten in place
        cache_ops.select(cache, rows, for_backward=torch.is_grad_enabled())
        # the continuation runs even for one-token completions (its output then unused): under
        # FSDP2 every forward gathers each layer, so every process must run as many forwards
        t = completion_ids.shape[1]
        fed = max(t - 1, 1)
        rest = self.model.model(
            input_ids=completion_ids[:, :fed], attention_mask=mask[:, :mask.shape[1] - t + fed],
            position_ids=completion_pos[:, :, :fed], use_cache=True,
            **cache_kwargs(self.model.model, cache),
        ).last_hidden_state[:, :t - 1]  # (b, T-1, H): token j predicts token j+1
        return torch.cat([last, rest], dim=1)

    def _full_rows(self, prompt_ids, prompt_positions, prompt_mm, pixel_values, image_grid_thw,
                   rows, row_images, completion_ids, mask, completion_pos):
        """Hidden states (b, T, H), each row running prompt + completion in full."""
        encoder_outputs = row_grid = None
        if image_grid_thw is not None:
            features = self.model.model.get_image_features(pixel_values, image_grid_thw,
                                                           return_dict=True)
            encoder_outputs = {"image": _reindex_features(features, row_images)}
            row_grid = image_grid_thw[row_images]
        prompt_len = prompt_ids.shape[1]
        hidden = self.model.model(
            input_ids=torch.cat([prompt_ids[rows], completion_ids], dim=1), attention_mask=mask,
            position_ids=torch.cat([prompt_positions[:, rows], completion_pos], dim=2),
            image_grid_thw=row_grid,
            mm_token_type_ids=torch.cat([prompt_mm[rows], torch.zeros_like(completion_ids)], dim=1),
            mm_encoder_outputs=encoder_outputs, use_cache=False,
        ).last_hidden_state  # (b, L+T, H)
        t = completion_ids.shape[1]
        return hidden[:, prompt_len - 1: prompt_len - 1 + t]  # token L-1+j predicts token j


def _activation_checkpointing(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is not None:
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _reindex_features(features, order: list[int]):
    """The vision encoder output with its per-image tuples re-ordered/repeated by `order`."""
    pooled = features.pooler_output
    features.pooler_output = tuple(pooled[i] for i in order)
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:  # Qwen3-VL feeds per-layer vision features into the decoder
        features.deepstack_features = [tuple(layer[i] for i in order) for layer in deepstack]
    return features
