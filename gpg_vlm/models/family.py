"""What differs between the Qwen-VL families, in one table: a new family is one more entry.

Each `FamilyFacts` says which transformers class loads the checkpoint, the frame its boxes are
written in (see gpg_vlm.rewards.grounding), the vision patch and merge sizes (together the
resize factor of gpg_vlm.resize), the special token strings, where the vision tower sits in the
loaded model and how gradient checkpointing is switched on.

Sources of the facts of each family (patch and merge sizes are also checked against every loaded
checkpoint's vision config; the adapter refuses a mismatch):
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: see DESIGN.md's family table.
- Qwen3-VL-MoE (transformers Qwen3VLMoeVisionConfig: patch_size 16, spatial_merge_size 2): the
  Qwen3-VL vision tower and tokenizer, so Qwen3-VL's 0-1000 box frame (QwenLM/Qwen3-VL
  cookbooks, spatial_understanding).
- Qwen3.5 / Qwen3.5-MoE (transformers Qwen3_5VisionConfig / Qwen3_5MoeVisionConfig: patch_size 16,
  spatial_merge_size 2; processing_auto maps both to Qwen3VLProcessor, whose tokens are the ones
  below): boxes in 0-1000 ("Qwen3-VL and 3.5 use a relative coordinate system ... normalized to
  a 0-1000 range", agent.viscover.site/knowledge/qwen3-coordinate-system). Their chat templates
  take Qwen3's `enable_thinking` switch (Qwen3.5 served with chat_template_kwargs
  {"enable_thinking": ...}, e.g. the Qwen3.5-4B-FP8 model page; the Qwen3.5-0.8B card: "operates
  in non-thinking mode by default"); a real template file was not available offline to check
  more. The trainer's prompts ask for `<think> </think><answer> </answer>` in the completion
  itself, so the template is rendered with enable_thinking=false (`template_kwargs`).
- MoE families: the router's load-balancing auxiliary loss is NOT added to the GPG loss (the
  training forward runs the decoder without router logits), so the objective stays the paper's
  plain policy gradient. The cost: nothing holds the expert load balanced during RL (not
  measured at real scale; a run that sees routing collapse would need the term added). The
  router and the experts still train: the top-k routing weights multiply each expert's
  output, so the policy gradient reaches the router weights and every expert a token used.

Deliberately left out: anything that needs torch or transformers at import (this module is
read by light code), and facts a checkpoint states itself and that differ between sizes of one
family (hidden width, vocabulary size, token ids: the adapter reads those from the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable

from gpg_vlm.resize import MAX_TOKENS, MIN_TOKENS

# Vision tokens are placed by the adapter, never by the text, and never sampled.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>")
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def transformers_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, under the name transformers >= 5.2x uses when present."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass(frozen=True)
class FamilyFacts:
    """One model family, as the adapter and the trainer need to know it."""

    model_class: str
    """The transformers class name of the full (vision + language) model."""
    box_format: str
    """The frame boxes are written in: "rel1000" (0..1000 of the image) or "abs_resized"
    (pixels of the image the model saw)."""
    patch_size: int
    """Vision patch side in pixels."""
    merge_size: int
    """Patches merged per side into one language token."""
    image_token: str = "<|image_pad|>"
    """The placeholder each image's tokens replace (its id is the config's image_token_id)."""
    vision_tokens: tuple[str, ...] = VISION_TOKENS
    """Tokens the text may not contain and sampling never produces."""
    eos_tokens: tuple[str, ...] = EOS_TOKENS
    """Tokens that end a completion; the last one pads when the tokenizer has no pad token."""
    vision_tower: str = "model.visual"
    """Attribute path from the loaded model to its vision encoder (what freeze_vision freezes)."""
    enable_checkpointing: Callable = transformers_checkpointing
    """Switches on gradient checkpointing of a loaded model."""
    template_kwargs: tuple[tuple[str, object], ...] = ()
    """Extra variables the chat template is rendered with, as (name, value) pairs."""

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of this (one language token per factor**2 px)."""
        return self.patch_size * self.merge_size

    @property
    def min_pixels(self) -> int:
        """The processor's default lower pixel bound (qwen-vl-utils' MIN_TOKENS tokens)."""
        return MIN_TOKENS * self.factor ** 2

    @property
    def max_pixels(self) -> int:
        """The processor's default upper pixel bound (qwen-vl-utils' MAX_TOKENS tokens)."""
        return MAX_TOKENS * self.factor ** 2

    def vision_module(self, model):
        """The vision encoder of a loaded model."""
        return reduce(getattr, self.vision_tower.split("."), model)


# keyed by config.json's model_type
FAMILIES: dict[str, FamilyFacts] = {
    "qwen2_vl": FamilyFacts("Qwen2VLForConditionalGeneration", "rel1000", patch_size=14,
                            merge_size=2),
    "qwen2_5_vl": FamilyFacts("Qwen2_5_VLForConditionalGeneration", "abs_resized",
                              patch_size=14, merge_size=2),
    "qwen3_vl": FamilyFacts("Qwen3VLForConditionalGeneration", "rel1000", patch_size=16,
                            merge_size=2),
    "qwen3_vl_moe": FamilyFacts("Qwen3VLMoeForConditionalGeneration", "rel1000", patch_size=16,
                                merge_size=2),
    "qwen3_5": FamilyFacts("Qwen3_5ForConditionalGeneration", "rel1000", patch_size=16,
                           merge_size=2, template_kwargs=(("enable_thinking", False),)),
    "qwen3_5_moe": FamilyFacts("Qwen3_5MoeForConditionalGeneration", "rel1000", patch_size=16,
                               merge_size=2, template_kwargs=(("enable_thinking", False),)),
}
