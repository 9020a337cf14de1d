"""What differs between the Qwen-VL families, in one table: a new family is one more entry.

Each `FamilyFacts` says which transformers class loads the checkpoint, the frame its boxes are
written in (see gpg_vlm.rewards.grounding), the vision patch and merge sizes (together the
resize factor of gpg_vlm.resize), the special token strings, where the vision tower sits in the
loaded model and how gradient checkpointing is switched on.

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
}
