"""The VLM adapter: the one place that knows transformers and loads a Qwen-VL checkpoint.

It turns samples (images + text) into a `PromptBatch`, computes M-RoPE positions, decodes
completions, and computes the per-token log-probs of given completions with gradients (the
training forward, through `gpg_vlm.models.forward.TokenScorer`). It also carries the model
internals the trainer must not touch itself: `freeze_vision`, `enable_gradient_checkpointing`
and `set_scorer` (the scorer a data-parallel wrapper returns). Sampling lives in
`gpg_vlm.rollout`; what differs between families lives in `gpg_vlm.models.family`.

Shape letters: N prompts, B completions, L prompt tokens, T completion tokens, P image
patches, I images.

How the facts that bite are handled:
- Images are resized here with the qwen-vl-utils rules (`gpg_vlm.resize`) before the image
  processor, so the processor's own resize is a no-op and `model_image_sizes` is exactly the
  frame Qwen2.5-VL writes its pixel boxes in.
- The processor classes of transformers 5 cannot be built without torchvision (their video
  processor needs it), so prompts are built from the three parts a checkpoint ships: the
  tokenizer, the image processor and the chat template. Each `<|image_pad|>` placeholder is
  expanded to `grid.prod() // merge**2` tokens and `mm_token_type_ids` marks them.
- Positions (M-RoPE) are always computed here from `input_ids`, `mm_token_type_ids` (zeros
  over the completion) and the attention mask (prompt mask + completion mask), and passed
  explicitly, so no cached model state is used.
- Vision tokens (and ids the tokenizer does not know) are the `suppressed` ids: never sampled
  and masked identically in the training logits (`policy_scores`), so sampled and trained
  log-probs are the same distribution.

Deliberately left out: video inputs, and any processor or template code paths that are not
Qwen-VL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from gpg_vlm.models.batch import PromptBatch, Rollout, Sample, micro_batches
from gpg_vlm.models.family import FAMILIES
from gpg_vlm.models.forward import TokenScorer
from gpg_vlm.resize import fit_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterError(ValueError):
    """A checkpoint or a sample the adapter cannot use; the message names which and why."""


def read_chat_template(path: Path, tokenizer) -> str:
    """The checkpoint's chat template, wherever this checkpoint keeps it."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = path / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text(encoding="utf-8"))["chat_template"]
        except (ValueError, KeyError) as exc:
            raise AdapterError(f"{js}: no readable 'chat_template' entry ({exc})") from None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise AdapterError(f"{path}: no chat template (chat_template.jinja, chat_template.json or "
                       "tokenizer_config.json)")


def _loading(file: Path, load, *args, **kwargs):
    """Call a transformers loader; any failure is one AdapterError naming the file it reads."""
    try:
        return load(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - library errors vary; the file is what users need
        first = (str(exc).strip().splitlines() or [""])[0]
        what = "missing" if not file.exists() else "unreadable"
        raise AdapterError(f"{file}: {what} or not a valid checkpoint file "
                           f"({type(exc).__name__}: {first})") from exc


def _default_attention() -> str:
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


class VLMAdapter:
    """A loaded Qwen-VL checkpoint with everything needed to encode prompts and score completions."""

    def __init__(self, model, tokenizer, image_processor, chat_template: str, family: str,
                 min_pixels: int | None = None, max_pixels: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.family = family
        self.facts = facts = FAMILIES[family]
        self.box_format = facts.box_format
        vision = model.config.vision_config
        if (vision.patch_size, vision.spatial_merge_size) != (facts.patch_size, facts.merge_size):
            # the resize factor and the token count per image follow from these two
            raise AdapterError(f"config.json vision_config: patch_size {vision.patch_size}, "
                               f"spatial_merge_size {vision.spatial_merge_size}; a {family} "
                               f"checkpoint has {facts.patch_size}, {facts.merge_size}")
        self.merge_size = facts.merge_size
        self.factor = facts.factor
        self.min_pixels = min_pixels or facts.min_pixels
        self.max_pixels = max_pixels or facts.max_pixels
        if self.min_pixels > self.max_pixels:
            raise AdapterError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*facts.vision_tokens, *facts.eos_tokens)}
        self.image_token_id = model.config.image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else ids[facts.eos_tokens[-1]]
        self.eos_token_ids = [ids[t] for t in facts.eos_tokens if ids[t] is not None]
        vocab = model.get_output_embeddings().weight.shape[0]
        suppressed = torch.zeros(vocab, dtype=torch.bool)
        for t in facts.vision_tokens:
            if ids[t] is not None and ids[t] < vocab:
                suppressed[ids[t]] = True
        suppressed[len(tokenizer):] = True  # rows the tokenizer cannot produce or decode
        self.suppressed = suppressed  # (V,)
        # the training forward; a trainer hands it to its data-parallel wrapper (set_scorer)
        self.scorer = TokenScorer(model, suppressed)
        # whether rollout may repeat the prompt cache and the training forward index it
        self.cache_indexable = self.scorer.cache_indexable
        self._token_scorer = self.scorer  # set_scorer may wrap it; this keeps the module itself

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, dtype: str = "float32", attn_implementation: str | None = None,
                        device: str | torch.device | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, trust_remote_code: bool = False
                        ) -> "VLMAdapter":
        """Load a checkpoint directory of a family in gpg_vlm.models.family (read from config)."""
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise AdapterError(f"{path} has no config.json: not a transformers checkpoint")
        if dtype not in DTYPES:
            raise AdapterError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        # the family is read from the JSON itself, so a foreign checkpoint (and any code it
        # names in auto_map) never reaches transformers
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AdapterError(f"{path / 'config.json'}: not readable JSON ({exc})") from None
        family = raw.get("model_type") if isinstance(raw, dict) else None
        if family not in FAMILIES:
            raise AdapterError(f"{path}: model_type {family!r} is not a supported Qwen-VL family "
                               f"({', '.join(FAMILIES)})")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
            found = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "no weights file"
            raise AdapterError(f"{path}: no model.safetensors ({found}); weights load from "
                               "safetensors only, never from pickled .bin files")
        remote = dict(trust_remote_code=trust_remote_code)
        _loading(path / "config.json", AutoConfig.from_pretrained, path, **remote)
        model_class = getattr(transformers, FAMILIES[family].model_class)
        model = _loading(path / "model.safetensors", model_class.from_pretrained, path,
                         dtype=DTYPES[dtype], use_safetensors=True,
                         attn_implementation=attn_implementation or _default_attention(), **remote)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        tokenizer = _loading(path / "tokenizer.json", AutoTokenizer.from_pretrained, path, **remote)
        image_token = FAMILIES[family].image_token
        if tokenizer.convert_tokens_to_ids(image_token) != model.config.image_token_id:
            raise AdapterError(f"{path}: the tokenizer does not know {image_token} as id "
                               f"{model.config.image_token_id}: tokenizer.json is missing or foreign")
        image_processor = _loading(path / "preprocessor_config.json", AutoImageProcessor.from_pretrained,
                                   path, **remote)
        template = read_chat_template(path, tokenizer)
        return cls(model, tokenizer, image_processor, template, family, min_pixels, max_pixels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- prompts
    def messages(self, sample: Sample) -> list[dict]:
        """Chat messages for one sample: images first, then the text (the Qwen convention)."""
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.text}]
        messages = [{"role": "user", "content": content}]
        if sample.system is not None:
            messages.insert(0, {"role": "system", "content": sample.system})
        return messages

    def encode(self, samples: Sequence[Sample]) -> PromptBatch:
        """Tokenize N samples into a left-padded PromptBatch with their images' patches."""
        rows, pixel_blocks, grids = [], [], []
        image_sizes, model_sizes, counts, texts, images = [], [], [], [], []
        for n, sample in enumerate(samples):
            if not isinstance(sample.text, str):
                raise AdapterError(f"sample {n}: text must be a string, got {type(sample.text).__name__}")
            for token in self.facts.vision_tokens:
                if token in sample.text or (sample.system and token in sample.system):
                    raise AdapterError(f"sample {n}: its text contains the vision token {token}; "
                                       "images are placed by the adapter, not by the text")
            fitted = [fit_image(im, self.factor, self.min_pixels, self.max_pixels)
                      for im in sample.images]
            text = self.tokenizer.apply_chat_template(
                self.messages(sample), chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=True, **dict(self.facts.template_kwargs))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            grid = None
            if fitted:
                size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
                out = self.image_processor(images=fitted, return_tensors="pt", size=size)
                grid = out["image_grid_thw"]
                pixel_blocks.append(out["pixel_values"])
                grids.append(grid)
            ids = self._expand_image_tokens(ids, grid, n)
            rows.append(ids)
            image_sizes.append([im.size for im in sample.images])
            model_sizes.append([im.size for im in fitted])
            counts.append(len(fitted))
            texts.append(text)
            images.append(fitted)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r):] = 1
        mm = ((input_ids == self.image_token_id) & attention_mask.bool()).long()
        return PromptBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm,
            pixel_values=torch.cat(pixel_blocks) if pixel_blocks else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            images_per_prompt=counts,
            image_sizes=image_sizes,
            model_image_sizes=model_sizes,
            texts=texts,
            images=images,
        )

    def _expand_image_tokens(self, ids: list[int], grid, n: int) -> list[int]:
        """Replace the k-th `<|image_pad|>` placeholder by image k's number of visual tokens."""
        places = [i for i, t in enumerate(ids) if t == self.image_token_id]
        expected = 0 if grid is None else grid.shape[0]
        if len(places) != expected:
            raise AdapterError(f"sample {n}: the chat template produced {len(places)} image "
                               f"placeholders for {expected} images")
        if grid is None:
            return ids
        tokens = (grid.prod(-1) // self.merge_size ** 2).tolist()
        out, start = [], 0
        for place, count in zip(places, tokens):
            out.extend(ids[start:place])
            out.extend([self.image_token_id] * count)
            start = place + 1
        out.extend(ids[start:])
        return out

    # --------------------------------------------------------------- positions
    def positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        """M-RoPE position ids (3, N, L) over the unpadded tokens; padding gets 0."""
        if image_grid_thw is None:
            # text only: plain positions over the unpadded tokens, the same on all three axes
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, L)
            return pos.unsqueeze(0).expand(3, -1, -1)
        position_ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return position_ids

    # ---------------------------------------------------------------- decoding
    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """Completion texts without special tokens (the EOS included)."""
        out = []
        for ids, m in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, keep in zip(ids, m) if keep]
            out.append(self.tokenizer.decode(kept, skip_special_tokens=True))
        return out

    # ------------------------------------------------------- training forward
    def logprobs(self, batch: PromptBatch, prompt_index: torch.Tensor, completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor, temperature: float = 1.0,
                 with_entropy: bool = False):
        """Per-token log-probs (b, T) of `b` completions of prompts `prompt_index`, with grad.

        With `with_entropy`, a pair: the log-probs and the entropies (b, T) of the (tempered,
        vision-masked) next-token distributions at the same positions, also with grad.

        One call is one micro-batch. Each of its prompts (and so each image) goes through the
        model once; its completions continue from the prompt's repeated KV cache. Positions
        where `completion_mask` is 0 hold 0.
        """
        device = self.device
        prompts, rows = torch.unique(prompt_index, return_inverse=True)  # (p,), (b,)
        sub = batch.select(prompts.tolist())
        ids = sub.input_ids.to(device)  # (p, L)
        attn = sub.attention_mask.to(device)
        mm = sub.mm_token_type_ids.to(device)
        pixel_values = grid = None
        if sub.image_grid_thw is not None:
            pixel_values = sub.pixel_values.to(device, self.model.dtype)
            grid = sub.image_grid_thw.to(device)
        positions = self.positions(ids, attn, mm, grid)  # (3, p, L)
        row_images = sub.image_indices(rows.tolist()) if grid is not None else None
        return self.scorer(ids, attn, positions, mm, pixel_values, grid, rows.to(device), row_images,
                           completion_ids.to(device), completion_mask.to(device), temperature,
                           with_entropy)


    def completion_logprobs(self, batch: PromptBatch, rollout: Rollout, temperature: float = 1.0,
                            max_tokens: int = 16384) -> torch.Tensor:
        """The training forward over a whole rollout, micro-batch by micro-batch. (B, T)"""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
        for idx in micro_batches(batch, rollout.prompt_index, rollout.completion_mask, max_tokens):
            mask = rollout.completion_mask[idx]
            t = max(1, int(mask.sum(-1).max()))  # trim right padding of this micro-batch
            lp = self.logprobs(batch, rollout.prompt_index[idx], rollout.completion_ids[idx, :t],
                               mask[:, :t], temperature)
            out[idx, :t] = lp.float().cpu()
        return out

    # ------------------------------------------------- what the trainer may change
    def freeze_vision(self) -> None:
        """Keep the vision encoder's weights fixed (no gradients, no optimizer state)."""
        self.facts.vision_module(self.model).requires_grad_(False)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass; the training forward then runs full rows.

        transformers also hooks every sub-model's input embedding so that its output requires
        grad, the vision tower's patch embedding included: a frozen tower (LoRA, freeze_vision)
        then records its whole forward for autograd and the backward recomputes and runs
        through all its blocks for gradients nothing uses (at 2B shape: most of the step on
        CPU). Our checkpointing is non-reentrant, which needs no input that requires grad, so
        that one hook is removed: a trainable tower still gets its gradients via its weights.
        """
        embed = _input_embedding(self.facts.vision_module(self.model))
        before = set(embed._forward_hooks) if embed is not None else set()
        self.facts.enable_checkpointing(self.model)
        for key in set(embed._forward_hooks) - before if embed is not None else ():
            del embed._forward_hooks[key]
        self.model.config.use_cache = True  # generation still uses the KV cache

    @property
    def training_forward(self) -> str:
        """Which training forward `logprobs` runs now: "shared_prefix" (each prompt once, its
        cache indexed per completion) or "full_rows" (gradient checkpointing, or a cache type
        gpg_vlm.models.cache cannot index)."""
        return self._token_scorer.path()

    def set_scorer(self, scorer: torch.nn.Module) -> None:
        """Use `scorer` (this adapter's TokenScorer wrapped for data parallelism) for `logprobs`."""
        self.scorer = scorer


def _input_embedding(module) -> torch.nn.Module | None:
    """`module.get_input_embeddings()`, or None where it has none."""
    try:
        embed = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embed if isinstance(embed, torch.nn.Module) else None


def load(path, **kwargs) -> VLMAdapter:
    """Shorthand for VLMAdapter.from_pretrained."""
    return VLMAdapter.from_pretrained(path, **kwargs)


__all__ = ["AdapterError", "DTYPES", "VLMAdapter", "load", "read_chat_template"]
