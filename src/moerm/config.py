"""Typed run configuration: dataclasses loadable from YAML and overridable with `--set key=value`."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moerm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/ and examples/ beside src/)


MAX_SEED = 2**32 - 1


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    backbone: str = field(default="minilm", metadata={"help": "HF model path/name; 'minilm' = the embedded MiniLM"})
    pooling: str = field(default="auto", metadata={"help": "auto | cls | mean | last (auto: mean for encoders, last for decoders)"})
    max_length: int = field(default=256, metadata={"help": "tokens per prompt+response; the prompt is trimmed from the left"})
    head: str = field(default="linear", metadata={"help": "linear | mlp | hf (hf: the score head of the Hugging Face sequence-classification model the backbone is, as `moerm import-hf` sets it)"})
    head_hidden: int = 256
    head_dropout: float = 0.0
    tuning: str = field(default="auto", metadata={"help": "auto | full | lora | frozen | top (auto: the system's default; frozen: cached features, heads only; top: a cached frozen trunk, only the top model.trainable_layers blocks train)"})
    trainable_layers: int = field(default=2, metadata={"help": "tuning=top: how many top transformer blocks train (fully, or with LoRA for LoRA systems); the rest is a frozen, cached trunk"})
    trunk_cache: str | None = field(default=None, metadata={"help": "tuning=top: trunk-state cache dir (default ~/.cache/moerm/trunk)"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    feature_cache: str | None = field(default=None, metadata={"help": "frozen-feature cache dir (default ~/.cache/moerm/features)"})
    dtype: str = field(default="auto", metadata={"help": "backbone weights: auto | float32 | bfloat16 | float16 (auto: float32, safe on CPUs)"})
    quantize: str = field(default="none", metadata={"help": "none | int8: at load time, int8 dynamic quantization of the backbone's Linear layers (CPU inference only; training ignores it)"})

    def __post_init__(self) -> None:
        _choice("model.pooling", self.pooling, ("auto", "cls", "mean", "last"))
        _choice("model.head", self.head, ("linear", "mlp", "hf"))
        _choice("model.tuning", self.tuning, ("auto", "full", "lora", "frozen", "top"))
        _at_least("model.trainable_layers", self.trainable_layers, 1)
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("model.quantize", self.quantize, ("none", "int8"))
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be >= 8, got {self.max_length}")
        _at_least("model.head_hidden", self.head_hidden, 1)
        _within("model.head_dropout", self.head_dropout, 0.0, 1.0, high_open=True)
        _at_least("model.lora_r", self.lora_r, 1)
        _positive("model.lora_alpha", self.lora_alpha)
        _within("model.lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)


@dataclass
class FSDPConfig:
    """Sharded data parallelism (PyTorch FSDP2) under a multi-process launch; see docs/DISTRIBUTED.md."""

    enabled: bool = field(default=False, metadata={"help": "shard parameters, gradients and optimizer state over the processes (FSDP2: each transformer block, then the root); no effect with one process"})
    reshard_after_forward: bool = field(default=True, metadata={"help": "free each block's gathered parameters after its forward (less memory, one more all-gather in backward)"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 (bf16: parameters gathered and computed in bfloat16, gradients reduced in float32; sharded weights and optimizer stay float32)"})
    cpu_offload: bool = field(default=False, metadata={"help": "keep sharded parameters, gradients and optimizer state in CPU memory (the optimizer steps on the CPU)"})
    checkpoint: str = field(default="gathered", metadata={"help": "gathered | sharded (gathered: the main process writes the whole trainable weights and optimizer state, resumable on any number of processes; sharded: each process writes its own shards, no gather, resumable on the same number of processes only)"})

    def __post_init__(self) -> None:
        for name in ("enabled", "reshard_after_forward", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.fsdp.{name} must be true or false, got {getattr(self, name)!r}")
        _choice("train.fsdp.mixed_precision", self.mixed_precision, ("no", "bf16"))
        _choice("train.fsdp.checkpoint", self.checkpoint, ("gathered", "sharded"))


@dataclass
class TrainConfig:
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: by model.tuning, see moerm.encoding.tuning.DEFAULT_LR)"})
    head_lr: float | None = field(default=None, metadata={"help": "learning rate of heads (default: by model.tuning, see moerm.encoding.tuning.DEFAULT_HEAD_LR)"})
    batch_size: int = field(default=16, metadata={"help": "pairs per step per device"})
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0: at the end only)"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = 2
    log_every: int = 10
    center_rewards_coefficient: float = field(default=0.0, metadata={"help": "as TRL: coef * mean((r_c + r_r)^2)"})
    use_margin: bool = True
    eval_batch_size: int = 64
    mixed_precision: str = "no"
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute backbone activations in the backward pass (less memory, ~30% slower)"})
    group_by_length: bool = field(default=False, metadata={"help": "batch pairs of similar token length (less padding; as Hugging Face's group_by_length); no effect on cached features"})
    fsdp: FSDPConfig = field(default_factory=FSDPConfig, metadata={"help": "sharded training: train.fsdp.enabled=true (see docs/DISTRIBUTED.md)"})
    report_to: str = field(default="none", metadata={"help": "experiment trackers: none | tensorboard | wandb | mlflow, comma-separated for several (moerm.train.tracking)"})

    def __post_init__(self) -> None:
        from moerm.train.tracking import parse_report_to

        parse_report_to(self.report_to)  # an unknown tracker is a config error
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.lr is not None:
            _positive("train.lr", self.lr)
        if self.head_lr is not None:
            _positive("train.head_lr", self.head_lr)
        _positive("train.epochs", self.epochs)
        if self.max_steps is not None:
            _at_least("train.max_steps", self.max_steps, 1)
        _within("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _within("train.weight_decay", self.weight_decay, 0.0, float("inf"))
        _within("train.max_grad_norm", self.max_grad_norm, 0.0, float("inf"))
        _within("train.center_rewards_coefficient", self.center_rewards_coefficient, 0.0, float("inf"))
        for name in ("eval_every", "save_every"):
            _at_least(f"train.{name}", getattr(self, name), 0)
        for name in ("log_every", "keep_checkpoints", "eval_batch_size"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        if not 0 <= self.seed <= MAX_SEED:  # what numpy's and torch's seeding accept
            raise ConfigError(f"train.seed must be within [0, {MAX_SEED}], got {self.seed}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"train.gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if not isinstance(self.group_by_length, bool):
            raise ConfigError(f"train.group_by_length must be true or false, got {self.group_by_length!r}")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    on_invalid: str = "error"
    eval_during_training: bool = field(default=True, metadata={"help": "evaluate held-out pairs at eval_every/the end"})
    max_train_pairs_per_domain: int | None = None
    max_eval_pairs_per_domain: int | None = None
    column_map: dict[str, str] | None = None

    def __post_init__(self) -> None:
        _choice("data.on_invalid", self.on_invalid, ("error", "skip"))
        for name in ("max_train_pairs_per_domain", "max_eval_pairs_per_domain"):
            if getattr(self, name) is not None:
                _at_least(f"data.{name}", getattr(self, name), 1)


@dataclass
class RunConfig:
    system: str = "baseline"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "system-specific options"})
    components: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "per-component settings over `train`, e.g. components.router.train.lr=1e-3 (the components a "
                "system has: `moerm train --help`)"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (e.g. 400 digits)
        return False


def _positive(name: str, value: float) -> None:
    if not _finite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")


def _within(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not _finite(value) or value < low or (value >= high if high_open else value > high):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ConfigError(f"{name} must be within {bound}, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer of hundreds of digits
                raise ConfigError(f"{where}: {len(str(abs(value)))}-digit number is out of range") from None
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        key = f"{where}.{sorted(unknown)[0]}".lstrip(".")
        raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value`; the value is read as YAML so numbers, lists and booleans work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise ConfigError(f"override '{key.strip()}': {str(e).split(';')[0]}") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- `base` <- YAML file <- `--set` overrides."""
    data: dict[str, Any] = {}
    _deep_update(data, base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an integer past 4300 digits
            raise ConfigError(f"{p}: invalid YAML ({str(e).split(';')[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        _deep_update(data, loaded)
    for ov in overrides or []:
        k, v = parse_override(ov)
        _set_dotted(data, k, v)
    return from_dict(RunConfig, data)


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def resolve_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory, or else from the repository (for configs/...)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
