"""Training run configuration: a TOML file with `[model]`, `[data]`, `[train]`,
`[eval]`, `[checkpoint]` and `[log]` tables, plus `--set section.key=value` overrides.

Every key is declared here with its type, so a typo is an error that names the key
instead of a silently ignored setting, and a value of the wrong type (a learning rate
that is not a number) is caught before any work starts.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import GPT2LabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSection:
    preset: str = ""  # gpt2, gpt2-medium, tiny, ...; or give the dimensions below
    init_from: str = ""  # checkpoint to fine-tune (directory, preset name or HF repo id)
    n_layers: int = 0
    d_model: int = 0
    n_heads: int = 0
    n_ctx: int = 0


@dataclass
class DataSection:
    dir: str = ""  # a directory made by `gpt2lab prepare`


@dataclass
class TrainSection:
    out_dir: str = "out"
    seed: int = 1337
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16" = bf16 autocast (weights and optimizer stay fp32)
    compile: bool = False
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = -1.0  # -1: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes, CUDA only)
    only: list[str] = field(default_factory=list)  # train only parameters matching these patterns
    freeze: list[str] = field(default_factory=list)  # freeze parameters matching these patterns
    recipe: str = ""  # "", "embeddings-only", "ln-free"
    train_wpe: bool = False  # embeddings-only: relearn the position embeddings too
    ln_free_start: int = 200  # ln-free: step at which the first LayerNorm is replaced
    ln_free_gap: int = 20  # ln-free: steps between replacements
    ln_free_calib_batches: int = 4  # ln-free: batches used to measure each site's std


@dataclass
class EvalSection:
    every: int = 200
    iters: int = 20


@dataclass
class CheckpointSection:
    every: int = 500
    keep: int = 2  # the last K step checkpoints are kept, plus the best by val loss


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def min_lr(self) -> float:
        return self.train.lr / 10 if self.train.min_lr < 0 else self.train.min_lr


def _coerce(section: str, key: str, value: Any, kind: Any) -> Any:
    where = f"{section}.{key}"
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise GPT2LabError(f"config: {where} must be true or false, got {value!r}")
        return value
    if kind is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise GPT2LabError(f"config: {where} must be an integer, got {value!r}") from None
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise GPT2LabError(f"config: {where} must be a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise GPT2LabError(f"config: {where} must be a string, got {value!r}")
        return value
    # list[str]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GPT2LabError(f"config: {where} must be a list of strings, got {value!r}")
    return value


def _apply(cfg: TrainConfig, section: str, key: str, value: Any) -> None:
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    if section not in sections:
        raise GPT2LabError(
            f"config: unknown section [{section}] (known: {', '.join(sorted(sections))})"
        )
    target = getattr(cfg, section)
    hints = get_type_hints(type(target))
    if key not in hints:
        raise GPT2LabError(f"config: unknown key {section}.{key} (known: {', '.join(hints)})")
    kind = hints[key]
    kind = list if getattr(kind, "__origin__", None) is list else kind
    setattr(target, key, _coerce(section, key, value, kind))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML run configuration and apply `section.key=value` overrides."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise GPT2LabError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise GPT2LabError(f"config file {path} is not valid TOML ({e})") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise GPT2LabError(f"config: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise GPT2LabError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        _apply(cfg, section, key, value)
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    t = cfg.train
    for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
        if getattr(t, name) < 1:
            raise GPT2LabError(f"config: train.{name} must be at least 1, got {getattr(t, name)}")
    if not t.lr > 0:
        raise GPT2LabError(f"config: train.lr must be positive, got {t.lr}")
    if t.dtype not in ("float32", "bfloat16", "float16"):
        raise GPT2LabError(
            f"config: train.dtype must be float32, bfloat16 or float16, got {t.dtype!r}"
        )
    if t.recipe not in ("", "embeddings-only", "ln-free"):
        raise GPT2LabError(
            f"config: train.recipe must be '', 'embeddings-only' or 'ln-free', got {t.recipe!r}"
        )
    if t.optimizer not in ("adamw", "adamw8bit"):
        raise GPT2LabError(
            f"config: train.optimizer must be adamw or adamw8bit, got {t.optimizer!r}"
        )
    if not cfg.data.dir:
        raise GPT2LabError("config: data.dir is required (a directory made by `gpt2lab prepare`)")
    m = cfg.model
    if not (m.preset or m.init_from or (m.n_layers and m.d_model and m.n_heads)):
        raise GPT2LabError(
            "config: [model] needs preset, init_from, or n_layers + d_model + n_heads"
        )
