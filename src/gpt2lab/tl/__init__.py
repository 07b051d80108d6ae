"""TransformerLens' names over gpt2lab, so a TransformerLens notebook changes one line.

    from transformer_lens import HookedTransformer, utils, patching, FactoredMatrix, ActivationCache
    from gpt2lab.tl import HookedTransformer, utils, patching, FactoredMatrix, ActivationCache

`HookedTransformer.from_pretrained("gpt2-small")` returns a gpt2lab model (`gpt2lab.GPT2`),
loaded the way TransformerLens 3.x loads it: the same model names and aliases, the same
weight processing by default (LayerNorm folded, writing weights and unembedding centred,
value biases folded), BOS prepended to text by default, right padding, and the model on
the GPU when there is one. Hook names, `run_with_cache`, the cache and the weight views
are already TransformerLens' (see the README's "Looking inside"), so the rest of a
notebook runs as it is.

Only GPT-2 can be loaded. An argument gpt2lab cannot honour (another model, a training
checkpoint, several devices, ...) is a one-line `GPT2LabError` naming it: a notebook
that silently ran something else than it asked for would be worse than one that stops.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .. import load
from ..errors import GPT2LabError
from ..interp.cache import ActivationCache
from ..interp.factored_matrix import FactoredMatrix
from ..interp.processing import process_weights
from ..model import GPT2
from ..validate import show
from . import patching, utils

__all__ = ["ActivationCache", "FactoredMatrix", "HookedTransformer", "patching", "utils"]

# TransformerLens' official names of the GPT-2 family (its supported_models.py) and the
# Hub repository each is downloaded from today; gpt2lab's presets know the gpt2 ones.
OFFICIAL = {
    "gpt2": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# Every name TransformerLens 3.9 resolves to one of them (MODEL_ALIASES, matched without
# case as TransformerLens does), plus the Hub's own repository ids.
ALIASES = {
    **{name: name for name in OFFICIAL},
    "gpt2-small": "gpt2",
    "distillgpt2": "distilgpt2",
    "distill-gpt2": "distilgpt2",
    "distil-gpt2": "distilgpt2",
    "gpt2-xs": "distilgpt2",
    **{f"openai-community/{name}": name for name in OFFICIAL if name.startswith("gpt2")},
    "distilbert/distilgpt2": "distilgpt2",
}
# from_pretrained's keyword arguments that HF's from_pretrained would have taken; only
# torch_dtype means something here (TransformerLens reads it as `dtype`).
HF_KWARGS = {"torch_dtype"}
# TransformerLens' generate() defaults, for the models its loaders return: 10 new tokens,
# sampled (temperature 1), the prompt returned with its continuation, as the input was.
TL_GENERATE_DEFAULTS = {"max_new_tokens": 10, "do_sample": True, "return_type": "input"}


def _official_name(model_name: Any) -> str | None:
    """TransformerLens' official name for a GPT-2 family name or alias, else None."""
    if not isinstance(model_name, (str, os.PathLike)):
        raise GPT2LabError(f"model_name must be a model name or a folder, got {show(model_name)}")
    return ALIASES.get(str(model_name).lower())


def _refuse(condition: bool, argument: str, why: str) -> None:
    if condition:
        raise GPT2LabError(f"from_pretrained: {argument} is not supported: {why}")


def _check_tokenizer(tokenizer: Any, model: GPT2) -> None:
    """A tokenizer passed in must be GPT-2's, which the model already has (gpt2lab
    tokenizes with its own copy of GPT-2's BPE, not with transformers')."""
    probe = "Hello world, it's 2024: naïve café ☕ tokens!"
    try:
        theirs = list(tokenizer.encode(probe, add_special_tokens=False))
        size = len(tokenizer)
    except Exception:  # any object that is not an HF tokenizer
        theirs, size = None, None
    if theirs != model.tokenizer.encode(probe) or size != model.cfg.d_vocab:
        raise GPT2LabError(
            "from_pretrained: tokenizer= must be GPT-2's tokenizer (gpt2lab uses its own "
            f"copy of it); got {type(tokenizer).__name__}, which tokenizes differently"
        )


def _hf_model_dir(hf_model: Any, tmp: str) -> str:
    """Save a transformers GPT-2 model where gpt2lab.load can read it."""
    config = getattr(hf_model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind != "gpt2" or not hasattr(hf_model, "save_pretrained"):
        raise GPT2LabError(
            f"from_pretrained: hf_model= must be a transformers GPT-2 model, got "
            f"{type(hf_model).__name__}" + (f" ({kind})" if kind else "")
        )
    if getattr(config, "quantization_config", None):
        raise GPT2LabError("from_pretrained: hf_model= is quantized; pass the unquantized model")
    hf_model.save_pretrained(tmp, safe_serialization=True)
    return tmp


class _IsGPT2(type):
    """isinstance(model, HookedTransformer) holds for every gpt2lab model, so type checks
    in notebooks (`assert isinstance(model, HookedTransformer)`) keep working."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, GPT2)


class HookedTransformer(metaclass=_IsGPT2):
    """TransformerLens' loading entry points; the models they return are `gpt2lab.GPT2`."""

    def __new__(cls, *args: Any, **kwargs: Any):
        raise GPT2LabError(
            "gpt2lab.tl.HookedTransformer only loads pretrained GPT-2 models: use "
            "HookedTransformer.from_pretrained(name), or gpt2lab.GPT2(gpt2lab.GPT2Config(...)) "
            "for a fresh model"
        )

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        checkpoint_index: int | None = None,
        checkpoint_value: int | None = None,
        checkpoint_label: int | None = None,
        hf_model: Any = None,
        device: Any = None,
        n_devices: int = 1,
        tokenizer: Any = None,
        move_to_device: bool = True,
        fold_value_biases: bool = True,
        default_prepend_bos: bool | None = None,
        default_padding_side: str | None = None,
        dtype: Any = "float32",
        first_n_layers: int | None = None,
        n_ctx: int | None = None,
        **from_pretrained_kwargs: Any,
    ) -> GPT2:
        """A GPT-2 by TransformerLens' name or alias ("gpt2", "gpt2-small", "gpt2-medium",
        "gpt2-large", "gpt2-xl", "distilgpt2", ... or the Hub id "openai-community/gpt2"),
        or a local folder in HF's layout, as a gpt2lab model processed TransformerLens'
        way (fold_ln, center_writing_weights, center_unembed, fold_value_biases: all True
        by default; gpt2lab.interp.processing does the work).

        TransformerLens' defaults apply: `device` the GPU if there is one (utils.get_device),
        `dtype` float32 (`torch_dtype=` overrides it, as in TransformerLens),
        `default_prepend_bos=True` and `default_padding_side="right"` (gpt2lab.load's own
        defaults are no BOS and left padding). `hf_model=` takes an already loaded
        transformers GPT-2; `tokenizer=` must be GPT-2's. Weights come from the Hugging
        Face cache or the Hub, as for gpt2lab.load.
        """
        official = _official_name(model_name)
        if official is None and not Path(model_name).expanduser().exists() and hf_model is None:
            raise GPT2LabError(
                f"from_pretrained: model_name {str(model_name)!r} is not a GPT-2 model gpt2lab "
                f"can load (TransformerLens names: {', '.join(ALIASES)}; or a local folder "
                "in HF's layout); for another GPT-2 checkpoint on the Hub use "
                "gpt2lab.load('owner/name', process=True, default_prepend_bos=True)"
            )
        unknown = sorted(set(from_pretrained_kwargs) - HF_KWARGS)
        if unknown:
            raise GPT2LabError(
                f"from_pretrained: unsupported argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} (gpt2lab reads weights from the Hugging Face cache "
                "itself; set HF_HOME to move it; quantize with gpt2lab.load(quantize='int8'))"
            )
        flags = dict(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            move_to_device=move_to_device,
        )
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise GPT2LabError(f"from_pretrained: {name} must be True or False, got {value!r}")
        _refuse(
            refactor_factored_attn_matrices is not False,
            "refactor_factored_attn_matrices",
            "gpt2lab's weight processing does not refactor W_Q W_K / W_V W_O "
            "(model.QK / model.OV are FactoredMatrix: use .make_even() on them)",
        )
        for name, value in (
            ("checkpoint_index", checkpoint_index),
            ("checkpoint_value", checkpoint_value),
            ("checkpoint_label", checkpoint_label),
        ):
            _refuse(value is not None, name, "GPT-2 has no intermediate training checkpoints")
        _refuse(n_devices != 1, f"n_devices={n_devices!r}", "gpt2lab runs on one device")
        _refuse(not move_to_device, "move_to_device=False", "gpt2lab loads onto `device` directly")
        _refuse(first_n_layers is not None, "first_n_layers", "gpt2lab loads every layer of GPT-2")
        _refuse(n_ctx is not None, "n_ctx", "gpt2lab keeps the checkpoint's context length")
        if "torch_dtype" in from_pretrained_kwargs:  # TransformerLens: it overrides dtype
            dtype = from_pretrained_kwargs["torch_dtype"]
        if device is None:
            device = utils.get_device()

        with tempfile.TemporaryDirectory() as tmp:
            source = _hf_model_dir(hf_model, tmp) if hf_model is not None else None
            if source is None:
                source = OFFICIAL[official] if official is not None else model_name
            model = load(
                source,
                dtype=dtype,
                device=device,
                default_prepend_bos=True if default_prepend_bos is None else default_prepend_bos,
                default_padding_side="right"
                if default_padding_side is None
                else default_padding_side,
            )
        if tokenizer is not None:
            _check_tokenizer(tokenizer, model)
        if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
            process_weights(
                model,
                fold_ln=fold_ln,
                center_writing_weights=center_writing_weights,
                center_unembed=center_unembed,
                fold_value_biases=fold_value_biases,
            )
        if official is not None:  # cfg.model_name, as TransformerLens sets it
            model.model_name = official
        model.generation_defaults = dict(TL_GENERATE_DEFAULTS)
        print(f"Loaded pretrained model {model_name} into HookedTransformer (gpt2lab)")
        return model

    @classmethod
    def from_pretrained_no_processing(
        cls,
        model_name: str,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = False,
        dtype: Any = "float32",
        default_prepend_bos: bool | None = None,
        default_padding_side: str | None = None,
        **from_pretrained_kwargs: Any,
    ) -> GPT2:
        """from_pretrained with every weight-processing step off: the checkpoint's weights
        as they are (what TransformerLens recommends for patching into the HF model)."""
        return cls.from_pretrained(
            model_name,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            fold_value_biases=fold_value_biases,
            dtype=dtype,
            default_prepend_bos=default_prepend_bos,
            default_padding_side=default_padding_side,
            **from_pretrained_kwargs,
        )
