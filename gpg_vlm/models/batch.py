"""The tensor containers the adapter, the rollout engines and the trainer pass around.

`Sample` is one prompt before encoding; `PromptBatch` is N encoded prompts with their images'
patches; `Rollout` is the B = N*G completions sampled for them. `micro_batches` splits
completions into training micro-batches under a padded-token budget.

Shape letters: N prompts, G completions per prompt, B = N*G completions, L prompt tokens,
T completion tokens, P image patches, I images.

`pixel_values` is one flat tensor of patches for all images, so `PromptBatch.select` slices it
by each image's own patch count, never by a uniform repeat.

Deliberately left out: encoding (the adapter does it) and anything that needs a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class Sample:
    """One prompt: zero, one or several images, then the text, with an optional system turn."""

    text: str
    images: Sequence = ()
    system: str | None = None


@dataclass
class PromptBatch:
    """N encoded prompts, left-padded to L tokens, with their images' patches in prompt order."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    mm_token_type_ids: torch.Tensor  # (N, L): 1 on image tokens
    pixel_values: torch.Tensor | None  # (P, D): patches of all images, prompt by prompt
    image_grid_thw: torch.Tensor | None  # (I, 3)
    images_per_prompt: list[int]  # N entries, summing to I
    image_sizes: list[list[tuple[int, int]]]  # per prompt, per image: original (W, H)
    model_image_sizes: list[list[tuple[int, int]]]  # per prompt, per image: (W, H) the model saw
    texts: list[str] = field(default_factory=list)  # the templated prompt strings
    # per prompt, the fitted images (PIL) the patches were cut from: an engine that runs its own
    # image processor (vLLM) gets exactly these, so it resizes nothing and sees the same grid
    images: list[list] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0]

    def prompt_lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)  # (N,)

    def _image_ranges(self) -> tuple[list[int], list[int]]:
        """Per prompt, the first image index; per image, the first patch index."""
        first_image, n = [], 0
        for count in self.images_per_prompt:
            first_image.append(n)
            n += count
        first_patch, p = [], 0
        if self.image_grid_thw is not None:
            for count in self.image_grid_thw.prod(-1).tolist():
                first_patch.append(p)
                p += count
        return first_image, first_patch

    def image_indices(self, prompts: Sequence[int]) -> list[int]:
        """The indices of the images of `prompts`, in order (a prompt may appear repeatedly)."""
        first_image, _ = self._image_ranges()
        out = []
        for i in prompts:
            out.extend(range(first_image[i], first_image[i] + self.images_per_prompt[i]))
        return out

    def select(self, prompts: Sequence[int]) -> "PromptBatch":
        """The sub-batch of `prompts` (in that order), left padding trimmed to its own longest.

        Patches are sliced per image by its own patch count, so every prompt keeps exactly its
        own pixels whatever the image sizes around it.
        """
        prompts = [int(i) for i in prompts]
        index = torch.tensor(prompts, dtype=torch.long)
        images = self.image_indices(prompts)
        pixel_values = grid = None
        if images:
            _, first_patch = self._image_ranges()
            counts = self.image_grid_thw.prod(-1).tolist()
            patch_index = torch.cat([torch.arange(first_patch[j], first_patch[j] + counts[j])
                                     for j in images])
            pixel_values = self.pixel_values[patch_index]
            grid = self.image_grid_thw[images]
        mask = self.attention_mask[index]
        keep = int(mask.sum(-1).max()) if len(prompts) else 0
        return PromptBatch(
            input_ids=self.input_ids[index, -keep:] if keep else self.input_ids[index, :0],
            attention_mask=mask[:, -keep:] if keep else mask[:, :0],
            mm_token_type_ids=self.mm_token_type_ids[index, -keep:] if keep
            else self.mm_token_type_ids[index, :0],
            pixel_values=pixel_values,
            image_grid_thw=grid,
            images_per_prompt=[self.images_per_prompt[i] for i in prompts],
            image_sizes=[self.image_sizes[i] for i in prompts],
            model_image_sizes=[self.model_image_sizes[i] for i in prompts],
            texts=[self.texts[i] for i in prompts] if self.texts else [],
            images=[self.images[i] for i in prompts] if self.images else [],
        )

    @staticmethod
    def concat(batches: Sequence["PromptBatch"], pad_token_id: int) -> "PromptBatch":
        """One batch holding the prompts of `batches` in order, left padding re-aligned."""
        width = max(b.input_ids.shape[1] for b in batches)

        def left_pad(t, value):
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        pixels = [b.pixel_values for b in batches if b.pixel_values is not None]
        grids = [b.image_grid_thw for b in batches if b.image_grid_thw is not None]
        return PromptBatch(
            input_ids=torch.cat([left_pad(b.input_ids, pad_token_id) for b in batches]),
            attention_mask=torch.cat([left_pad(b.attention_mask, 0) for b in batches]),
            mm_token_type_ids=torch.cat([left_pad(b.mm_token_type_ids, 0) for b in batches]),
            pixel_values=torch.cat(pixels) if pixels else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            images_per_prompt=[n for b in batches for n in b.images_per_prompt],
            image_sizes=[s for b in batches for s in b.image_sizes],
            model_image_sizes=[s for b in batches for s in b.model_image_sizes],
            texts=[t for b in batches for t in b.texts],
            images=[im for b in batches for im in b.images],
        )


@dataclass
class Rollout:
    """B = N*G sampled completions; rows of one prompt are contiguous."""

    prompt_index: torch.Tensor  # (B,) which prompt of the batch each completion answers
    completion_ids: torch.Tensor  # (B, T), pad after the end
    completion_mask: torch.Tensor  # (B, T), 1 on the completion's tokens including its EOS
    logprobs: torch.Tensor  # (B, T), log-probs of the sampled tokens, 0 where masked
    texts: list[str]  # B decoded completions (special tokens removed)
    truncated: torch.Tensor  # (B,) bool: ended by max_new_tokens, not by an EOS token

    def select(self, rows: torch.Tensor, prompt_index: torch.Tensor) -> "Rollout":
        """The completions `rows`, answering prompts renumbered as `prompt_index`. (b,)"""
        return Rollout(prompt_index, self.completion_ids[rows], self.completion_mask[rows],
                       self.logprobs[rows], [self.texts[i] for i in rows.tolist()],
                       self.truncated[rows])

    @staticmethod
    def concat(rollouts: Sequence["Rollout"], pad_token_id: int) -> "Rollout":
        """Completions of consecutive prompt batches; prompt indices are offset to match."""
        width = max(r.completion_ids.shape[1] for r in rollouts)

        def right_pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        offsets, n = [], 0
        for r in rollouts:
            offsets.append(n)
            n += int(r.prompt_index.max()) + 1 if r.prompt_index.numel() else 0
        return Rollout(
            torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets)]),
            torch.cat([right_pad(r.completion_ids, pad_token_id) for r in rollouts]),
            torch.cat([right_pad(r.completion_mask, 0) for r in rollouts]),
            torch.cat([right_pad(r.logprobs, 0.0) for r in rollouts]),
            [t for r in rollouts for t in r.texts],
            torch.cat([r.truncated for r in rollouts]),
        )


def micro_batches(batch: PromptBatch, prompt_index: torch.Tensor, completion_mask: torch.Tensor,
                  max_tokens: int) -> list[torch.Tensor]:
    """Split completions, in order, into micro-batches of at most `max_tokens` padded tokens.

    Consecutive rows stay together, so the G completions of a prompt share a micro-batch
    (and one image encoding) whenever they fit. A row longer than the budget goes alone.
    """
    prompt_len = batch.prompt_lengths()[prompt_index].tolist()  # (B,)
    completion_len = completion_mask.sum(-1).tolist()
    chunks, current, width = [], [], 0
    for i, (lp, lc) in enumerate(zip(prompt_len, completion_len)):
        new_width = max(width, lp + lc)
        if current and new_width * (len(current) + 1) > max_tokens:
            chunks.append(torch.tensor(current, dtype=torch.long))
            current, new_width = [], lp + lc
        current.append(i)
        width = new_width
    if current:
        chunks.append(torch.tensor(current, dtype=torch.long))
    return chunks
