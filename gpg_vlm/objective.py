"""The training loss of the configured algorithm, chosen once at set-up (the math is gpg_vlm.algo)."""

from __future__ import annotations

from gpg_vlm import algo
from gpg_vlm.config import TrainConfig


class Objective:
    """The loss of `cfg.algorithm`, chosen once at set-up (gpg_vlm.algo does the math).

    `alpha(informative)` is GPG's bias correction (1 for the GRPO family); calling the object
    gives one micro-batch's loss and its mean entropy (a float, 0.0 when entropy_coef is 0).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.is_gpg = cfg.algorithm == "gpg"
        # Dr.GRPO divides by the constant max_new_tokens instead of each completion's length
        self.length_norm = float(cfg.max_new_tokens) if cfg.algorithm == "dr_grpo" else None

    def alpha(self, informative: int) -> float:
        return float(algo.gpg_alpha(self.cfg.prompts_per_step, informative)) if self.is_gpg else 1.0

    def __call__(self, lp, entropy, adv, ref, mask, alpha: float, counts: dict, weights=None):
        """lp, entropy, ref, mask, weights (truncated IS, or None): (b, t); adv: (b,);
        counts: num_completions, num_tokens."""
        cfg = self.cfg
        if self.is_gpg:
            loss = algo.gpg_loss(lp, adv, mask, alpha=alpha, token_mean=cfg.token_mean,
                                 token_weights=weights, **counts)
            if ref is not None:
                loss = loss + algo.kl_penalty(lp, ref, mask, cfg.kl_beta, cfg.token_mean, **counts)
        else:
            loss = algo.grpo_loss(lp, None, ref, adv, mask, clip_eps=cfg.clip_eps, beta=cfg.kl_beta,
                                  token_mean=cfg.token_mean, length_norm=self.length_norm,
                                  token_weights=weights, **counts)
        if entropy is None:
            return loss, 0.0
        bonus = algo.entropy_bonus(entropy, mask, cfg.entropy_coef, cfg.token_mean, **counts)
        return loss + bonus, float(bonus.detach()) / -cfg.entropy_coef
