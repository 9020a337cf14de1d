"""The VLM adapter: the one place that knows transformers and the Qwen-VL families.

It turns samples (images + text) into model inputs, samples G completions per prompt with
their per-token log-probs, and computes the per-token log-probs of given completions with
gradients (the training forward). Everything else in gpg_vlm sees plain tensors and strings.

Shape letters: N prompts, G completions per prompt, B = N*G completions, L prompt tokens,
T completion tokens, P image patches, I images, V vocabulary.

How the facts that bite are handled:
- Images are resized here with the qwen-vl-utils rules (`gpg_vlm.resize`) before the image
  processor, so the processor's own resize is a no-op and `model_image_sizes` is exactly the
  frame Qwen2.5-VL writes its pixel boxes in.
- The processor classes of transformers 5 cannot be built without torchvision (their video
  processor needs it), so prompts are built from the three parts a checkpoint ships: the
  tokenizer, the image processor and the chat template. Each `<|image_pad|>` placeholder is
  expanded to `grid.prod() // merge**2` tokens and `mm_token_type_ids` marks them.
- `pixel_values` is one flat tensor of patches for all images. `PromptBatch.select` slices it
  by each image's patch count, never by a uniform repeat.
- Rollout prefills the N prompts once and repeats the KV cache G times; the training forward
  encodes each image once per micro-batch and hands the features to every completion of its
  prompt through `mm_encoder_outputs`. Positions (M-RoPE) are always computed here from
  `input_ids`, `mm_token_type_ids` (zeros over the completion) and the attention mask
  (prompt mask + completion mask), and passed explicitly, so no cached model state is used.
- Vision tokens (and ids the tokenizer does not know) are suppressed in sampling and masked
  identically in the training logits, so sampled and trained log-probs are the same
  distribution. Log-probs are those of `softmax(logits / temperature)` over the allowed
  vocabulary; top-k / top-p shape what is sampled, not the reported log-probs.

Deliberately left out: video inputs, beam search, and any processor or template code paths
that are not Qwen-VL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from gpg_vlm.resize import MAX_TOKENS, MIN_TOKENS, fit_image

FAMILIES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

# The coordinate frame each family writes boxes in (see gpg_vlm.rewards.grounding).
BOX_FORMATS = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs_resized", "qwen3_vl": "rel1000"}

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>")
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterError(ValueError):
    """A checkpoint or a sample the adapter cannot use; the message names which and why."""


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


def _read_chat_template(path: Path, tokenizer) -> str:
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
    """A loaded Qwen-VL checkpoint with everything needed to sample and score completions."""

    def __init__(self, model, tokenizer, image_processor, chat_template: str, family: str,
                 min_pixels: int | None = None, max_pixels: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.family = family
        self.box_format = BOX_FORMATS[family]
        vision = model.config.vision_config
        self.merge_size = vision.spatial_merge_size
        self.factor = vision.patch_size * vision.spatial_merge_size
        self.min_pixels = min_pixels or MIN_TOKENS * self.factor ** 2
        self.max_pixels = max_pixels or MAX_TOKENS * self.factor ** 2
        if self.min_pixels > self.max_pixels:
            raise AdapterError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*VISION_TOKENS, *EOS_TOKENS)}
        self.image_token_id = model.config.image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else ids["<|endoftext|>"]
        self.eos_token_ids = [ids[t] for t in EOS_TOKENS if ids[t] is not None]
        vocab = model.get_output_embeddings().weight.shape[0]
        suppressed = torch.zeros(vocab, dtype=torch.bool)
        for t in VISION_TOKENS:
            if ids[t] is not None and ids[t] < vocab:
                suppressed[ids[t]] = True
        suppressed[len(tokenizer):] = True  # rows the tokenizer cannot produce or decode
        self.suppressed = suppressed  # (V,)
        # the training forward; a trainer may replace it by a data-parallel wrapper of itself
        self.scorer = TokenScorer(model, suppressed)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, dtype: str = "float32", attn_implementation: str | None = None,
                        device: str | torch.device | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, trust_remote_code: bool = False
                        ) -> "VLMAdapter":
        """Load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint directory (family from config)."""
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
        model = _loading(path / "model.safetensors", getattr(transformers, FAMILIES[family]).from_pretrained,
                         path, dtype=DTYPES[dtype], use_safetensors=True,
                         attn_implementation=attn_implementation or _default_attention(), **remote)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        tokenizer = _loading(path / "tokenizer.json", AutoTokenizer.from_pretrained, path, **remote)
        if tokenizer.convert_tokens_to_ids("<|image_pad|>") != model.config.image_token_id:
            raise AdapterError(f"{path}: the tokenizer does not know <|image_pad|> as id "
                               f"{model.config.image_token_id}: tokenizer.json is missing or foreign")
        image_processor = _loading(path / "preprocessor_config.json", AutoImageProcessor.from_pretrained,
                                   path, **remote)
        template = _read_chat_template(path, tokenizer)
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
        image_sizes, model_sizes, counts, texts = [], [], [], []
        for n, sample in enumerate(samples):
            if not isinstance(sample.text, str):
                raise AdapterError(f"sample {n}: text must be a string, got {type(sample.text).__name__}")
            for token in VISION_TOKENS:
                if token in sample.text or (sample.system and token in sample.system):
                    raise AdapterError(f"sample {n}: its text contains the vision token {token}; "
                                       "images are placed by the adapter, not by the text")
            fitted = [fit_image(im, self.factor, self.min_pixels, self.max_pixels)
                      for im in sample.images]
            text = self.tokenizer.apply_chat_template(
                self.messages(sample), chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=True)
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
    def _positions(self, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
        """M-RoPE position ids (3, N, L) over the unpadded tokens; padding gets 0."""
        if image_grid_thw is None:
            # text only: plain positions over the unpadded tokens, the same on all three axes
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, L)
            return pos.unsqueeze(0).expand(3, -1, -1)
        position_ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask)
        return position_ids

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, batch: PromptBatch, group_size: int, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, min_new_tokens: int = 0) -> Rollout:
        """Sample `group_size` completions for each prompt of `batch`.

        The prompts are prefilled once (each image encoded once) and the KV cache is repeated
        G times. `temperature <= 0` samples greedily. `min_new_tokens` forbids the EOS tokens
        for that many first tokens (with `max_new_tokens` equal to it, every completion has
        exactly that length: the benchmark uses it to make generation work equal); like top-k /
        top-p it shapes what is sampled, not the reported log-probs.
        """
        if group_size < 1:
            raise AdapterError(f"group_size must be >= 1, got {group_size}")
        if max_new_tokens < 1:
            raise AdapterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        device = self.device
        n_prompts = batch.num_prompts
        b = n_prompts * group_size
        input_ids = batch.input_ids.to(device)
        attn = batch.attention_mask.to(device)
        mm = batch.mm_token_type_ids.to(device)
        grid = batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None
        pos = self._positions(input_ids, attn, mm, grid)  # (3, N, L)
        out = self.model(
            input_ids=input_ids, attention_mask=attn, position_ids=pos,
            pixel_values=batch.pixel_values.to(device, self.model.dtype) if grid is not None else None,
            image_grid_thw=grid, mm_token_type_ids=mm, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(group_size)
        logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # (B, V)
        attn = attn.repeat_interleave(group_size, 0)  # (B, L)
        next_pos = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(group_size, 0)  # (B,)
        suppressed = self.suppressed.to(device)
        eos = torch.tensor(self.eos_token_ids, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, alive = [], [], []
        for step in range(max_new_tokens):
            scores = self._scores(logits, temperature, suppressed)  # (B, V)
            logp = torch.log_softmax(scores, dim=-1)
            if step < min_new_tokens:
                scores = scores.index_fill(-1, eos, float("-inf"))
            if temperature <= 0:
                token = scores.argmax(-1)
            else:
                probs = torch.softmax(_filter_top_k_top_p(scores, top_k, top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            alive.append(~finished)
            tokens.append(token)
            logps.append(logp.gather(-1, token[:, None]).squeeze(-1))
            finished = finished | torch.isin(token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones((b, 1))], dim=-1)
            step_pos = (next_pos + step).view(1, b, 1).expand(3, b, 1)
            out = self.model(input_ids=token[:, None], attention_mask=attn, position_ids=step_pos,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
        completion_ids = torch.stack(tokens, dim=1).cpu()  # (B, T)
        mask = torch.stack(alive, dim=1).long().cpu()  # (B, T)
        logprobs = (torch.stack(logps, dim=1).float().cpu() * mask)  # (B, T)
        truncated = ~finished.cpu()
        texts = self.decode(completion_ids, mask)
        prompt_index = torch.arange(n_prompts).repeat_interleave(group_size)
        return Rollout(prompt_index, completion_ids, mask, logprobs, texts, truncated)

    def _scores(self, logits: torch.Tensor, temperature: float, suppressed: torch.Tensor):
        """Tempered logits in fp32 with the suppressed ids at -inf. (..., V) -> (..., V)"""
        scores = logits.float()
        if temperature > 0:
            scores = scores / temperature
        return scores.masked_fill(suppressed, float("-inf"))

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
        positions = self._positions(ids, attn, mm, grid)  # (3, p, L)
        row_images = sub.image_indices(rows.tolist()) if grid is not None else None
        return self.scorer(ids, attn, positions, mm, pixel_values, grid, rows.to(device), row_images,
                           completion_ids.to(device), completion_mask.to(device), temperature,
                           with_entropy)

    def micro_batches(self, batch: PromptBatch, prompt_index: torch.Tensor,
                      completion_mask: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
        """Split completions, in order, into micro-batches of at most `max_tokens` padded tokens.

        Consecutive rows stay together, so the G completions of a prompt share a micro-batch
        (and one image encoding) whenever they fit. A row longer than the budget goes alone.
        """
        prompt_len = batch.prompt_lengths()[prompt_index].tolist()  # (B,)
        completion_len = completion_mask.sum(-1).tolist()
        groups, current, width = [], [], 0
        for i, (lp, lc) in enumerate(zip(prompt_len, completion_len)):
            new_width = max(width, lp + lc)
            if current and new_width * (len(current) + 1) > max_tokens:
                groups.append(torch.tensor(current, dtype=torch.long))
                current, new_width = [], lp + lc
            current.append(i)
            width = new_width
        if current:
            groups.append(torch.tensor(current, dtype=torch.long))
        return groups

    def completion_logprobs(self, batch: PromptBatch, rollout: Rollout, temperature: float = 1.0,
                            max_tokens: int = 16384) -> torch.Tensor:
        """The training forward over a whole rollout, micro-batch by micro-batch. (B, T)"""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
        for idx in self.micro_batches(batch, rollout.prompt_index, rollout.completion_mask, max_tokens):
            mask = rollout.completion_mask[idx]
            t = max(1, int(mask.sum(-1).max()))  # trim right padding of this micro-batch
            lp = self.logprobs(batch, rollout.prompt_index[idx], rollout.completion_ids[idx, :t],
                               mask[:, :t], temperature)
            out[idx, :t] = lp.float().cpu()
        return out


class TokenScorer(torch.nn.Module):
    """The training forward as a module, so a data-parallel wrapper sees every call.

    Shared prefix (the default): the p prompts of the micro-batch go through the model once,
    with gradients, their KV cache is indexed out to the b completion rows (`rows`), and only
    the completion tokens run on top of it; gradients from all G completions flow back into
    their prompt's one pass. With gradient checkpointing (which cannot keep a cache) each row
    runs prompt + completion in full, with each image still encoded once (`row_images`).
    Returns the log-probs (b, T) of the completion tokens under the tempered,
    vision-token-masked distribution; 0 where `completion_mask` is 0.
    """

    def __init__(self, model, suppressed: torch.Tensor):
        super().__init__()
        self.model = model
        self.suppressed = suppressed  # (V,) bool, not a parameter

    def forward(self, prompt_ids, prompt_mask, prompt_positions, prompt_mm, pixel_values,
                image_grid_thw, rows, row_images, completion_ids, completion_mask,
                temperature: float, with_entropy: bool = False):
        b, t = completion_ids.shape
        # completion tokens are text: their positions continue from the prompt's largest one
        next_pos = prompt_positions.amax(dim=(0, 2)) + 1  # (p,)
        steps = torch.arange(t, device=completion_ids.device)
        completion_pos = (next_pos[rows, None] + steps).unsqueeze(0).expand(3, -1, -1)  # (3, b, T)
        mask = torch.cat([prompt_mask[rows], completion_mask.long()], dim=1)  # (b, L+T)
        if _activation_checkpointing(self.model):
            hidden = self._full_rows(prompt_ids, prompt_positions, prompt_mm, pixel_values,
                                     image_grid_thw, rows, row_images, completion_ids, mask,
                                     completion_pos)
        else:
            hidden = self._shared_prefix(prompt_ids, prompt_mask, prompt_positions, prompt_mm,
                                         pixel_values, image_grid_thw, rows, completion_ids, mask,
                                         completion_pos)  # (b, T, H)
        logits = self.model.lm_head(hidden).float()  # (b, T, V)
        if temperature > 0:
            logits = logits / temperature
        logits = logits.masked_fill(self.suppressed.to(logits.device), float("-inf"))
        all_logp = torch.log_softmax(logits, dim=-1)  # (b, T, V)
        logp = all_logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        keep = completion_mask.bool()
        logp = torch.where(keep, logp, torch.zeros_like(logp))  # (b, T)
        if not with_entropy:
            return logp
        finite = all_logp.masked_fill(self.suppressed.to(all_logp.device), 0.0)  # no 0 * -inf
        entropy = -(finite.exp() * finite).sum(-1)  # (b, T); suppressed tokens add 1 * 0
        return logp, torch.where(keep, entropy, torch.zeros_like(entropy))

    def _shared_prefix(self, prompt_ids, prompt_mask, prompt_positions, prompt_mm, pixel_values,
                       image_grid_thw, rows, completion_ids, mask, completion_pos):
        """Hidden states (b, T, H) that predict each completion token, prompts run once."""
        out = self.model.model(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            mm_token_type_ids=prompt_mm, use_cache=True)
        last = out.last_hidden_state[rows, -1:]  # (b, 1, H): predicts completion token 0
        if completion_ids.shape[1] == 1:
            return last
        cache = out.past_key_values
        cache.batch_select_indices(rows)  # each row continues from its own prompt's keys/values
        rest = self.model.model(
            input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1],
            position_ids=completion_pos[:, :, :-1], past_key_values=cache, use_cache=True,
        ).last_hidden_state  # (b, T-1, H): token j predicts token j+1
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


def load(path, **kwargs) -> VLMAdapter:
    """Shorthand for VLMAdapter.from_pretrained."""
    return VLMAdapter.from_pretrained(path, **kwargs)


__all__ = ["AdapterError", "BOX_FORMATS", "PromptBatch", "Rollout", "Sample", "VLMAdapter", "load"]
