"""GPT-2 hyper-parameters, the four OpenAI presets, and HF `config.json` I/O.

Field names follow TransformerLens (`d_model`, `n_layers`, ...) because the
interpretability half of gpt2lab speaks that language; `from_hf` / `to_hf` translate
to HuggingFace's names (`n_embd`, `n_layer`, ...) so checkpoints move both ways.
Options of HF's GPT2Config that change the math are either carried through
(`scale_attn_weights`, `scale_attn_by_inverse_layer_idx`, the activation) or refused
with a clear error, never silently ignored.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .errors import GPT2LabError
from .validate import boolean, integer, is_int, number, show

# Activations we implement, by their HF names. gelu_new, gelu_fast and
# gelu_pytorch_tanh are all the tanh approximation of GELU.
ACTIVATIONS = (
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu",
    "relu",
    "silu",
    "swish",
    "quick_gelu",
)


# Dimensions far beyond any GPT-2 (gpt2-xl: 48 layers, d_model 1600, 1.56B parameters).
# A config.json asking for more is a mistake (or hostile) and is refused before anything
# is built: 200,000 layers would otherwise take minutes just to lay out on the meta device.
MAX_DIMS = {
    "n_layers": 1024,
    "d_model": 1 << 16,
    "n_heads": 1 << 16,
    "n_ctx": 1 << 20,
    "d_vocab": 1 << 22,
    "d_mlp": 1 << 18,
}
MAX_PARAMS = 1 << 34  # ~17.2 billion, 11 times gpt2-xl


def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    """A JSON boolean from an HF config (absent: `default`); "false" or 0 is an error."""
    return boolean(f"config: {key}", hf.get(key, default))


@dataclass(frozen=True)
class GPT2Config:
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 16
    n_ctx: int = 1024
    d_vocab: int = 50257
    d_mlp: int = 0  # 0 means 4 * d_model
    act_fn: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    ln_free: bool = False  # LayerNorms replaced by fixed-scale ones (LN-removal recipe)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_ctx", "d_vocab"):
            integer(f"config: {name}", getattr(self, name), 1, MAX_DIMS[name])
        if is_int(self.d_mlp) and self.d_mlp == 0:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        integer("config: d_mlp", self.d_mlp, 1, MAX_DIMS["d_mlp"])
        if self.d_model % self.n_heads:
            raise GPT2LabError(
                f"config: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not isinstance(self.act_fn, str) or self.act_fn not in ACTIVATIONS:
            raise GPT2LabError(
                f"config: activation {self.act_fn!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        eps = number("config: layer_norm_eps", self.layer_norm_eps, 0, low_open=True)
        object.__setattr__(self, "layer_norm_eps", eps)
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "ln_free"):
            object.__setattr__(self, name, boolean(f"config: {name}", getattr(self, name)))
        if not isinstance(self.extra, dict):
            raise GPT2LabError(f"config: extra must be a dict, got {type(self.extra).__name__}")
        if self.n_params > MAX_PARAMS:
            raise GPT2LabError(
                f"config: {self.n_params:,} parameters ({self.n_layers} layers, d_model "
                f"{self.d_model}, d_mlp {self.d_mlp}, n_ctx {self.n_ctx}, vocabulary "
                f"{self.d_vocab}) is more than gpt2lab builds ({MAX_PARAMS:,}; gpt2-xl has "
                "1,557,611,200); check config.json"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count with the unembedding tied to the embedding (as GPT-2 does)."""
        d, m, layer = self.d_model, self.d_mlp, 0
        layer += 2 * 2 * d  # two LayerNorms
        layer += d * 3 * d + 3 * d + d * d + d  # attention
        layer += d * m + m + m * d + d  # MLP
        return self.d_vocab * d + self.n_ctx * d + self.n_layers * layer + 2 * d

    def with_(self, **changes: Any) -> GPT2Config:
        return replace(self, **changes)

    # ---- TransformerLens' HookedTransformerConfig names (read-only) -----------------
    # Code written for TransformerLens reads these from `model.cfg`. They are properties,
    # not fields: nothing here is saved, compared or passed to `with_`. The ones that
    # depend on the model (device, dtype, normalization_type, model_name, the use_*
    # flags) read the model that owns this config (`model.cfg` is bound to its model);
    # a config not attached to a model answers with the defaults.
    positional_embedding_type = property(lambda self: "standard")
    attn_only = property(lambda self: False)
    original_architecture = property(lambda self: "GPT2LMHeadModel")
    tokenizer_name = property(lambda self: "gpt2")
    gated_mlp = property(lambda self: False)
    parallel_attn_mlp = property(lambda self: False)
    final_rms = property(lambda self: False)
    uses_rms_norm = property(lambda self: False)
    n_key_value_heads = property(lambda self: None)
    use_attn_in = property(lambda self: False)
    use_hook_tokens = property(lambda self: False)
    use_local_attn = property(lambda self: False)
    attention_dir = property(lambda self: "causal")

    @property
    def eps(self) -> float:
        """The LayerNorms' epsilon (HF's layer_norm_epsilon)."""
        return self.layer_norm_eps

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def use_attn_scale(self) -> bool:
        return self.scale_attn_weights

    @property
    def attn_scale(self) -> float:
        """What attention scores are divided by (sqrt(d_head), or 1 without scaling)."""
        return self.d_head**0.5 if self.scale_attn_weights else 1.0

    def _model(self) -> Any:
        ref = self.__dict__.get("_model_ref")
        return ref() if ref is not None else None

    def _bind(self, model: Any) -> None:
        """Attach this config to `model` (done by GPT2 for its own copy)."""
        object.__setattr__(self, "_model_ref", weakref.ref(model))

    def __getstate__(self) -> dict[str, Any]:  # pickles and copies are not bound
        return {k: v for k, v in self.__dict__.items() if k != "_model_ref"}

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters now (after any `.to()`)."""
        model = self._model()
        return model.device if model is not None else torch.get_default_device()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters now (after any `.to()` / `.half()`)."""
        model = self._model()
        return model.dtype if model is not None else torch.get_default_dtype()

    @property
    def normalization_type(self) -> str:
        """ "LN", or "LNPre" once the LayerNorms' weights are folded into the next layers
        (`process_weights(fold_ln=True)`, as TransformerLens' from_pretrained reports).
        An LN-free model (`ln_free`) still centres and applies its affine map: "LN"."""
        processing = getattr(self._model(), "processing", None) or {}
        return "LNPre" if processing.get("fold_ln") else "LN"

    @property
    def model_name(self) -> str:
        """The name it was loaded by (`load("gpt2")` -> "gpt2", a path -> its last part,
        the bundled model -> "bundled"); "custom" for a model built from a config."""
        return getattr(self._model(), "model_name", None) or "custom"

    @property
    def default_prepend_bos(self) -> bool:
        return bool(getattr(self._model(), "default_prepend_bos", False))

    @property
    def default_padding_side(self) -> str:
        return getattr(self._model(), "default_padding_side", None) or "left"

    @property
    def use_attn_result(self) -> bool:
        return bool(getattr(self._model(), "_use_attn_result", False))

    @property
    def use_split_qkv_input(self) -> bool:
        return False  # gpt2lab has no hook_q_input / hook_k_input / hook_v_input

    @property
    def use_hook_mlp_in(self) -> bool:
        return bool(getattr(self._model(), "_use_hook_mlp_in", False))

    # ---- presets -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> GPT2Config:
        if name not in PRESETS:
            raise GPT2LabError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**PRESETS[name])

    # ---- HF config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Build from an HF GPT2Config dict, refusing options we do not implement.

        Strict about types, as transformers is not: a size must be an integer (not a bool
        or a float), a flag must be a JSON boolean (the string "false" is not one), and
        layer_norm_epsilon a finite number > 0. Keys that do not change the math are
        ignored."""
        if not isinstance(hf, dict):
            raise GPT2LabError(f"config: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise GPT2LabError(
                f"config: model_type is {show(model_type)}, not 'gpt2'; gpt2lab only runs GPT-2 checkpoints"
            )
        if _flag(hf, "add_cross_attention", False):
            raise GPT2LabError(
                "config: add_cross_attention=True (encoder-decoder GPT-2) is not supported"
            )
        if not _flag(hf, "tie_word_embeddings", True):
            raise GPT2LabError(
                "config: tie_word_embeddings=False is not supported (GPT-2 ties them)"
            )
        # reorder_and_upcast_attn only changes the precision in which attention is
        # computed, not the math, so it is accepted.
        _flag(hf, "reorder_and_upcast_attn", False)
        n_inner = hf.get("n_inner")
        if n_inner is not None and not (is_int(n_inner) and n_inner >= 1):
            raise GPT2LabError(
                f"config: n_inner must be null or a positive integer, got {show(n_inner)}"
            )
        return cls(
            n_layers=hf.get("n_layer", 12),
            d_model=hf.get("n_embd", 768),
            n_heads=hf.get("n_head", 12),
            n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
            d_vocab=hf.get("vocab_size", 50257),
            d_mlp=0 if n_inner is None else n_inner,  # 0: 4 * d_model
            act_fn=hf.get("activation_function", "gelu_new"),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=_flag(hf, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=_flag(hf, "scale_attn_by_inverse_layer_idx", False),
            ln_free=_flag(hf, "gpt2lab_ln_free", False),
            extra={k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf},
        )

    def to_hf(self) -> dict[str, Any]:
        hf = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layers,
            "n_embd": self.d_model,
            "n_head": self.n_heads,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.d_vocab,
            "n_inner": None if self.d_mlp == 4 * self.d_model else self.d_mlp,
            "activation_function": self.act_fn,
            "layer_norm_epsilon": self.layer_norm_eps,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.extra.get("bos_token_id", 50256),
            "eos_token_id": self.extra.get("eos_token_id", 50256),
            "tie_word_embeddings": True,
        }
        if self.ln_free:
            hf["gpt2lab_ln_free"] = True
        return hf

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        """Read an HF config.json; every problem with it is a GPT2LabError naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise GPT2LabError(f"config: {path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, a 5000-digit number
            raise GPT2LabError(f"config: {path} is not valid JSON ({e})") from None
        except RecursionError:
            raise GPT2LabError(f"config: {path} is nested too deeply to be a config") from None
        except OSError as e:  # a directory, no permission, ...
            raise GPT2LabError(f"config: cannot read {path} ({e.strerror or e})") from None
        if not isinstance(data, dict):
            raise GPT2LabError(f"config: {path} does not hold a JSON object")
        try:
            return cls.from_hf(data)
        except GPT2LabError as e:
            raise GPT2LabError(f"config: {path}: {str(e).removeprefix('config: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layers=12, d_model=768, n_heads=12),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25),
    # A test-sized GPT-2 with the real vocabulary.
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, n_ctx=128),
}

__all__ = ["GPT2Config", "PRESETS", "ACTIVATIONS", "MAX_DIMS", "MAX_PARAMS"]
