"""Hook points: named places in the forward pass where user functions can read or
replace an activation.

Names and semantics follow TransformerLens (`blocks.6.hook_resid_pre`, a hook is
`fn(tensor, hook) -> tensor | None`), so existing notebooks port. A `HookPoint`
overrides `__call__` to skip `nn.Module`'s dispatch machinery: with nothing attached
it is a single attribute test, so the model pays (almost) nothing for having them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from .errors import GPT2LabError

if TYPE_CHECKING:
    from .interp.cache import ActivationCache

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NameOrPredicate = Union[str, Callable[[str], bool]]


class HookPoint(nn.Module):
    """An identity layer that runs the functions attached to it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""  # filled in by the model once the module tree is built
        self.fns: list[HookFn] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.fns:
            return x
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if out.shape != x.shape:
                    raise GPT2LabError(
                        f"hook on {self.name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}"
                    )
                x = out
        return x

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def add(self, fn: HookFn) -> None:
        self.fns.append(fn)

    def remove(self, fn: HookFn) -> None:
        self.fns.remove(fn)

    def extra_repr(self) -> str:
        return self.name


class HookedModule(nn.Module):
    """Mixin for the root module: finds hook points by name and attaches functions."""

    def setup_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def _resolve(self, name: NameOrPredicate) -> list[HookPoint]:
        if callable(name):
            return [hp for n, hp in self.hook_dict.items() if name(n)]
        if name not in self.hook_dict:
            raise GPT2LabError(f"no hook point named {name!r} (see model.hook_names())")
        return [self.hook_dict[name]]

    def add_hook(self, name: NameOrPredicate, fn: HookFn) -> list[tuple[HookPoint, HookFn]]:
        """Attach `fn` to one hook point, or to every point whose name satisfies a predicate."""
        added = []
        for hp in self._resolve(name):
            hp.add(fn)
            added.append((hp, fn))
        return added

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.fns.clear()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
    ) -> Iterator[None]:
        """Attach hooks for the duration of a `with` block (forward passes, `generate`,
        `stream`: the hooks see every step, prompt and each new token, with the KV cache).

        A backward hook `fn(grad, hook)` sees the gradient of the loss with respect to the
        activation at that point when `.backward()` runs inside the block.
        """
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for name, fn in fwd_hooks:
                added += self.add_hook(name, fn)
            for name, fn in bwd_hooks:
                added += self.add_hook(name, _backward_hook(fn))
            yield
        finally:
            for hp, fn in added:
                hp.remove(fn)

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        **kwargs: Any,
    ) -> Any:
        """One forward pass with hooks attached (TransformerLens' `run_with_hooks`).

        Backward hooks stay attached only during the forward pass; gradients still reach
        them when the caller runs `.backward()` later, because they ride on the tensors.
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        pos_slice: Any = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward pass that records activations: returns (output, ActivationCache).

        `names_filter` is a hook name, a list of names or a predicate; by default every
        hook point is recorded except `hook_result` (per-head outputs, [batch, pos, head,
        d_model]: large, and derivable from `hook_z`; name it to get it). `pos_slice`
        keeps some positions (an int, a `slice`, a (stop,)/(start, stop) tuple or a list
        of indices, TransformerLens' `Slice` rules). `stop_at_layer=n` (a model keyword)
        stops before block n and returns the residual stream. With `incl_bwd` the output
        (or `metric(output)`) must be a scalar; `.backward()` runs and the gradients are
        recorded as `name + "_grad"`.
        """
        from .interp.cache import ActivationCache, PosSlice

        keep = _names_predicate(names_filter)
        pos = PosSlice(pos_slice)
        store: dict[str, torch.Tensor] = {}

        def save(name: str, pos_dim: int, x: torch.Tensor) -> None:
            x = x.detach()
            if remove_batch_dim:
                x = x[0]
            if x.dim() >= -pos_dim:
                x = pos.apply(x, pos_dim)
            store[name] = x.to(device=device, dtype=dtype)

        fwd, bwd = [], []
        for name in self.hook_dict:
            if not keep(name):
                continue
            # q, k, v, z and result carry a head axis after the position axis
            pos_dim = (
                -3 if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")) else -2
            )
            fwd.append((name, lambda x, hook, d=pos_dim: save(hook.name, d, x)))
            if incl_bwd:
                bwd.append((name, lambda g, hook, d=pos_dim: save(hook.name + "_grad", d, g)))
        with self.hooks(fwd, bwd):
            out = self(*args, **kwargs)
            if incl_bwd:
                target = metric(out) if metric is not None else out
                if not isinstance(target, torch.Tensor) or target.numel() != 1:
                    raise GPT2LabError(
                        "incl_bwd needs a scalar to differentiate: pass metric=fn(logits) -> scalar"
                    )
                target.backward()
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)


NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


def _names_predicate(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: not name.endswith("hook_result")
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        wanted = set(names_filter)
        return wanted.__contains__
    raise GPT2LabError(
        "names_filter must be a hook name, a list of names or a function name -> bool"
    )


def _backward_hook(fn: HookFn) -> HookFn:
    """Turn `fn(grad, hook)` into a forward hook that registers it on the activation."""

    def register(x: torch.Tensor, hook: HookPoint) -> None:
        if x.requires_grad:
            x.register_hook(lambda grad: fn(grad, hook))

    return register
