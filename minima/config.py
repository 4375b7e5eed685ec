"""One typed config for a run: a YAML recipe plus ``key.sub=value`` overrides, validated before any model is built.

A recipe is a built-in name (``tiny_cpu``, ``llama2_7b_to_3b``: the YAML files in ``minima/recipes``) or a path to a
YAML file. Overrides are ``section.field=value`` with the value parsed as YAML (``teacher=null``,
``optim.lr=1e-3``, ``student.arch.hidden_size=128``). Every error names the key and says what to write instead.

The main knobs are given once (tokens per optimizer step, micro-batch, sequence length, total tokens); everything
derived from them and the world size (accumulation steps, DeepSpeed's batch keys, total steps, warmup steps) is
computed by :func:`derive` and printed at start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A recipe or override that cannot describe a valid run; the message says which key and what to write."""


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: a local Hugging Face directory, or an architecture for a freshly initialised model."""

    path: str | None = None
    """Local Hugging Face causal-LM directory (config.json + weights), loaded with ``from_pretrained``."""
    arch: dict[str, Any] | None = None
    """Transformers config fields (``model_type`` plus sizes) for a randomly initialised model (tiny test models)."""

    def __post_init__(self) -> None:
        if self.path is None and self.arch is None:
            raise ConfigError("a model needs 'path' (a local HF model directory) or 'arch' (config fields)")
        if self.path is not None and self.arch is not None:
            raise ConfigError(
                "both 'path' and 'arch' are set (a recipe's 'arch' stays when an override adds 'path'): replace the"
                " section, e.g. student='{path: DIR}', or add student.arch=null"
            )
        if self.arch is not None and "model_type" not in self.arch:
            raise ConfigError("'arch' needs a 'model_type' (e.g. llama) next to its sizes")


PLACEMENTS = ("auto", "replicated", "node", "zero3")


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The frozen teacher: where it comes from, and how its weights are spread over the GPUs."""

    placement: Literal["auto", "replicated", "node", "zero3"] = "auto"
    """replicated = a whole copy per GPU, no communication; node = ZeRO-3 sharded over the GPUs of each node
    (ZeRO++ hierarchical partitioning: every all-gather stays inside a node); zero3 = sharded over all GPUs (least
    memory, an all-gather of the whole teacher per micro-batch); auto = the first of these that the memory plan
    (minima.memory) fits on the GPU."""


@dataclass(frozen=True)
class DataConfig:
    """Pre-tokenised shards written by ``tools/prepare_data.py``."""

    dir: str
    """Prepared directory holding ``train/``, ``valid/`` and ``tokenizer/``."""
    seq_len: int = 1024
    """Tokens per training window (the model's context during training)."""
    seed: int = 1234
    """Seed of the window order; the order of epoch e is a function of (seed, e)."""
    verify_checksums: bool = False
    """Also check every shard's sha256 at start (split across ranks). Shards are hashed once, when prepared; at start
    only sizes and first and last bytes are checked unless this is set (tools/verify_data.py checks a directory)."""
    sources: dict[str, float] | None = None
    """A mixture: source name -> weight (e.g. {pile: 0.6, github: 0.1, wudao: 0.3}), each source prepared into
    data.dir/NAME by tools/prepare_data.py --source NAME; weights are normalised and hold over every span of steps.
    None = the one source in data.dir/train and data.dir/valid."""
    documents: Literal["auto", "off", "bos", "isolated"] = "auto"
    """Document-aware windows: bos = every window starts with BOS (where the tokenizer's family prepends one);
    isolated = also restart positions and attention at each document; off = windows as stored; auto = bos where the
    documents were prepared with BOS, else off. Chat data is always read as packed conversations."""
    prefetch: int = 2
    """Optimizer steps of micro-batches prepared ahead by a background thread while the step runs (0 = each micro-batch
    is read when the step asks for it)."""

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.sources is not None:
            if not self.sources:
                raise ConfigError("data.sources is empty: list source: weight pairs, or null for data.dir/train")
            for name, weight in self.sources.items():
                reserved = name in ("train", "valid", "tokenizer")
                if reserved or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name)):
                    raise ConfigError(
                        f"data.sources has a source named {name!r}: use the name given to tools/prepare_data.py"
                        " --source (letters, digits, '_', '-'; not train, valid or tokenizer)"
                    )
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                    raise ConfigError(f"data.sources.{name} must be a positive weight, got {weight!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, clipped by global gradient norm."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` at the end of the cosine."""
    warmup_fraction: float = 0.01
    """Fraction of the total optimizer steps spent in linear warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables)."""
    neftune_alpha: float = 0.0
    """NEFTune: uniform noise of scale alpha / sqrt(T * H) added to the student's input embeddings in training (T the
    window length, H the hidden size; MiniChat-1.5 used it for the chat stage); 0 = off."""
    router_jitter: float = 0.0
    """An MoE student's router jitter eps: in training, each gate's input is multiplied by noise uniform in
    [1 - eps, 1 + eps] (MiniMoE, Switch); 0 = off. Ignored for a dense student."""

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _in_range("optim.warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _in_range("optim.beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _in_range("optim.beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _in_range("optim.router_jitter", self.router_jitter, 0.0, 1.0, hi_open=True)
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0 or self.neftune_alpha < 0:
            raise ConfigError(
                "optim.weight_decay, optim.grad_clip and optim.neftune_alpha must be >= 0 and optim.eps > 0"
            )


@dataclass(frozen=True)
class MixupConfig:
    """MixKD: also distil on mixed-up pairs of sequences of a micro-batch (minima.mixup has the objective)."""

    enabled: bool = False
    """Train on mixed-up copies of micro-batches (needs run.micro_batch_size >= 2: pairs are formed within one)."""
    prob: float = 1.0
    """Probability that a micro-batch is also trained on its mixed-up copy (drawn per micro-batch)."""
    alpha: float = 0.4
    """lambda ~ Beta(alpha, alpha), one per mixed micro-batch (small alpha: mostly near 0 or 1)."""
    weight: float = 1.0
    """Weight of a mixed token's terms (student mixup CE and KD on the mixed input) relative to an original
    token's CE + KD; the step's normalising count weighs the mixed tokens the same way."""

    def __post_init__(self) -> None:
        _in_range("kd.mixup.prob", self.prob, 0.0, 1.0)
        _positive("kd.mixup.alpha", self.alpha)
        if not 0 <= self.weight < math.inf:
            raise ConfigError(f"kd.mixup.weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class KDConfig:
    """Token-level distillation: ``ce_weight * CE + kd_weight * T^2 * D(p_teacher^T, p_student^T)`` per token."""

    ce_weight: float = 0.5
    """Weight of cross-entropy on the true next token."""
    kd_weight: float = 0.5
    """Weight of the distillation term."""
    temperature: float = 1.0
    """Softmax temperature T applied to both models' logits; the KD term is scaled by T^2."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = "forward_kl"
    """D, compared token by token (minima.divergences); forward KL is the MiniMA objective."""
    beta: float = 0.5
    """Generalized JSD's teacher weight in [0, 1] (0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD)."""
    alpha: float = 0.1
    """Skew KLs' weight of the matched distribution in the mixture, in [0, 1) (0 = plain KL)."""
    compile: Literal["auto", "always", "never"] = "auto"
    """Fuse each loss chunk's elementwise work with torch.compile: auto = on GPUs (triton), never on CPUs."""
    chunk_tokens: int = 0
    """Tokens per chunk of the loss over the output heads (0 = automatic: a (chunk, vocab) fp32 tensor ~32 MiB, 128 MiB
    when compiled)."""
    balance_weight: float = 0.01
    """Weight of an MoE student's load-balancing loss (Switch's, per sequence, averaged over layers; each sequence
    weighted by its valid tokens: minima.moe). Ignored for a dense student."""
    mixup: MixupConfig = field(default_factory=MixupConfig)
    """MixKD (off by default): kd.mixup.enabled=true also trains on mixed-up sequence pairs."""

    def __post_init__(self) -> None:
        if self.ce_weight < 0 or self.kd_weight < 0 or self.ce_weight + self.kd_weight == 0:
            raise ConfigError("kd.ce_weight and kd.kd_weight must be >= 0 and not both 0")
        _positive("kd.temperature", self.temperature)
        _in_range("kd.beta", self.beta, 0.0, 1.0)
        _in_range("kd.alpha", self.alpha, 0.0, 1.0, hi_open=True)
        if self.chunk_tokens < 0:
            raise ConfigError(f"kd.chunk_tokens must be >= 0 (0 = automatic), got {self.chunk_tokens}")
        if not 0 <= self.balance_weight < math.inf:
            raise ConfigError(f"kd.balance_weight must be >= 0 (0 = no balancing loss), got {self.balance_weight}")

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``minima.losses.kd_loss_from_hidden`` / ``kd_loss_from_logits``."""
        names = ("ce_weight", "kd_weight", "divergence", "temperature", "beta", "alpha")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class RunConfig:
    """How long, how big, where to write, how often to log/validate/save."""

    out_dir: str = "runs/default"
    """Run directory: resolved config, logs, TensorBoard, checkpoints and the exported student."""
    tokens_per_step: int = 524288
    """Tokens per optimizer step over all ranks and micro-batches (the global batch, in tokens)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    total_tokens: int | None = None
    """Training length in tokens, rounded up to whole optimizer steps (used when max_steps is null)."""
    max_steps: int | None = None
    """Training length in optimizer steps; when set, it takes precedence over epochs and total_tokens."""
    epochs: float | None = None
    """Training length in passes over the training windows (the chat stage), rounded up to whole optimizer steps;
    when set, it takes precedence over total_tokens."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype of both engines: auto = bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute the student's activations in backward (saves memory, costs ~30% compute)."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto = flash_attention_2 when installed and a GPU is present, else sdpa."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON with the student engine's settings (ZeRO stage, buckets, offload); batch keys are injected."""
    teacher_ds_config: str = "ds_configs/zero3_teacher.json"
    """DeepSpeed JSON for the teacher's inference-only engine (no optimizer, no scheduler)."""
    log_every: int = 10
    """Optimizer steps between logged scalars."""
    eval_every: int = 200
    """Optimizer steps between held-out evaluations (also at the end); 0 = only at the end."""
    eval_tokens: int = 1048576
    """Held-out tokens per evaluation (all ranks together); 0 = the whole validation split."""
    early_stopping_patience: int = 0
    """Stop when the held-out loss has not improved for this many evaluations in a row (every eval_every steps); the
    export is then that of the best evaluation, written when it was reached. 0 = off (the export is the last step)."""
    save_every: int = 500
    """Optimizer steps between checkpoints (also at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    export_fp32: bool = False
    """Also write <out_dir>/export_fp32: the optimizer's fp32 master weights at the end of training (what DeepSpeed's
    zero_to_fp32 reconstructs), beside <out_dir>/export, which is in the training dtype."""
    resume: str = "auto"
    """auto = continue from the newest checkpoint in out_dir if there is one; never; or a checkpoint directory."""
    seed: int = 0
    """Seed of model initialisation."""

    def uses_bf16(self, device_type: str) -> bool:
        """Whether ``precision`` means bf16 on a device of this type (``auto``: on GPUs)."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def __post_init__(self) -> None:
        for name in ("tokens_per_step", "micro_batch_size", "log_every", "keep_last"):
            _positive(f"run.{name}", getattr(self, name))
        for name in ("eval_every", "eval_tokens", "save_every", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.total_tokens is None and self.max_steps is None and self.epochs is None:
            raise ConfigError(
                "give run.total_tokens (tokens), run.epochs (passes over the data) or run.max_steps (optimizer steps)"
            )
        if self.epochs is not None:
            _positive("run.epochs", self.epochs)
        if self.total_tokens is not None:
            _positive("run.total_tokens", self.total_tokens)
        if self.max_steps is not None:
            _positive("run.max_steps", self.max_steps)


@dataclass(frozen=True)
class Config:
    """A whole run. ``teacher: null`` trains the student as a plain language model (loss = CE) in the same loop."""

    student: ModelConfig
    """The model being trained."""
    data: DataConfig
    """Training and held-out token shards."""
    teacher: TeacherConfig | None = None
    """The frozen teacher, or null for plain language-model training."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation objective."""
    run: RunConfig = field(default_factory=RunConfig)
    """Length, batch, logging, evaluation and checkpoints."""

    def __post_init__(self) -> None:
        if self.kd.mixup.enabled and self.run.micro_batch_size < 2:
            raise ConfigError(
                "kd.mixup.enabled=true mixes pairs of sequences within a micro-batch, but run.micro_batch_size="
                f"{self.run.micro_batch_size}: give run.micro_batch_size >= 2 (and tokens_per_step to match)"
            )
        if self.run.epochs is not None and self.data.sources is not None and len(self.data.sources) > 1:
            raise ConfigError(
                "run.epochs counts passes over one source; with a mixture of data.sources give run.total_tokens"
                " (each source then starts a new epoch whenever it runs out)"
            )
        if 0 < self.run.eval_tokens < self.data.seq_len:
            raise ConfigError(
                f"run.eval_tokens={self.run.eval_tokens} is less than one window of data.seq_len={self.data.seq_len}"
                f" tokens, so no window would be evaluated; give run.eval_tokens >= {self.data.seq_len} (a multiple"
                " of it), or 0 for the whole validation split"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the world size; printed at start and asserted consistent."""

    world_size: int
    grad_accum_steps: int
    """Micro-batches per rank per optimizer step."""
    tokens_per_micro_step: int
    """Tokens in one micro-batch on one rank (micro_batch_size * seq_len)."""
    train_batch_size: int
    """Sequences per optimizer step over all ranks (DeepSpeed's train_batch_size)."""
    tokens_per_step: int
    total_steps: int
    total_tokens: int
    warmup_steps: int

    def ds_batch_keys(self, micro_batch_size: int) -> dict[str, int]:
        return {
            "train_batch_size": self.train_batch_size,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
        }


def derive(cfg: Config, world_size: int, train_windows: int | None = None) -> Derived:
    """Derive accumulation, DeepSpeed batch keys, total steps and warmup from the main knobs and the world size
    (and, for ``run.epochs``, the number of training windows of ``data.seq_len`` tokens)."""
    run = cfg.run
    tokens_per_micro_step = run.micro_batch_size * cfg.data.seq_len
    per_step_all_ranks = tokens_per_micro_step * world_size
    if run.tokens_per_step % per_step_all_ranks:
        lo = max(per_step_all_ranks, run.tokens_per_step // per_step_all_ranks * per_step_all_ranks)
        raise ConfigError(
            f"run.tokens_per_step={run.tokens_per_step} is not a multiple of micro_batch_size * seq_len * world_size"
            f" = {run.micro_batch_size} * {cfg.data.seq_len} * {world_size} = {per_step_all_ranks};"
            f" use e.g. run.tokens_per_step={lo} or {lo + per_step_all_ranks}"
        )
    grad_accum_steps = run.tokens_per_step // per_step_all_ranks
    if run.max_steps is not None:
        total_steps = run.max_steps
    elif run.epochs is not None:
        if train_windows is None:
            raise ConfigError("run.epochs needs the size of the training data; give run.max_steps or run.total_tokens")
        total_steps = max(1, math.ceil(run.epochs * train_windows * cfg.data.seq_len / run.tokens_per_step))
    else:
        total_steps = math.ceil(run.total_tokens / run.tokens_per_step)
    train_batch_size = run.micro_batch_size * grad_accum_steps * world_size
    assert train_batch_size * cfg.data.seq_len == run.tokens_per_step
    return Derived(
        world_size=world_size,
        grad_accum_steps=grad_accum_steps,
        tokens_per_micro_step=tokens_per_micro_step,
        train_batch_size=train_batch_size,
        tokens_per_step=run.tokens_per_step,
        total_steps=total_steps,
        total_tokens=total_steps * run.tokens_per_step,
        warmup_steps=round(cfg.optim.warmup_fraction * total_steps),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Loading: YAML recipe + overrides -> nested dict -> typed, validated dataclasses.


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_config(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a built-in recipe name or YAML path, apply ``key.sub=value`` overrides and validate."""
    path = RECIPES_DIR / f"{recipe}.yaml" if "/" not in recipe and not recipe.endswith((".yaml", ".yml")) else None
    if path is None:
        path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe '{recipe}' not found: give a YAML file or one of {recipe_names()}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (student, data, ...), got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    missing = _missing_keys(raw)
    if missing:
        raise ConfigError(
            f"recipe '{recipe}' needs values for {missing} (marked ???): add them as overrides, e.g. {missing[0]}=..."
        )
    return from_dict(raw)


def _missing_keys(raw: Any, prefix: str = "") -> list[str]:
    """Keys whose value is the required marker '???' (paths to real weights and data in the scale recipes)."""
    if isinstance(raw, dict):
        return [k for key, v in raw.items() for k in _missing_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if raw == "???" else []


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict; unknown keys and wrong types are errors."""
    return _build(Config, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping with keys {[f.name for f in dataclasses.fields(cls)]}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; valid keys in '{where}' are {names}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{prefix}{f.name}'")
            continue
        kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{prefix}{f.name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") if prefix else e from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats; '1e-3' strings for numbers)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"'{key}' cannot be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(float(value))
            except ValueError:
                raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number ({tp.__name__}), got {value!r}")
        if tp is int:
            if value != int(value):
                raise ConfigError(f"'{key}' must be a whole number, got {value!r}")
            return int(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {tp}")  # a bug in this module, not user input


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _in_range(key: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if not (lo <= value < hi if hi_open else lo <= value <= hi):
        raise ConfigError(f"{key} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON files hold engine settings only; minima injects what it derives.

_INJECTED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the minima checkout (for ds_configs/)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


def load_ds_config(path: str, key: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON (named by config key ``key``) and refuse keys that minima derives and injects."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"{key}={path}: file not found (looked in the working directory and {REPO_ROOT})")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    clash = [k for k in _INJECTED_KEYS if k in ds]
    if clash:
        raise ConfigError(
            f"{p} sets {clash}, which minima derives from the recipe (run.tokens_per_step, run.micro_batch_size,"
            " optim.*, run.precision); remove them from the JSON and set the recipe keys instead"
        )
    return ds
