"""A slow, loop-by-loop reference of the GPG / GRPO definitions, for the tests only.

Written from the definitions (paper and module docstring), not from `gpg_vlm.algo`: plain
Python floats and lists, no torch, one completion and one token at a time. The tests compare
the vectorised functions with these on many random batches.
"""

import math


def ref_advantages(rewards, group_size, scale_by_std=False, eps=1e-4):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if all(r == group[0] for r in group):
            out.extend([0.0] * group_size)
            continue
        mean = sum(group) / group_size
        f_norm = 1.0
        if scale_by_std:
            var = sum((r - mean) ** 2 for r in group) / (group_size - 1)  # unbiased
            f_norm = math.sqrt(var) + eps
        out.extend([(r - mean) / f_norm for r in group])
    return out


def ref_informative(rewards, group_size):
    flags = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        flags.append(len(set(group)) > 1)
    return flags


def ref_alpha(rewards, group_size):
    flags = ref_informative(rewards, group_size)
    num_equal = flags.count(False)  # the paper's M
    num_groups = len(flags)  # the paper's B (groups)
    if num_groups == num_equal:
        return 0.0
    return num_groups / (num_groups - num_equal)


def _reduce(per_token_rows, token_mean, length_norm):
    """per_token_rows: list (over completions) of lists of the real tokens' loss terms."""
    if token_mean:
        total = 0.0
        count = 0
        for row in per_token_rows:
            for value in row:
                total += value
                count += 1
        return total / max(count, 1)
    total = 0.0
    for row in per_token_rows:
        row_sum = 0.0
        for value in row:
            row_sum += value
        denom = length_norm if length_norm is not None else max(len(row), 1)
        total += row_sum / denom
    return total / len(per_token_rows)


def _real_tokens(values, mask_row):
    return [v for v, m in zip(values, mask_row) if m]


def ref_gpg_loss(logprobs, advantages, mask, alpha=1.0, token_mean=False, length_norm=None):
    rows = []
    for lp_row, a, m_row in zip(logprobs, advantages, mask):
        rows.append([-a * lp for lp in _real_tokens(lp_row, m_row)])
    return alpha * _reduce(rows, token_mean, length_norm)


def ref_grpo_loss(
    logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, beta, token_mean=False,
    length_norm=None,
):
    rows = []
    for i, (a, m_row) in enumerate(zip(advantages, mask)):
        row = []
        for t, m in enumerate(m_row):
            if not m:
                continue
            lp = logprobs[i][t]
            old = lp if old_logprobs is None else old_logprobs[i][t]
            ratio = math.exp(lp - old)
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            term = -min(ratio * a, clipped * a)
            if ref_logprobs is not None and beta != 0:
                d = ref_logprobs[i][t] - lp
                term += beta * (math.exp(d) - d - 1)
            row.append(term)
        rows.append(row)
    return _reduce(rows, token_mean, length_norm)


def ref_select_groups(rewards, group_size, num_keep):
    flags = ref_informative(rewards, group_size)
    informative = [g for g, flag in enumerate(flags) if flag]
    others = [g for g, flag in enumerate(flags) if not flag]
    return (informative + others)[:num_keep]
