"""Training run configuration: a TOML file with `[model]`, `[data]`, `[train]`,
`[eval]`, `[checkpoint]` and `[log]` tables, plus `--set section.key=value` overrides.

Every key is declared here with its type, so a typo is an error that names the key
instead of a silently ignored setting, and a value of the wrong type (a learning rate
that is not a number) or out of its range (a learning rate of inf, beta1 = 2, a
checkpoint every 0 steps) is caught before any work starts, with a message that names
the key and the allowed range, instead of a traceback or a NaN model after set-up.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from ..config import GPT2Config
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
    grad_clip: float = 1.0  # 0: no clipping
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the update
    nonfinite_limit: int = 10  # with "skip": stop after this many non-finite steps in a row
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
    every: int = 200  # 0: never evaluate
    iters: int = 20


@dataclass
class CheckpointSection:
    every: int = 500
    keep: int = 2  # the newest K step checkpoints of the run are kept (K >= 1), plus the best


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

    def model_config(self) -> GPT2Config:
        """The shape of a model built from scratch (preset, then the dimensions given)."""
        m = self.model
        base = GPT2Config.preset(m.preset) if m.preset else GPT2Config()
        dims = {
            k: getattr(m, k) for k in ("n_layers", "d_model", "n_heads", "n_ctx") if getattr(m, k)
        }
        return base.with_(**dims, d_mlp=4 * dims.get("d_model", base.d_model))


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
        except (TypeError, ValueError, OverflowError):
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
        data = _read_toml(path)
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


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; every way the file can be unusable is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GPT2LabError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise GPT2LabError(f"config file {path} is a directory; give a TOML file") from None
    except UnicodeDecodeError:
        raise GPT2LabError(f"config file {path} is not UTF-8 text; give a TOML file") from None
    except OSError as e:
        raise GPT2LabError(f"config file {path} cannot be read ({e.strerror or e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GPT2LabError(f"config file {path} is not valid TOML ({e})") from None


def _validate(cfg: TrainConfig) -> None:
    """Every setting against its allowed range, so a bad value fails here, before a
    model is built, rather than as a traceback (or a NaN model) after set-up."""
    t, m = cfg.train, cfg.model
    rules = [
        # (key, value, allowed?, what is allowed)
        *[(f"train.{k}", getattr(t, k), getattr(t, k) >= 1, "at least 1")
          for k in ("batch_size", "seq_len", "grad_accum", "max_steps")],
        ("train.seed", t.seed, 0 <= t.seed < 2**32, "an integer in [0, 2**32)"),
        ("train.lr", t.lr, math.isfinite(t.lr) and t.lr > 0, "a finite number > 0"),
        ("train.min_lr", t.min_lr, t.min_lr == -1 or (math.isfinite(t.min_lr) and t.min_lr >= 0),
         "a finite number >= 0, or -1 for lr / 10"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "at least 0"),
        ("train.weight_decay", t.weight_decay, math.isfinite(t.weight_decay) and t.weight_decay >= 0,
         "a finite number >= 0"),
        ("train.beta1", t.beta1, 0 <= t.beta1 < 1, "in [0, 1)"),
        ("train.beta2", t.beta2, 0 <= t.beta2 < 1, "in [0, 1)"),
        ("train.grad_clip", t.grad_clip, math.isfinite(t.grad_clip) and t.grad_clip >= 0,
         "a finite number >= 0 (0: no clipping)"),
        ("train.dtype", t.dtype, t.dtype in ("float32", "bfloat16", "float16"),
         "float32, bfloat16 or float16"),
        ("train.recipe", t.recipe, t.recipe in ("", "embeddings-only", "ln-free"),
         "'', 'embeddings-only' or 'ln-free'"),
        ("train.optimizer", t.optimizer, t.optimizer in ("adamw", "adamw8bit"),
         "adamw or adamw8bit"),
        ("train.nonfinite", t.nonfinite, t.nonfinite in ("stop", "skip"), "'stop' or 'skip'"),
        ("train.nonfinite_limit", t.nonfinite_limit, t.nonfinite_limit >= 1, "at least 1"),
        ("train.ln_free_start", t.ln_free_start, t.ln_free_start >= 0, "at least 0"),
        ("train.ln_free_gap", t.ln_free_gap, t.ln_free_gap >= 0, "at least 0"),
        ("train.ln_free_calib_batches", t.ln_free_calib_batches, t.ln_free_calib_batches >= 1,
         "at least 1"),
        ("train.out_dir", t.out_dir, bool(t.out_dir.strip()), "a folder path"),
        ("eval.every", cfg.eval.every, cfg.eval.every >= 0, "at least 0 (0: never evaluate)"),
        ("eval.iters", cfg.eval.iters, cfg.eval.iters >= 1, "at least 1"),
        ("checkpoint.every", cfg.checkpoint.every, cfg.checkpoint.every >= 1, "at least 1"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep >= 1,
         "at least 1 (the newest checkpoints kept)"),
        ("log.every", cfg.log.every, cfg.log.every >= 1, "at least 1"),
        *[(f"model.{k}", getattr(m, k), getattr(m, k) >= 0, "at least 0 (0: from the preset)")
          for k in ("n_layers", "d_model", "n_heads", "n_ctx")],
    ]  # fmt: skip
    for key, value, allowed, what in rules:
        if not allowed:
            raise GPT2LabError(f"config: {key} must be {what}, got {value!r}")
    if not cfg.data.dir:
        raise GPT2LabError("config: data.dir is required (a directory made by `gpt2lab prepare`)")
    if not (m.preset or m.init_from or (m.n_layers and m.d_model and m.n_heads)):
        raise GPT2LabError(
            "config: [model] needs preset, init_from, or n_layers + d_model + n_heads"
        )
    if not m.init_from:
        model_cfg = cfg.model_config()  # checks the dimensions (positive, heads divide d_model)
        if t.seq_len > model_cfg.n_ctx:
            raise GPT2LabError(
                f"config: train.seq_len {t.seq_len} exceeds the model's context {model_cfg.n_ctx}"
            )
