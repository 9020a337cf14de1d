"""The GPG core: group advantages, the gradient-bias correction alpha, and the policy losses.

Pure functions over tensors (torch only). No config objects, no `.item()`, no logging, no
`torch.distributed`: counts that span data-parallel ranks or micro-batches come in as
arguments, so every function here can be tested with plain tensors on CPU.

Shape letters, used in every docstring and shape comment:
    N  prompts (groups) in the batch
    G  completions per prompt (the group size); the G rows of one group are contiguous
    B  = N * G completions
    T  tokens per completion row (padded; `mask` marks the real tokens)

How this maps to GPG (Chu et al., arXiv 2504.02546, Section 3):
- Advantage: `A_i = (r_i - mean(group)) / F_norm` with `F_norm = 1` (the GPG default) or
  `F_norm = std(group) + eps` (`scale_by_std=True`) -> `group_advantages`.
- Accurate gradient estimation: the paper multiplies the advantage by `alpha = B / (B - M)`
  (B groups, M of them with all-equal rewards). The loss is linear in the advantage, so here
  alpha multiplies the loss instead (`gpg_alpha`, `gpg_loss(alpha=...)`): same gradient.
- Objective: `-A_i * log pi(o_i,t | q, o_i,<t)`. The paper's equation normalises by the total
  number of tokens of the batch, as its text code does (`token_mean=True`); its multimodal code
  averages over each completion's tokens first and then over completions (`token_mean=False`,
  the default here, since this project trains VLMs).
- Threshold beta_th (resample until enough groups are informative): the sampling loop belongs
  to the trainer; `informative_groups`, `select_groups` and `group_rows` are its pure parts.

Where this differs from the paper, deliberately:
- Groups whose rewards are all equal get an advantage of exactly zero (not `x - mean(x)`,
  which can be a rounding error away from zero), so they never contribute a gradient.
- With std scaling, `eps` is added to the std, as GRPO implementations do, so the division
  is safe; the std is the unbiased one (`torch.std`'s default, `correction=1`).
- `gpg_alpha` is 0 when no group is informative (the paper leaves B / 0 undefined); all
  advantages are zero then anyway, so the loss and its gradient are exactly zero.

Rollout mismatch (not in the paper): when completions are sampled by another engine (vLLM) whose
log-probs differ slightly from the training forward's, `truncated_is_weights` gives each token
the capped ratio `min(pi / mu, cap)` (truncated importance sampling, as TRL's and verl's
`vllm_importance_sampling_cap` / `tis_imp_ratio_cap` options do), passed to the losses as
`token_weights`. Off by default.

Deliberately left out of GPG: no critic (value model), no reference model, no importance
ratio, no clipping, no KL term. `grpo_loss` has those, for the GRPO / Dr.GRPO comparison only.

Normalisers (one recipe for both losses). The per-token term is summed per completion, then:
- `token_mean=False`: each completion's sum is divided by its own token count (or by
  `length_norm`, Dr.GRPO's constant), and the results are summed and divided by
  `num_completions` (default: B, the rows of this call).
- `token_mean=True`: all token terms are summed and divided by `num_tokens` (default: the
  real tokens of this call).
The result is a sum over the rows of this call divided by a normaliser, so it splits exactly:
- gradient accumulation (micro-batch losses summed): pass the count of the whole step;
- DDP over W ranks (gradients averaged): pass the count over all ranks divided by W;
- both: the count over all ranks and micro-batches of the step, divided by W.
"""

import torch

__all__ = [
    "group_advantages",
    "informative_groups",
    "gpg_alpha",
    "select_groups",
    "group_rows",
    "gpg_loss",
    "grpo_loss",
    "entropy_bonus",
    "kl_penalty",
    "truncated_is_weights",
]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards -> (N, G), checking that B is a multiple of G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(-1, group_size)  # (N, G)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups carry a learning signal: their rewards are not all equal.

    rewards: (B,) finite floats, G contiguous rows per group. Returns (N,) bool.
    """
    r = _grouped(rewards, group_size)  # (N, G)
    return r.amax(dim=1) != r.amin(dim=1)  # (N,)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_by_std: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantage `A_i = (r_i - mean(group)) / F_norm`.

    rewards: (B,), G contiguous rows per group. Returns (B,) in the rewards' float dtype.
    F_norm is 1 by default (GPG); with `scale_by_std` it is `std(group) + eps`, the unbiased
    std (`torch.std`'s default, dividing by G - 1) as GRPO uses. Groups whose rewards are all
    equal get exactly 0, whatever the rounding of their mean.
    """
    r = _grouped(rewards, group_size)  # (N, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (N, G)
    if scale_by_std and group_size > 1:  # a group of one is never informative: 0 below
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # (N, G)
    informative = (r.amax(dim=1) != r.amin(dim=1)).unsqueeze(1)  # (N, 1)
    adv = torch.where(informative, adv, torch.zeros_like(adv))  # (N, G)
    return adv.reshape(-1)  # (B,)


def gpg_alpha(num_groups, num_informative) -> torch.Tensor:
    """GPG's gradient-bias correction `alpha = num_groups / num_informative` (paper: B / (B - M)).

    Arguments are ints or 0-dim tensors (e.g. counts summed over data-parallel ranks); the
    result is a 0-dim tensor of the default float dtype (float32 unless changed: a relative
    error of 6e-8 at most; `gpg_loss` casts it to the loss dtype) on their device. When
    `num_informative` is 0 the result is 0, not a division by zero: every advantage is zero
    then, so the loss is zero either way.
    """
    # Stay on the device of whichever argument is a tensor: moving a count would sync.
    device = next(
        (x.device for x in (num_groups, num_informative) if isinstance(x, torch.Tensor)), None
    )
    dtype = torch.get_default_dtype()
    groups = torch.as_tensor(num_groups, device=device).to(dtype)
    informative = torch.as_tensor(num_informative, device=device).to(dtype)
    ratio = groups / informative.clamp(min=1)  # the clamp only matters where the where drops it
    return torch.where(informative > 0, ratio, torch.zeros_like(ratio))


def select_groups(rewards: torch.Tensor, group_size: int, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` groups to train on: informative groups first.

    rewards: (M * G,) for M >= num_keep candidate groups. Returns (num_keep,) long group
    indices; within the informative and the uninformative groups the order is kept (stable),
    so with enough informative candidates only informative groups are chosen.
    """
    informative = informative_groups(rewards, group_size)  # (M,)
    if not 0 <= num_keep <= informative.numel():
        raise ValueError(f"cannot keep {num_keep} of {informative.numel()} candidate groups")
    # Sort key 0 for informative, 1 for not; a stable sort keeps the order inside each class.
    order = torch.sort((~informative).to(torch.uint8), stable=True).indices  # (M,)
    return order[:num_keep]  # (num_keep,)


def group_rows(group_indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """Completion row indices of the given groups, group by group: (K,) -> (K * G,) long.

    Use it to gather anything laid out by completion (rewards, token ids, masks, lists).
    """
    offsets = torch.arange(group_size, device=group_indices.device)  # (G,)
    return (group_indices.long().unsqueeze(1) * group_size + offsets).reshape(-1)  # (K * G,)


def _aggregate(
    per_token: torch.Tensor,
    keep: torch.Tensor,
    token_mean: bool,
    length_norm,
    num_completions,
    num_tokens,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; see the module docstring for the rules.

    per_token must already be zero (not just multiplied by zero) wherever `keep` is False.
    """
    if token_mean:
        if length_norm is not None:
            raise ValueError("length_norm (Dr.GRPO) applies to the per-completion mean only")
        if num_tokens is None:
            num_tokens = keep.sum().clamp(min=1)
        return per_token.sum() / num_tokens
    row_sum = per_token.sum(dim=1)  # (B,)
    if length_norm is None:
        # An empty completion contributes 0 but still counts as a completion.
        row_mean = row_sum / keep.sum(dim=1).clamp(min=1)  # (B,)
    else:
        row_mean = row_sum / length_norm  # (B,)
    if num_completions is None:
        num_completions = per_token.shape[0]
    return row_mean.sum() / num_completions


def _check_shapes(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must both be (B, T), got {tuple(logprobs.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
        )


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with padding replaced by 0 *before* any arithmetic, so garbage (inf, NaN, 1e30)
    in padding can neither leak into the loss (0 * inf = NaN) nor into the gradient."""
    return torch.where(keep, x, torch.zeros_like(x))


def gpg_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    alpha=1.0,
    token_mean: bool = False,
    *,
    length_norm: float | None = None,
    num_completions=None,
    num_tokens=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPG policy-gradient loss `alpha * mean(-A_i * log pi(o_i,t))`. Returns a 0-dim tensor.

    logprobs: (B, T) log-probs of the completion tokens under the current policy.
    advantages: (B,) from `group_advantages` (no gradient flows into them).
    mask: (B, T) bool or 0/1 float; padding may hold any value in `logprobs`.
    alpha: float or 0-dim tensor, from `gpg_alpha`.
    token_mean: False = mean over each completion's tokens, then over completions (the
        paper's multimodal code); True = mean over all real tokens of the batch (its text code).
    length_norm: Dr.GRPO: divide each completion's token sum by this constant (e.g. the max
        completion length) instead of its own length; only with `token_mean=False`.
    num_completions, num_tokens: the normalisers (int, float or 0-dim tensor); None = this
        call's B rows / real tokens. See the module docstring for micro-batches and DDP.
    token_weights: (B, T) per-token factors without gradient (`truncated_is_weights`), or None.
    """
    _check_shapes(logprobs, advantages, mask)
    keep = mask.bool()  # (B, T)
    lp = _masked(logprobs, keep)  # (B, T)
    per_token = -advantages.detach().unsqueeze(1) * lp  # (B, T)
    if token_weights is not None:
        per_token = per_token * _masked(token_weights.detach(), keep)  # (B, T)
    per_token = _masked(per_token, keep)  # (B, T); a non-finite advantage of an empty row stays out
    loss = _aggregate(per_token, keep, token_mean, length_norm, num_completions, num_tokens)
    return loss * torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    token_mean: bool = False,
    *,
    num_completions=None,
    num_tokens=None,
) -> torch.Tensor:
    """`-coef * mean(H(pi(.|o_<t)))`: a term to add to a policy loss (0-dim tensor).

    Not part of GPG or GRPO; an optional regulariser (verl's `entropy_coeff`) that keeps the
    policy from turning deterministic while rewards still vary. entropy: (B, T) entropies of the
    next-token distributions at the completion positions; aggregated like the policy loss.
    """
    if entropy.dim() != 2 or mask.shape != entropy.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must be "
                         "equal (B, T)")
    keep = mask.bool()
    per_token = _masked(entropy, keep)
    return -coef * _aggregate(per_token, keep, token_mean, None, num_completions, num_tokens)


def _k3(lp: torch.Tensor, ref_logprobs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref), `exp(d) - d - 1` with `d = ref - lp`: (B, T)."""
    d = _masked(ref_logprobs.detach(), keep) - lp  # (B, T)
    return torch.exp(d) - d - 1.0


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    token_mean: bool = False,
    *,
    length_norm: float | None = None,
    num_completions=None,
    num_tokens=None,
) -> torch.Tensor:
    """`beta * mean(KL_k3(pi || ref))`, GRPO's KL term alone, to add to a GPG loss (0-dim).

    Not part of GPG (whose paper drops the reference model); an opt-in regulariser that keeps
    the policy near its starting point. Reduced like the policy loss.
    """
    if ref_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} and mask {tuple(mask.shape)} must be equal")
    keep = mask.bool()
    per_token = _masked(beta * _k3(_masked(logprobs, keep), ref_logprobs, keep), keep)
    return _aggregate(per_token, keep, token_mean, length_norm, num_completions, num_tokens)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    token_mean: bool = False,
    *,
    length_norm: float | None = None,
    num_completions=None,
    num_tokens=None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO (and Dr.GRPO) loss, for comparison runs. Returns a 0-dim tensor.

    Per token: `-min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + beta * KL`,
    `ratio = exp(logprobs - old_logprobs)`, KL the k3 estimate `exp(d) - d - 1` with
    `d = ref_logprobs - logprobs`. Reduced exactly as `gpg_loss` (same `token_mean`,
    `length_norm`, `num_completions`, `num_tokens`).

    logprobs: (B, T) current policy; old_logprobs: (B, T) sampling policy, or None for
    on-policy (ratio 1, gradient still flows through `logprobs`); ref_logprobs: (B, T)
    reference model, or None (no KL term, as when beta is 0); advantages: (B,); mask: (B, T).
    Dr.GRPO is `group_advantages(..., scale_by_std=False)` with `length_norm` set here.
    token_weights: (B, T) factors on the policy term (`truncated_is_weights`), or None.
    """
    _check_shapes(logprobs, advantages, mask)
    keep = mask.bool()  # (B, T)
    lp = _masked(logprobs, keep)  # (B, T)
    old = lp.detach() if old_logprobs is None else _masked(old_logprobs.detach(), keep)  # (B, T)
    adv = advantages.detach().unsqueeze(1)  # (B, 1)
    ratio = torch.exp(lp - old)  # (B, T)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if token_weights is not None:  # on the policy term only, as for GPG
        per_token = per_token * _masked(token_weights.detach(), keep)  # (B, T)
    if ref_logprobs is not None and beta != 0:
        per_token = per_token + beta * _k3(lp, ref_logprobs, keep)  # (B, T)
    per_token = _masked(per_token, keep)  # (B, T)
    return _aggregate(per_token, keep, token_mean, length_norm, num_completions, num_tokens)


def truncated_is_weights(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token truncated importance weights `min(pi(o_t) / mu(o_t), cap)`: (weights, clipped).

    logprobs: (B, T) log-probs of the completion tokens under the trained policy pi (the
    training forward; no gradient flows into the weights). rollout_logprobs: (B, T) the same
    tokens' log-probs as the rollout engine mu reported them. mask: (B, T). cap: > 0.
    Returns weights (B, T), 0 where masked, and clipped (B, T) bool, True where the cap applied.
    The mean weight and the clipped fraction over the real tokens are what a trainer logs.
    """
    if logprobs.shape != rollout_logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and mask {tuple(mask.shape)} must be equal")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    keep = mask.bool()  # (B, T)
    log_ratio = _masked(logprobs.detach() - rollout_logprobs.detach(), keep)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T); 1 on padding, which the mask drops below
    clipped = (ratio > cap) & keep  # (B, T)
    return _masked(ratio.clamp(max=cap), keep), clipped
