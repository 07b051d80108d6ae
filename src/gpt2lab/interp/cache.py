"""The activation cache that `run_with_cache` returns.

It is a read-only mapping from hook names to tensors, addressed either by full name
(`"blocks.6.hook_resid_pre"`) or TransformerLens shorthand (`cache["resid_pre", 6]`,
`cache["pattern", -1]`, `cache["scale", 3, "ln1"]`), so notebooks written for
TransformerLens port unchanged. Analyses that combine cached activations with the
model's weights (decomposing the residual stream, head and neuron contributions,
logit attribution) live here too, as methods, because that is where users look for
them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError

if TYPE_CHECKING:
    from ..model import GPT2

_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
_ATTN_ACTS = {"k", "v", "q", "z", "result", "pattern", "attn_scores"}
_MLP_ACTS = {"pre", "post"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from shorthand, by TransformerLens' rules.

    get_act_name("k", 6) == "blocks.6.attn.hook_k"; get_act_name("pre", 2) ==
    "blocks.2.mlp.hook_pre"; get_act_name("scale", 4, "ln1") == "blocks.4.ln1.hook_scale";
    get_act_name("k6") == "blocks.6.attn.hook_k"; get_act_name("scale") ==
    "ln_final.hook_scale"; a full name is returned as is.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.fullmatch(r"([a-z_]+?)(\d+)([a-z_]\w*)?", name)
    if match is not None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3)
    name = _ACT_ALIASES.get(name, name)
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class PosSlice:
    """Which positions to keep, by TransformerLens' `Slice.unwrap` rules: None keeps all,
    an int keeps that one position (the axis stays, with length 1), a `slice` or a tuple
    (`slice(*tuple)`) keeps a range, a list / tensor of indices keeps those."""

    def __init__(self, spec: Any = None):
        if isinstance(spec, PosSlice):
            spec = spec.spec
        if spec is None:
            index: Any = slice(None)
        elif isinstance(spec, tuple):
            index = slice(*spec)
        elif isinstance(spec, int):
            index = torch.tensor([spec], dtype=torch.long)
        elif isinstance(spec, slice):
            index = spec
        elif isinstance(spec, (list, torch.Tensor)):
            index = torch.as_tensor(spec, dtype=torch.long)
        else:
            raise GPT2LabError(
                f"pos_slice must be None, an int, a slice, a tuple or a list; got {spec!r}"
            )
        self.spec, self.index = spec, index

    @property
    def is_identity(self) -> bool:
        return self.spec is None

    def apply(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        if self.is_identity:
            return x
        dim = dim % x.dim()
        index = self.index
        if isinstance(index, torch.Tensor):
            index = index.to(x.device)  # advanced indexing: negative positions count from the end
        return x[(slice(None),) * dim + (index,)]


class ActivationCache(Mapping):
    """Activations recorded by `run_with_cache`, keyed by hook name."""

    def __init__(self, store: dict[str, torch.Tensor], model: GPT2, has_batch_dim: bool = True):
        self.cache_dict = store
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- mapping -----------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else get_act_name(key)
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            name, *rest = key
            if rest and rest[0] is not None and rest[0] < 0:
                rest[0] += self.model.cfg.n_layers
            return get_act_name(name, *rest)
        raise GPT2LabError(
            f"cache keys are hook names or (name, layer[, type]) tuples; got {key!r}"
        )

    def __getitem__(self, key: Any) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            raise KeyError(
                f"{name!r} was not cached (cached: {len(self.cache_dict)} names; "
                "check names_filter, and that hook_result is requested by name)"
            )
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except GPT2LabError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A copy of the cache moved to another device and/or dtype."""
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.cache_dict.items()}
        return ActivationCache(moved, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch axis of a batch-1 cache (TransformerLens' `remove_batch_dim`)."""
        if not self.has_batch_dim:
            return self
        if any(v.shape[0] != 1 for v in self.cache_dict.values()):
            raise GPT2LabError("remove_batch_dim needs a cache of batch size 1")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, False)

    def nbytes(self) -> int:
        """Memory the cached tensors hold (views of one storage counted once)."""
        seen: dict[int, int] = {}
        for v in self.cache_dict.values():
            storage = v.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())
