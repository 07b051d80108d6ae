"""Hook points: named places in the forward pass where user functions can read or
replace an activation.

Names and semantics follow TransformerLens (`blocks.6.hook_resid_pre`, a hook is
`fn(tensor, hook) -> tensor | None`), so existing notebooks port. A `HookPoint`
overrides `__call__` to skip `nn.Module`'s dispatch machinery: with nothing attached
it is a single attribute test, so the model pays (almost) nothing for having them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Union

import torch
from torch import nn

from .errors import GPT2LabError

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
    def hooks(self, fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = ()) -> Iterator[None]:
        """Attach hooks for the duration of a `with` block (forward passes, generation...)."""
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for name, fn in fwd_hooks:
                added += self.add_hook(name, fn)
            yield
        finally:
            for hp, fn in added:
                hp.remove(fn)
