"""VLLMRollout: the G completions per prompt sampled by a vLLM engine in this process (colocated).

The engine is built once, with the model directory's config, tokenizer and processor and the
policy's weights handed over in memory (vllm_weights.POLICY_LOAD_FORMAT: the directory's weight
files are never read, so their layout does not matter). The trainer calls `sync_weights(model)`
after every optimizer step, which loads the policy's current weights (full tensors: FSDP2
shards gathered, LoRA deltas merged, per family in the released checkpoints' layout, see
vllm_weights.CHECKPOINT_LAYOUT) through vLLM's `reload_weights`, repacks what vLLM's CPU MoE
kernel reads packed (vllm_weights.repack_cpu_moe), and then resets every cache that could
still answer from the old weights: the prefix (KV) cache, whose blocks are keyed by token ids
only, the encoder cache of image features and the multi-modal processor cache.

What makes its samples the policy's own:
- Prompts are the adapter's: its token ids (each image's run of `<|image_pad|>` collapsed to the
  one placeholder vLLM expands) and the adapter's already-fitted images, so vLLM's processor
  resizes nothing. vLLM's expanded prompt is compared with the adapter's, token by token, and a
  difference stops the run: it would mean another image grid and other log-probs.
- Each output is placed by the request id the engine assigned to that prompt, not by its place
  in vLLM's list: prompts of one batch often have equal token ids (the same text, other
  images), so the check above cannot see an output handed to the wrong prompt.
- Suppressed ids (vision tokens, ids the tokenizer cannot produce) are outside
  `allowed_token_ids`, so they are never sampled and carry no probability, as in the training
  forward's masked softmax.
- Log-probs are vLLM's `processed_logprobs`: after temperature and that mask, which is the
  training forward's distribution. With top-k / top-p (or min_new_tokens) vLLM reports the
  log-probs of the filtered distribution it sampled from, where the HF loop reports the
  unfiltered one; the trainer's `rollout_logprob_diff` shows the difference.
- Randomness: each `generate` reseeds the engine's sampler from the caller's generator (or,
  without one, from a generator seeded with the engine seed), with this process's global RNG
  saved and restored around it. The same seed and calls give the same completions, and a resumed
  run that restores its generator continues the same stream. Per-request seeds are not used:
  they crashed the CPU engine on large batches.

GPU options: `gpu_memory_utilization` (vLLM's share of the device; the policy and optimizer
need the rest), `sleep` (vLLM's level-1 sleep between rollouts: its weights move to CPU memory
and its KV cache is freed while the trainer runs), `tensor_parallel_size` (the engine spans that
many GPUs through the trainer's own processes).

Side effects of an engine in this process, on CPU: vLLM's CPU worker replaces
`torch.set_num_threads` by a no-op and binds this process's memory to its NUMA node; the
engine's distributed state (a one-process gloo group, unless the trainer already has one) is
torn down by `close`.

Families: all six are served. Refused at start (check_servable, one line): qwen3_5 and
qwen3_5_moe on CPU unless bfloat16 with linear-attention head dims 64 or 128 (vLLM's CPU Gated
DeltaNet kernel). The three dense families are tested in fp32 (tests/test_vllm_rollout.py);
qwen3_vl_moe in fp32, and qwen3_5, qwen3_5_moe and qwen3_vl_moe in bfloat16 in
tests/test_vllm_families.py, where the MoE families' bf16 results carry one caveat of their own:
where two router logits are closer than bf16 noise, the engine and the training forward may pick
different experts for a token (measured there; `rollout_logprob_diff` shows it in a run).

Deliberately left out: a separate vLLM server process, stop strings, beam search, and
per-request LoRA in vLLM (LoRA is merged into the weights that are synced).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import torch

from gpg_vlm.models.batch import PromptBatch, Rollout
from gpg_vlm.rollout import RolloutError, RolloutSetupError
from gpg_vlm.rollout.vllm_weights import (POLICY_LOAD_FORMAT, checkpoint_weights, full_weights,
                                          repack_cpu_moe, starting_from)

INSTALL_HINT = ("pip install 'gpg_vlm[vllm]' (GPU), or build the CPU environment with "
                "`make test-vllm` (tools/vllm_venv.sh)")


# Families vLLM 0.32 runs but this engine cannot feed correctly, with the reason (found by
# trying); none at present: the MoE families' layouts and vLLM's CPU MoE repacking are handled
# in vllm_weights (tests/test_vllm_families.py)
UNSERVED: dict[str, str] = {}
# Config values vLLM reads that transformers' config of the family lacks, with transformers' own
# behaviour: transformers 5's qwen3_vl_moe router always renormalises its top-k weights (and its
# config has no norm_topk_prob), while vLLM's qwen3_vl_moe reads norm_topk_prob and fails without it
HF_OVERRIDES = {"qwen3_vl_moe": {"text_config": {"norm_topk_prob": True}}}
# Hybrid families whose Gated DeltaNet layers vLLM's CPU build runs only in bfloat16, and only
# with linear-attention head dims of 64 or 128 ("Unexpected head dim size" at the first generate)
GDN_FAMILIES = ("qwen3_5", "qwen3_5_moe")
GDN_CPU_HEAD_DIMS = (64, 128)


def require_vllm() -> None:
    """Raise RolloutSetupError naming what to install when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RolloutSetupError(f"rollout: vllm needs vLLM, which is not installed: {INSTALL_HINT}") \
            from None


def check_servable(adapter, *, sleep: bool = False, tensor_parallel_size: int = 1) -> None:
    """Raise RolloutSetupError when vLLM is missing or cannot serve this model with these settings."""
    require_vllm()
    cuda = torch.cuda.is_available()
    family = getattr(adapter.model.config, "model_type", "")
    if family in UNSERVED:
        raise RolloutSetupError(f"rollout: vllm cannot serve {family}: {UNSERVED[family]}; use rollout: hf")
    if family in GDN_FAMILIES and not cuda and adapter.model.dtype != torch.bfloat16:
        raise RolloutSetupError(
            f"rollout: vllm cannot serve {family} in {str(adapter.model.dtype).removeprefix('torch.')} "
            "on CPU: vLLM's CPU Gated DeltaNet kernel requires bfloat16 (dtype: bfloat16, or rollout: hf)")
    if family in GDN_FAMILIES and not cuda:
        text = getattr(adapter.model.config, "text_config", adapter.model.config)
        dims = {text.linear_key_head_dim, text.linear_value_head_dim}
        if not dims <= set(GDN_CPU_HEAD_DIMS):
            raise RolloutSetupError(
                f"rollout: vllm cannot serve {family} with linear-attention head dims "
                f"{sorted(dims)} on CPU: vLLM's CPU Gated DeltaNet kernel runs only "
                f"{' and '.join(map(str, GDN_CPU_HEAD_DIMS))}; use rollout: hf")
    if sleep and not cuda:
        raise RolloutSetupError("vllm_sleep: vLLM's sleep mode needs a GPU; set vllm_sleep: false on CPU")
    if tensor_parallel_size > 1 and not cuda:
        raise RolloutSetupError(f"vllm_tensor_parallel_size {tensor_parallel_size}: tensor parallelism "
                                "needs GPUs; use 1 on CPU")
    if not cuda:
        text = getattr(adapter.model.config, "text_config", adapter.model.config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        supported = _cpu_head_sizes()
        if supported and head_dim not in supported:
            raise RolloutSetupError(
                f"rollout: vllm cannot serve this model on CPU: head_dim {head_dim} is not one of "
                f"vLLM's CPU attention sizes {supported} (tiny sizes xs and s have 16; s32 and m have "
                "32); use such a model or rollout: hf")


def _llm_options(adapter, model_dir, seed, gpu_memory_utilization, sleep, tensor_parallel_size,
                 max_model_len, max_images_per_prompt) -> dict:
    """The arguments of vllm.LLM for this adapter's model."""
    cuda = torch.cuda.is_available()
    options = dict(
        model=str(model_dir), tokenizer=str(model_dir), seed=seed,
        # the policy's weights, handed over in memory (vllm_weights.starting_from): the
        # directory's weight files are never read (their layout need not be vLLM's)
        load_format=POLICY_LOAD_FORMAT,
        dtype=str(adapter.model.dtype).removeprefix("torch."),
        max_model_len=max_model_len,
        # the log-probs of the tempered, masked distribution: the training forward's
        logprobs_mode="processed_logprobs",
        # every sampling setting comes from the trainer, none from generation_config.json
        generation_config="vllm",
        limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
        # the adapter's pixel bounds, so the processor keeps the adapter's fitted sizes
        mm_processor_kwargs={"size": {"shortest_edge": adapter.min_pixels,
                                      "longest_edge": adapter.max_pixels}},
        enforce_eager=not cuda,  # the CPU build has no graph capture
        tensor_parallel_size=tensor_parallel_size,
    )
    family = getattr(adapter.model.config, "model_type", "")
    if family in HF_OVERRIDES:
        options["hf_overrides"] = HF_OVERRIDES[family]
    if cuda:
        options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
    return options


def _cpu_head_sizes() -> list[int]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine itself refuse
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


class VLLMRollout:
    """A vLLM engine over the adapter's model directory, fed the adapter's prompts."""

    def __init__(self, adapter, model_dir, *, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 sleep: bool = False, tensor_parallel_size: int = 1, max_model_len: int = 4096,
                 max_images_per_prompt: int = 8):
        check_servable(adapter, sleep=sleep, tensor_parallel_size=tensor_parallel_size)
        # colocated: the engine runs in this process, so weights are handed over in memory and
        # its sampler's RNG is this process's (reseeded per call, see generate)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":  # the start hands weights in memory
            raise RolloutSetupError("rollout: vllm runs its engine in the training process: unset "
                                    "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")
        # the CPU engine's KV cache size in GiB (its default would take a share of RAM)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.adapter = adapter
        self.sleep = sleep
        self.allowed = (~adapter.suppressed).nonzero().squeeze(-1).tolist()
        self._seeds = torch.Generator().manual_seed(seed)
        self._owns_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        options = _llm_options(adapter, model_dir, seed, gpu_memory_utilization, sleep,
                               tensor_parallel_size, max_model_len, max_images_per_prompt)
        if not self._owns_dist:  # inside the trainer's own process group (torchrun / accelerate)
            options["distributed_executor_backend"] = "external_launcher"
        try:
            with starting_from(list(checkpoint_weights(adapter.model))):
                self.llm = LLM(**options)
        except Exception as exc:  # noqa: BLE001 - vLLM's start-up errors vary; one line says which
            raise RolloutSetupError(f"rollout: vllm could not start on {model_dir}: "
                                    f"{type(exc).__name__}: {_first_line(exc)}") from exc
        self._asleep: set[str] = set()
        self._sleep()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, batch: PromptBatch, group_size: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, min_new_tokens: int = 0) -> Rollout:
        """Sample `group_size` completions for each prompt of `batch` (rows of a prompt contiguous)."""
        from vllm import SamplingParams

        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"group_size ({group_size}) and max_new_tokens ({max_new_tokens}) "
                             "must be >= 1")
        prompts, expected = self._prompts(batch)
        params = SamplingParams(
            n=group_size, temperature=max(float(temperature), 0.0), top_p=top_p,
            top_k=max(int(top_k), 0), max_tokens=max_new_tokens, min_tokens=min_new_tokens,
            logprobs=0, allowed_token_ids=self.allowed,
            stop_token_ids=list(self.adapter.eos_token_ids), detokenize=False)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator or self._seeds))
        # vLLM numbers this call's requests from here, in the order of `prompts`
        first_id = getattr(getattr(self.llm, "request_counter", None), "counter", None)
        self._wake()
        try:
            with _seeded_rng(seed):
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - any engine failure ends the run the same way
            raise RolloutError(f"vLLM engine failed while sampling: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc
        self._sleep()
        return self._rollout(_by_request(outputs, len(prompts), first_id), expected, group_size)

    def _prompts(self, batch: PromptBatch) -> tuple[list[dict], list[list[int]]]:
        """vLLM token prompts with their images, and the adapter's full prompt ids to check against."""
        images = batch.images
        if len(images) != batch.num_prompts:
            raise ValueError("the PromptBatch carries no fitted images (PromptBatch.images); "
                             "encode it with VLMAdapter.encode")
        prompts, expected = [], []
        image_token = self.adapter.image_token_id
        for i in range(batch.num_prompts):
            ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            # one placeholder per image: vLLM expands it to that image's token count itself
            collapsed = [t for j, t in enumerate(ids) if not (t == image_token and j and ids[j - 1] == t)]
            prompt = {"prompt_token_ids": collapsed}
            if images[i]:
                prompt["multi_modal_data"] = {"image": list(images[i])}
            prompts.append(prompt)
            expected.append(ids)
        return prompts, expected

    def _rollout(self, outputs, expected: list[list[int]], group_size: int) -> Rollout:
        """The engine's outputs as a Rollout (B rows, prompt by prompt)."""
        rows, logps, truncated = [], [], []
        for i, out in enumerate(outputs):
            if list(out.prompt_token_ids) != expected[i]:
                raise RolloutError(
                    f"prompt {i}: vLLM's prompt ({len(out.prompt_token_ids)} tokens) differs from "
                    f"the adapter's ({len(expected[i])}): its image processor saw other image sizes")
            completions = sorted(out.outputs, key=lambda c: c.index)
            if [c.index for c in completions] != list(range(group_size)):
                raise RolloutError(f"prompt {i}: vLLM returned completions "
                                   f"{[c.index for c in completions]}, not 0..{group_size - 1}")
            for c in completions:
                ids = list(c.token_ids)
                rows.append(ids)
                logps.append([c.logprobs[j][t].logprob for j, t in enumerate(ids)])
                truncated.append(c.finish_reason == "length")
        b, t = len(rows), max(1, max(len(r) for r in rows))
        pad = self.adapter.pad_token_id
        completion_ids = torch.full((b, t), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
        logprobs = torch.zeros((b, t), dtype=torch.float32)  # (B, T)
        for r, (ids, lp) in enumerate(zip(rows, logps)):
            completion_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, :len(ids)] = 1
            logprobs[r, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        prompt_index = torch.arange(len(outputs)).repeat_interleave(group_size)  # (B,)
        texts = self.adapter.decode(completion_ids, mask)
        return Rollout(prompt_index, completion_ids, mask, logprobs, texts,
                       torch.tensor(truncated, dtype=torch.bool))

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into the engine and drop everything computed with the old ones."""
        weights = list(checkpoint_weights(model))
        self._wake("weights")
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            self.llm.collective_rpc(repack_cpu_moe)  # vLLM's CPU MoE kernel: see vllm_weights
            # reload_weights clears the worker's encoder cache; the scheduler keeps its own
            # record of cached encoder outputs, and the prefix cache is keyed by tokens only
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("the prefix cache could not be reset (requests still running)")
        except Exception as exc:  # noqa: BLE001
            raise RolloutError(f"vLLM engine failed while loading weights: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc

    def _wake(self, *tags: str) -> None:
        """Bring back what sleep mode released (all of it by default) before the engine is used."""
        todo = [t for t in (tags or ("weights", "kv_cache")) if t in self._asleep]
        if todo:
            self.llm.wake_up(todo)
            self._asleep -= set(todo)

    def _sleep(self) -> None:
        """Level-1 sleep while the trainer runs: weights to CPU memory, KV cache freed."""
        if self.sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def close(self) -> None:
        """Shut the engine down (and vLLM's process groups, where it created them)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if self._owns_dist:
            destroy_distributed_environment()


def _by_request(outputs, n: int, first_id: int | None) -> list:
    """`outputs` re-placed so that item i answers prompt i, by the id vLLM gave its request.

    `first_id` is the engine's request counter before the call (requests are numbered in
    submission order); None (a vLLM without that counter) keeps vLLM's own order."""
    if len(outputs) != n:
        raise RolloutError(f"vLLM returned {len(outputs)} outputs for {n} prompts")
    if first_id is None:
        return list(outputs)
    placed = [None] * n
    for out in outputs:
        i = int(out.request_id) - first_id if str(out.request_id).isdigit() else -1
        if not 0 <= i < n or placed[i] is not None:
            raise RolloutError(f"vLLM returned an output for request {out.request_id!r}, not one "
                               f"of this call's {first_id}..{first_id + n - 1} (or twice)")
        placed[i] = out
    return placed


@contextmanager
def _seeded_rng(seed: int):
    """This process's RNG seeded with `seed` inside, restored after (the sampler runs here)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


__all__ = ["VLLMRollout", "check_servable", "full_weights", "require_vllm"]
