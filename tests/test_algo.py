"""The GPG core (`gpg_vlm.algo`): hand-derived numbers, closed-form gradients, invariances
(padding, micro-batch split, data-parallel rank split) and a loop reference on random batches.

Shape letters: N prompts, G per group, B = N * G completions, T tokens. Float64 throughout so
that 1e-12 tolerances mean something.
"""

import math
import random

import pytest
import torch

from gpg_vlm.algo import (
    truncated_is_weights,
    entropy_bonus,
    gpg_alpha,
    gpg_loss,
    group_advantages,
    kl_penalty,
    group_rows,
    grpo_loss,
    informative_groups,
    select_groups,
)
from reference_gpg import (
    ref_advantages,
    ref_alpha,
    ref_gpg_loss,
    ref_grpo_loss,
    ref_informative,
    ref_select_groups,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def random_batch(gen, B, T, dtype=F64):
    """Random (logprobs, mask) with 1..T real tokens per row, left-aligned."""
    logprobs = -torch.rand(B, T, generator=gen, dtype=dtype) * 5  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)  # (B,)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T) bool
    return logprobs, mask


# ---------------------------------------------------------------------------------------------
# Advantages, informative groups, alpha: by hand


def test_advantages_informative_alpha_by_hand():
    # G = 4, rewards [1,0,0,0 | 1,1,1,1].
    # Group 0: mean 1/4 -> advantages [3/4, -1/4, -1/4, -1/4].
    # Group 1: all equal -> advantages 0, not informative.
    # alpha = groups / informative groups = 2 / 1 = 2 (paper: B / (B - M), B = 2, M = 1).
    rewards = t([1, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, 4)
    torch.testing.assert_close(adv, t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]), **TOL)
    flags = informative_groups(rewards, 4)
    assert flags.tolist() == [True, False]
    alpha = gpg_alpha(2, int(flags.sum()))
    assert alpha.dim() == 0 and float(alpha) == 2.0


def test_std_scaled_advantages_by_hand_use_unbiased_std():
    # Group [1,0,0,0]: deviations [.75,-.25,-.25,-.25], squares sum to .5625 + 3 * .0625 = .75.
    #   Unbiased variance .75 / (4 - 1) = .25 -> std .5 -> advantages [1.5, -.5, -.5, -.5].
    #   (The biased std sqrt(.75 / 4) = .433 would give 1.732 for the first one.)
    # Group [0, 2]: deviations [-1, 1], unbiased variance 2 / 1 = 2 -> std sqrt(2).
    rewards = t([1, 0, 0, 0, 0, 2, 5, 5])  # the last group, G = 2 here, is split below
    adv = group_advantages(rewards[:4], 4, scale_by_std=True, eps=0.0)
    torch.testing.assert_close(adv, t([1.5, -0.5, -0.5, -0.5]), **TOL)
    adv = group_advantages(rewards[4:], 2, scale_by_std=True, eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, t([-s, s, 0, 0]), **TOL)
    # eps is added to the std: .75 / (.5 + 1e-4).
    adv = group_advantages(rewards[:4], 4, scale_by_std=True, eps=1e-4)
    torch.testing.assert_close(adv[0], t(0.75 / 0.5001), **TOL)


def test_all_equal_groups_get_exactly_zero_advantage():
    # 0.1 is not representable: a computed mean can miss it by a rounding error, and with std
    # scaling (std ~ 0) that error would be amplified by 1 / eps. Exactly 0 is required.
    for dtype in (torch.float32, F64):
        rewards = torch.full((12,), 0.1, dtype=dtype)
        for scale in (False, True):
            adv = group_advantages(rewards, 3, scale_by_std=scale)
            assert adv.dtype == dtype
            assert torch.equal(adv, torch.zeros_like(adv))


def test_group_size_one_is_never_informative():
    rewards = t([0.0, 1.0, 2.0])
    assert informative_groups(rewards, 1).tolist() == [False, False, False]
    assert torch.equal(group_advantages(rewards, 1, scale_by_std=True), torch.zeros(3, dtype=F64))


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([1, 0, 0, 0]), 4)
    assert adv.is_floating_point()
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_rewards_that_do_not_fill_groups_are_an_error():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(t([1, 0, 0]), 4)
    with pytest.raises(ValueError, match="1-D"):
        informative_groups(t([[1, 0]]), 2)


def test_alpha_from_tensors_and_with_no_informative_group():
    # Counts summed over ranks arrive as 0-dim tensors: 6 groups, 4 informative -> 1.5.
    alpha = gpg_alpha(torch.tensor(6), torch.tensor(4))
    assert alpha.dim() == 0 and alpha.is_floating_point() and float(alpha) == 1.5
    assert float(gpg_alpha(6, torch.tensor(3))) == 2.0
    # No informative group: 0, never inf / nan (all advantages are zero then anyway).
    for informative in (0, torch.tensor(0)):
        alpha = gpg_alpha(torch.tensor(8), informative)
        assert torch.isfinite(alpha) and float(alpha) == 0.0
    # All informative: no correction.
    assert float(gpg_alpha(5, 5)) == 1.0


# ---------------------------------------------------------------------------------------------
# gpg_loss: by hand and closed-form gradient


def hand_batch():
    # Two completions of unequal length, one padded column of garbage in row 1.
    #   row 0: log-probs [-1, -2], A = +0.5
    #   row 1: log-probs [-4],     A = -0.5
    logprobs = t([[-1.0, -2.0], [-4.0, 123.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = t([0.5, -0.5])
    return logprobs, advantages, mask


def test_gpg_loss_sequence_mean_by_hand():
    # Per completion, mean of -A * lp over its own tokens:
    #   row 0: -0.5 * (-1 + -2) / 2 = 0.75;   row 1: 0.5 * -4 / 1 = -2.
    # Mean over completions: (0.75 - 2) / 2 = -0.625; times alpha = 2 -> -1.25.
    logprobs, advantages, mask = hand_batch()
    torch.testing.assert_close(gpg_loss(logprobs, advantages, mask), t(-0.625), **TOL)
    torch.testing.assert_close(gpg_loss(logprobs, advantages, mask, alpha=2.0), t(-1.25), **TOL)
    torch.testing.assert_close(
        gpg_loss(logprobs, advantages, mask, alpha=gpg_alpha(4, 2)), t(-1.25), **TOL
    )


def test_entropy_bonus_by_hand():
    # Entropies [[1, 3], [2, garbage]]: per completion (1 + 3) / 2 = 2 and 2, mean 2 -> -0.1 * 2;
    # over all real tokens (1 + 3 + 2) / 3 = 2 as well; with [[1, 3], [5, .]]: 3.5 vs 3.
    entropy, mask = t([[1.0, 3.0], [2.0, float("nan")]]), torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(entropy_bonus(entropy, mask, 0.1), t(-0.2), **TOL)
    entropy = t([[1.0, 3.0], [5.0, 7.0]])
    torch.testing.assert_close(entropy_bonus(entropy, mask, 0.1), t(-0.35), **TOL)
    torch.testing.assert_close(entropy_bonus(entropy, mask, 0.1, token_mean=True), t(-0.3), **TOL)
    torch.testing.assert_close(entropy_bonus(entropy, mask, 1.0, num_completions=4), t(-1.75), **TOL)
    with pytest.raises(ValueError, match="must be equal"):
        entropy_bonus(entropy, mask[:, :1], 0.1)


def test_kl_penalty_by_hand_and_as_in_grpo_loss():
    # d = ref - lp = [[0, 1], [1, .]]; k3 = exp(d) - d - 1 = [[0, e - 2], [e - 2, .]];
    # per completion (e - 2) / 2 and (e - 2), mean 0.75 (e - 2), times beta = 0.1.
    logprobs, advantages, mask = hand_batch()
    ref = t([[-1.0, -1.0], [-3.0, float("nan")]])
    expected = t(0.1 * 0.75 * (math.e - 2))
    torch.testing.assert_close(kl_penalty(logprobs, ref, mask, 0.1), expected, **TOL)
    policy_only = grpo_loss(logprobs, None, None, advantages, mask)
    torch.testing.assert_close(grpo_loss(logprobs, None, ref, advantages, mask, beta=0.1),
                               policy_only + expected, **TOL)
    with pytest.raises(ValueError, match="must be equal"):
        kl_penalty(logprobs, ref[:, :1], mask, 0.1)


def test_gpg_loss_token_mean_by_hand():
    # Sum of -A * lp over all real tokens: 0.5 * 1 + 0.5 * 2 + (0.5 * -4) = 1.5 - 2 = -0.5,
    # over 3 real tokens -> -1/6. The long completion weighs twice as much as the short one.
    logprobs, advantages, mask = hand_batch()
    torch.testing.assert_close(
        gpg_loss(logprobs, advantages, mask, token_mean=True), t(-1 / 6), **TOL
    )
    torch.testing.assert_close(
        gpg_loss(logprobs, advantages, mask, alpha=3.0, token_mean=True), t(-0.5), **TOL
    )


def test_gpg_loss_length_norm_by_hand():
    # Dr.GRPO: each completion's token sum over the constant 4, not its own length:
    #   row 0: 1.5 / 4 = 0.375;  row 1: -2 / 4 = -0.5;  mean (0.375 - 0.5) / 2 = -0.0625.
    logprobs, advantages, mask = hand_batch()
    torch.testing.assert_close(
        gpg_loss(logprobs, advantages, mask, length_norm=4), t(-0.0625), **TOL
    )
    with pytest.raises(ValueError, match="length_norm"):
        gpg_loss(logprobs, advantages, mask, token_mean=True, length_norm=4)


def test_empty_completion_contributes_zero_but_counts():
    # Row 2 has no real token (e.g. a completion cut to nothing): its term is 0, and it still
    # counts in the per-completion mean, so the loss is (0.75 - 2 + 0) / 3 = -1.25 / 3. The
    # token mean is unchanged: -0.5 / 3 real tokens.
    logprobs, advantages, mask = hand_batch()
    logprobs = torch.cat([logprobs, t([[math.nan, 1e30]])])
    advantages = torch.cat([advantages, t([7.0])])
    mask = torch.cat([mask, torch.zeros(1, 2, dtype=mask.dtype)])
    torch.testing.assert_close(gpg_loss(logprobs, advantages, mask), t(-1.25 / 3), **TOL)
    got = gpg_loss(logprobs, advantages, mask, token_mean=True)
    torch.testing.assert_close(got, t(-1 / 6), **TOL)
    got = grpo_loss(logprobs, logprobs, logprobs, advantages, mask, token_mean=True)
    torch.testing.assert_close(got, t(-1 / 6), **TOL)
    # A batch with no real token at all: 0, not 0 / 0.
    empty = torch.zeros_like(mask)
    assert float(gpg_loss(logprobs, advantages, empty, token_mean=True)) == 0.0
    assert float(gpg_loss(logprobs, advantages, empty)) == 0.0


def test_gpg_loss_shape_errors():
    logprobs, advantages, mask = hand_batch()
    with pytest.raises(ValueError, match="advantages"):
        gpg_loss(logprobs, advantages[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        gpg_loss(logprobs, advantages, mask[:, :1])


@pytest.mark.parametrize("token_mean", [False, True])
def test_gpg_loss_gradient_matches_closed_form(token_mean):
    # d loss / d lp_it = -alpha * A_i * m_it / len_i / B    (per-completion mean)
    #                  = -alpha * A_i * m_it / total_tokens (token mean)
    gen = torch.Generator().manual_seed(0)
    B, T, alpha = 6, 7, 1.7
    logprobs, mask = random_batch(gen, B, T)
    advantages = torch.randn(B, generator=gen, dtype=F64)
    logprobs.requires_grad_(True)
    gpg_loss(logprobs, advantages, mask, alpha=alpha, token_mean=token_mean).backward()
    m = mask.to(F64)  # (B, T)
    if token_mean:
        expected = -alpha * advantages[:, None] * m / m.sum()
    else:
        expected = -alpha * advantages[:, None] * m / m.sum(1, keepdim=True) / B
    torch.testing.assert_close(logprobs.grad, expected, **TOL)


def test_advantages_receive_no_gradient():
    logprobs, advantages, mask = hand_batch()
    advantages = advantages.clone().requires_grad_(True)
    logprobs = logprobs.clone().requires_grad_(True)
    gpg_loss(logprobs, advantages, mask).backward()
    assert advantages.grad is None


# ---------------------------------------------------------------------------------------------
# Invariances: padding, micro-batches, data-parallel ranks


def both_losses(logprobs, old, ref, advantages, mask, **kw):
    return (
        gpg_loss(logprobs, advantages, mask, alpha=1.3, **kw),
        grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=0.2, beta=0.1, **kw),
    )


MODES = [dict(token_mean=False), dict(token_mean=True), dict(length_norm=9)]


def nearby_policies(gen, logprobs):
    """Old and reference log-probs near `logprobs` (B, T), and advantages (B,)."""
    B, T = logprobs.shape
    old = logprobs + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    ref = logprobs + 0.3 * torch.randn(B, T, generator=gen, dtype=F64)
    return old, ref, torch.randn(B, generator=gen, dtype=F64)


def random_step(seed, B, T):
    """logprobs, mask, old, ref, advantages of a random batch."""
    gen = torch.Generator().manual_seed(seed)
    logprobs, mask = random_batch(gen, B, T)
    return (logprobs, mask, *nearby_policies(gen, logprobs))


@pytest.mark.parametrize("mode", MODES)
def test_extra_padding_changes_nothing(mode):
    B, T = 6, 5
    logprobs, mask, old, ref, advantages = random_step(1, B, T)

    # Garbage in the padding of every tensor: existing padding and 3 new columns.
    garbage = t([[1e30, -math.inf, math.nan]]).expand(B, 3)
    pad = lambda x: torch.where(mask, x, t(1e30)) if x is not None else None  # noqa: E731
    wide = [torch.cat([pad(x), garbage], 1) for x in (logprobs, old, ref)]
    wide_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], 1).float()  # 0/1 float

    lp_narrow = logprobs.clone().requires_grad_(True)
    lp_wide = wide[0].clone().requires_grad_(True)
    for narrow_loss, wide_loss in zip(
        both_losses(lp_narrow, old, ref, advantages, mask, **mode),
        both_losses(lp_wide, wide[1], wide[2], advantages, wide_mask, **mode),
    ):
        assert torch.isfinite(wide_loss)
        torch.testing.assert_close(wide_loss, narrow_loss, **TOL)
        lp_narrow.grad = lp_wide.grad = None
        narrow_loss.backward()
        wide_loss.backward()
        # The gradient is finite everywhere and exactly zero in the padding.
        assert torch.isfinite(lp_wide.grad).all()
        padding_grad = lp_wide.grad[wide_mask == 0]
        assert torch.equal(padding_grad, torch.zeros_like(padding_grad))
        torch.testing.assert_close(lp_wide.grad[:, :T], lp_narrow.grad, **TOL)


def split_kwargs(mode, mask, world_size):
    """The global normalisers of the whole batch, divided by the number of ranks."""
    if mode.get("token_mean"):
        return dict(num_tokens=mask.sum() / world_size)
    return dict(num_completions=mask.shape[0] / world_size)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_losses_sum_to_the_whole(mode):
    B, T = 8, 6
    logprobs, mask, old, ref, advantages = random_step(2, B, T)
    whole = both_losses(logprobs, old, ref, advantages, mask, **mode)
    # Uneven micro-batches of 3, 1, 4 completions, each with the whole step's normaliser.
    norm = split_kwargs(mode, mask, world_size=1)
    parts = [slice(0, 3), slice(3, 4), slice(4, 8)]
    summed = [0.0, 0.0]
    for s in parts:
        losses = both_losses(logprobs[s], old[s], ref[s], advantages[s], mask[s], **mode, **norm)
        for k in range(2):
            summed[k] = summed[k] + losses[k]
    for k in range(2):
        torch.testing.assert_close(summed[k], whole[k], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_two_rank_split_averages_to_the_global_loss(mode):
    # DDP averages gradients over ranks, so the mean of the rank losses must be the global
    # loss. Rank 0 gets long completions and rank 1 short ones, so a per-rank token mean
    # would weigh them wrongly.
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 6
    logprobs, _ = random_batch(gen, B, T)
    lengths = torch.tensor([6, 5, 6, 6, 1, 2, 1, 1])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    old, ref, advantages = nearby_policies(gen, logprobs)
    whole = both_losses(logprobs, old, ref, advantages, mask, **mode)
    norm = split_kwargs(mode, mask, world_size=2)
    ranks = [slice(0, 4), slice(4, 8)]
    per_rank = [
        both_losses(logprobs[s], old[s], ref[s], advantages[s], mask[s], **mode, **norm)
        for s in ranks
    ]
    for k in range(2):
        torch.testing.assert_close((per_rank[0][k] + per_rank[1][k]) / 2, whole[k], **TOL)
    if mode.get("token_mean"):
        # The check can fail: local token means, averaged, are not the global token mean.
        local = [
            gpg_loss(logprobs[s], advantages[s], mask[s], alpha=1.3, token_mean=True)
            for s in ranks
        ]
        assert not torch.allclose((local[0] + local[1]) / 2, whole[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loop reference vs vectorised, on random batches with ties and all-equal groups


def random_rewards(rng, N, G):
    rewards = []
    for _ in range(N):
        kind = rng.random()
        if kind < 0.3:  # all equal, including non-representable values like 0.1
            rewards += [rng.choice([0.0, 1.0, 0.1, 0.7])] * G
        elif kind < 0.7:  # binary with ties
            rewards += [float(rng.random() < 0.5) for _ in range(G)]
        else:  # graded rewards, e.g. IoU plus format
            rewards += [round(rng.random() * 2, rng.choice([1, 3])) for _ in range(G)]
    return rewards


def test_vectorised_matches_loop_reference_on_random_batches():
    rng = random.Random(4)
    gen = torch.Generator().manual_seed(4)
    for _ in range(150):
        N, G, T = rng.randint(1, 4), rng.randint(2, 5), rng.randint(1, 6)
        B = N * G
        rewards = random_rewards(rng, N, G)
        r = t(rewards)
        assert informative_groups(r, G).tolist() == ref_informative(rewards, G)
        # alpha is float32 (the default dtype): rounding is at most 2**-24 ~ 6e-8 relative.
        alpha = ref_alpha(rewards, G)
        assert float(gpg_alpha(N, informative_groups(r, G).sum())) == pytest.approx(alpha, rel=1e-7)
        for scale in (False, True):
            expected = t(ref_advantages(rewards, G, scale))
            torch.testing.assert_close(group_advantages(r, G, scale_by_std=scale), expected, **TOL)
        adv = group_advantages(r, G)
        logprobs, mask = random_batch(gen, B, T)
        old = logprobs + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
        ref = logprobs + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
        lists = [x.tolist() for x in (logprobs, old, ref, mask)]
        for mode in MODES:
            expected = ref_gpg_loss(lists[0], adv.tolist(), lists[3], alpha, **mode)
            got = gpg_loss(logprobs, adv, mask, alpha, **mode)
            torch.testing.assert_close(got, t(expected), **TOL)
            for old_, ref_, beta in ((old, ref, 0.05), (None, None, 0.05), (old, ref, 0.0)):
                old_list = None if old_ is None else lists[1]
                ref_list = None if ref_ is None else lists[2]
                expected = ref_grpo_loss(
                    lists[0], old_list, ref_list, adv.tolist(), lists[3], 0.2, beta, **mode
                )
                got = grpo_loss(logprobs, old_, ref_, adv, mask, 0.2, beta, **mode)
                torch.testing.assert_close(got, t(expected), **TOL)


# ---------------------------------------------------------------------------------------------
# grpo_loss: by hand


def test_grpo_on_policy_without_kl_is_minus_mean_advantage_with_the_pg_gradient():
    # old_logprobs None -> ratio exp(lp - lp.detach()) = 1, no clipping; beta 0 -> no KL.
    # Per completion the token mean of -A is -A: rows A = [1, -2] -> (-1 + 2) / 2 = 0.5.
    logprobs, _, mask = hand_batch()
    advantages = t([1.0, -2.0])
    for ref, beta in ((None, 0.04), (logprobs + 1, 0.0)):
        lp = logprobs.clone().requires_grad_(True)
        loss = grpo_loss(lp, None, ref, advantages, mask, beta=beta)
        torch.testing.assert_close(loss, t(0.5), **TOL)
        loss.backward()
        # d ratio / d lp = ratio = 1, so the gradient is GPG's: -A_i * m / len_i / B.
        lp_pg = logprobs.clone().requires_grad_(True)
        gpg_loss(lp_pg, advantages, mask).backward()
        torch.testing.assert_close(lp.grad, lp_pg.grad, **TOL)


def test_grpo_clipping_by_hand():
    # One token per completion, clip_eps = 0.2, beta = 0:
    #   row 0: A = +1, ratio 1.5 -> min(1.5, 1.2) = 1.2  -> loss -1.2, clipped: gradient 0
    #   row 1: A = -1, ratio 0.5 -> min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped: gradient 0
    #   row 2: A = +1, ratio 0.5 -> min(0.5, 0.8) = 0.5  -> loss -0.5, gradient -A * ratio = -0.5
    # Mean over completions: (-1.2 + 0.8 - 0.5) / 3 = -0.3; gradients divided by B = 3.
    old = t([[0.0], [0.0], [0.0]])
    lp = t([[math.log(1.5)], [math.log(0.5)], [math.log(0.5)]]).requires_grad_(True)
    advantages = t([1.0, -1.0, 1.0])
    mask = torch.ones(3, 1, dtype=torch.bool)
    loss = grpo_loss(lp, old, None, advantages, mask, clip_eps=0.2, beta=0.0)
    torch.testing.assert_close(loss, t(-0.3), **TOL)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[0.0], [0.0], [-0.5 / 3]]), **TOL)


def test_grpo_k3_kl_by_hand():
    # A = 0 leaves only beta * k3, k3(d) = exp(d) - d - 1 with d = ref - lp:
    #   d = +ln 2: 2 - ln 2 - 1 = 1 - ln 2;   d = -ln 2: 1/2 + ln 2 - 1 = ln 2 - 1/2.
    # Token mean of one completion: ((1 - ln 2) + (ln 2 - 1/2)) / 2 = 1/4; beta 0.1 -> 0.025.
    # Gradient: d k3 / d lp = 1 - exp(d) -> [-1, 1/2], times beta / len = 0.1 / 2.
    lp = t([[0.0, 0.0]]).requires_grad_(True)
    ref = t([[math.log(2), -math.log(2)]])
    mask = torch.ones(1, 2)
    loss = grpo_loss(lp, None, ref, t([0.0]), mask, beta=0.1)
    torch.testing.assert_close(loss, t(0.025), **TOL)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-0.05, 0.025]]), **TOL)


# ---------------------------------------------------------------------------------------------
# Group selection for the beta_th resampling


def test_select_groups_puts_informative_groups_first_in_stable_order():
    # G = 2, groups: [1,1] no | [0,1] yes | [0,0] no | [1,0] yes | [2,2] no
    # -> informative in order: 1, 3; then the others in order: 0, 2, 4.
    rewards = t([1, 1, 0, 1, 0, 0, 1, 0, 2, 2])
    assert select_groups(rewards, 2, 5).tolist() == [1, 3, 0, 2, 4]
    keep = select_groups(rewards, 2, 3)
    assert keep.dtype == torch.long and keep.tolist() == [1, 3, 0]
    assert select_groups(rewards, 2, 2).tolist() == [1, 3]
    assert select_groups(rewards, 2, 0).tolist() == []
    with pytest.raises(ValueError, match="6 of 5"):
        select_groups(rewards, 2, 6)


def test_select_groups_matches_loop_reference_on_many_groups():
    # Large enough that an unstable sort reorders equal keys (it does already at 50 on CPU).
    rng = random.Random(5)
    for _ in range(5):
        G, M = rng.randint(2, 4), rng.randint(40, 80)
        rewards = random_rewards(rng, M, G)
        keep = rng.randint(0, M)
        assert select_groups(t(rewards), G, keep).tolist() == ref_select_groups(rewards, G, keep)


def test_group_rows_gathers_whole_groups():
    # Groups 3 and 1 of size 2 -> rows [6, 7, 2, 3], group by group.
    rows = group_rows(torch.tensor([3, 1]), 2)
    assert rows.dtype == torch.long and rows.tolist() == [6, 7, 2, 3]
    rewards = t([1, 1, 0, 1, 0, 0, 1, 0, 2, 2])
    kept = rewards[group_rows(select_groups(rewards, 2, 2), 2)]
    assert kept.tolist() == [0, 1, 1, 0]


def test_truncated_is_weights_by_hand():
    # pi = (0.5, 0.2, pad), mu = (0.25, 0.4): ratios 2.0 and 0.5; cap 1.5 clips the first.
    lp = torch.log(torch.tensor([[0.5, 0.2, 1.0]]))
    mu = torch.log(torch.tensor([[0.25, 0.4, 1e-30]]))  # padding holds garbage
    mask = torch.tensor([[1, 1, 0]])
    weights, clipped = truncated_is_weights(lp, mu, mask, cap=1.5)
    assert torch.allclose(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert clipped.tolist() == [[True, False, False]]
    # with a cap above every ratio nothing is clipped and the weights are the plain ratios
    weights, clipped = truncated_is_weights(lp, mu, mask, cap=10.0)
    assert torch.allclose(weights, torch.tensor([[2.0, 0.5, 0.0]])) and not clipped.any()
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(lp, mu, mask, cap=0.0)


def test_gpg_loss_with_token_weights_by_hand():
    # one completion, A = 1, per-completion mean over 2 tokens:
    # loss = -(1.5 * log 0.5 + 0.5 * log 0.2) / 2 = (1.5 * 0.693147 + 0.5 * 1.609438) / 2 = 0.922220
    # d loss / d lp_t = -A * w_t / 2 = (-0.75, -0.25); the weights themselves get no gradient.
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.3]])).requires_grad_()
    w = torch.tensor([[1.5, 0.5, float("inf")]], requires_grad=True)  # inf on padding stays out
    mask = torch.tensor([[1, 1, 0]])
    loss = gpg_loss(lp, torch.tensor([1.0]), mask, token_weights=w)
    assert abs(float(loss.detach()) - 0.922220) < 1e-5
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.75, -0.25, 0.0]]))
    assert w.grad is None
    # weights of one are the unweighted loss
    plain = gpg_loss(lp, torch.tensor([1.0]), mask)
    ones = gpg_loss(lp, torch.tensor([1.0]), mask, token_weights=torch.ones(1, 3))
    assert torch.equal(plain, ones)
