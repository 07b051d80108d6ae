"""Hook points: named places in the forward pass where user functions can read or
replace an activation.

Names and semantics follow TransformerLens (`blocks.6.hook_resid_pre`, a hook is
`fn(tensor, hook) -> tensor | None`), so existing notebooks port. A `HookPoint`
overrides `__call__` to skip `nn.Module`'s dispatch machinery: with nothing attached
it is one context-variable read, so the model pays (almost) nothing for having them.

Why hooks live in a context variable and not on the module: one model is shared by
many threads (a server, a notebook running a steering sweep while another cell
generates). Hooks attached by `with model.hooks(...)`, `run_with_hooks` and
`run_with_cache` belong to the block that attached them: the block is a `_Scope`, and
the scopes open in a thread (or asyncio task) are listed in a `contextvars.ContextVar`,
so a concurrent caller of the same model never sees them. When the block ends, its
scope is closed for every context that still lists it (a task created inside the block,
a generator moved to another thread), so a finished block's hooks never run again.
Only `add_hook` (TransformerLens' persistent hooks) puts a hook on the model itself,
for every caller, until `reset_hooks()`.

A block's hooks apply where it was opened: a `with model.hooks(...)` around a `yield`
whose generator is resumed in other threads runs its hooks only in the thread that
entered it (gpt2lab's own `stream` runs every step in the context it was created in).
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
from torch import nn

from .errors import GPT2LabError

if TYPE_CHECKING:
    from .interp.cache import ActivationCache

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NameOrPredicate = Union[str, Callable[[str], bool]]


class _Scope:
    """The hooks of one `hooks()` block of model `owner`: hook point -> functions.
    `reset_hooks()` inside the block replaces it, in its context, by a filtered copy that
    shares its `root`: a scope is live while its root block is open."""

    __slots__ = ("hooks", "owner", "root", "open", "writes_only")

    def __init__(
        self,
        hooks: dict[HookPoint, tuple[HookFn, ...]],
        owner: HookedModule,
        root: _Scope | None = None,
        writes_only: bool = False,
    ):
        self.hooks, self.owner = hooks, owner
        self.root = self if root is None else root
        self.open = True
        # A block whose hooks only write (steering): it does not switch the model to
        # the step-by-step path, so a steered model runs the fused kernels, and a row
        # steered by nothing computes bit for bit what the plain model does.
        self.writes_only = writes_only


# The hook scopes of this thread / task, outer first (a tuple: replaced, never edited,
# so a context that copied it cannot be changed behind its back).
_scopes: ContextVar[tuple[_Scope, ...]] = ContextVar("gpt2lab_hook_scopes", default=())
# Blocks open anywhere in the process. While there are none, a hook point does not even
# read the context variable (and torch.compile traces it without a graph break).
_open_blocks = 0
_lock = threading.Lock()  # for _open_blocks and the persistent hooks' read-modify-write
# Replaced by a new object whenever any hook point's persistent hooks change, so that a
# model can remember whether it has any until the next change: walking its ~440 hook
# points costs ~300 us at every decoding step of gpt2-medium (the weights streamed
# through the caches have just evicted them). A fresh object, not a count: an answer
# remembered with a model and copied or pickled with it never matches a later token.
_persistent_epoch = object()


class HookPoint(nn.Module):
    """An identity layer that runs the functions attached to it, in order: the model's
    persistent hooks (`add_hook`), then those of the enclosing `hooks()` blocks, outer
    first."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""  # filled in by the model once the module tree is built
        self.persistent: tuple[HookFn, ...] = ()  # replaced, never edited: safe to read anywhere
        # TransformerLens' `hook.ctx`: a dict a hook may keep state in, across hooks and
        # forward passes, until `reset_hooks()` (or `clear_contexts()`) empties it. It
        # belongs to the hook point, so every thread using the model shares it.
        self.ctx: dict[Any, Any] = {}

    def layer(self) -> int:
        """The layer index in this hook point's name (`blocks.3.attn.hook_z` -> 3), as
        TransformerLens' `HookPoint.layer()`; a point outside the blocks is an error."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise GPT2LabError(f"hook point {self.name!r} is not inside a block: it has no layer")
        return int(parts[1])

    def clear_context(self) -> None:
        self.ctx = {}

    @property
    def persistent(self) -> tuple[HookFn, ...]:
        """The hooks attached for every caller (`add_hook`), in order."""
        return self._persistent

    @persistent.setter
    def persistent(self, fns: Iterable[HookFn]) -> None:
        global _persistent_epoch
        self.__dict__["_persistent"] = tuple(fns)
        _persistent_epoch = object()  # after the change: see _has_persistent

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "persistent" in state:  # pickled before `persistent` became a property
            state["_persistent"] = state.pop("persistent")
        super().__setstate__(state)

    @property
    def fns(self) -> tuple[HookFn, ...]:
        """The functions that run here for the current caller."""
        fns = self.persistent
        if _open_blocks:
            for scope in _scopes.get():
                if scope.root.open and (mine := scope.hooks.get(self)):
                    fns += mine
        return fns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        fns = self.fns
        if not fns:
            return x
        for fn in fns:
            out = fn(x, self)
            if out is not None:
                x = self._checked(out, x, fn)
        return x

    def _checked(self, out: Any, x: torch.Tensor, fn: HookFn) -> torch.Tensor:
        """A hook's replacement must be a drop-in for the activation: a tensor of the same
        shape and device (anything else fails later, deep in a matmul, with an error that
        names neither the hook nor the point). Another float dtype is cast back (a float64
        steering vector added to a float32 activation), except under autocast, where
        mixed float dtypes are what autocast itself produces and resolves."""
        what = getattr(fn, "__name__", type(fn).__name__)
        if not isinstance(out, torch.Tensor):
            raise GPT2LabError(
                f"hook {what} on {self.name} returned a {type(out).__name__}; a hook returns "
                "None or a tensor like its input"
            )
        floats = out.is_floating_point() and x.is_floating_point()
        if out.dtype != x.dtype and floats and not torch.is_autocast_enabled(x.device.type):
            out = out.to(x.dtype)
        if out.shape != x.shape or out.device != x.device or (out.dtype != x.dtype and not floats):
            raise GPT2LabError(
                f"hook {what} on {self.name} returned {tuple(out.shape)} {out.dtype} on "
                f"{out.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        return out

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def add(self, fn: HookFn, prepend: bool = False) -> None:
        """Attach `fn` for every caller (a persistent hook), last (or first with `prepend`)."""
        with _lock:
            self.persistent = (fn, *self.persistent) if prepend else (*self.persistent, fn)

    def remove(self, fn: HookFn) -> None:
        """Detach `fn` (the function given to `add` / `add_hook`)."""
        with _lock:
            fns = [f for f in self.persistent if f is not fn and getattr(f, "fn", None) is not fn]
            self.persistent = tuple(fns)

    def remove_hooks(
        self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """TransformerLens' `HookPoint.remove_hooks`: drop this point's persistent hooks in
        direction `dir` ("fwd", "bwd", "both"); permanent ones only with
        `including_permanent`; with `level`, only those added at that level."""
        _check_direction(dir, both=True)
        with _lock:
            self.persistent = tuple(
                f for f in self.persistent if not _removable(f, dir, including_permanent, level)
            )

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
        self.hook_points = frozenset(self.hook_dict.values())

    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def _resolve(self, name: NameOrPredicate) -> list[HookPoint]:
        if callable(name):
            return [hp for n, hp in self.hook_dict.items() if name(n)]
        if not isinstance(name, str):
            raise GPT2LabError(
                f"a hook is attached by name or by a predicate name -> bool, got {type(name).__name__}"
            )
        if name not in self.hook_dict:
            raise GPT2LabError(f"no hook point named {name!r}{_did_you_mean(name, self.hook_dict)}")
        return [self.hook_dict[name]]

    def _pairs(self, hooks: Any, kind: str) -> list[tuple[HookPoint, HookFn]]:
        """(hook point, function) for each (name or predicate, function) pair, checked
        before anything is attached."""
        if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
            raise GPT2LabError(f"{kind} must be a list of (name, function) pairs")
        pairs = []
        for item in hooks:
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not callable(item[1]):
                raise GPT2LabError(
                    f"{kind} must be a list of (name, function) pairs, got an item {item!r:.80}"
                )
            pairs += [(hp, item[1]) for hp in self._resolve(item[0])]
        return pairs

    def add_hook(
        self,
        name: NameOrPredicate,
        fn: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> list[tuple[HookPoint, HookFn]]:
        """Attach `fn` to one hook point, or to every point whose name satisfies a
        predicate, for every caller of this model (TransformerLens' `add_hook`).

        `dir="bwd"`: `fn(grad, hook)` runs on the gradient at that point when a backward
        pass goes through it. `reset_hooks()` removes the hook unless `is_permanent`
        (then only `reset_hooks(including_permanent=True)` does); `level` tags it for
        `reset_hooks(level=...)`; `prepend=True` runs it before the point's other hooks.
        For hooks that belong to one call (and one thread), use `with model.hooks(...)`."""
        if not callable(fn):
            raise GPT2LabError(
                f"a hook must be a function (tensor, hook) -> tensor | None, got {fn!r:.80}"
            )
        _check_direction(dir)
        if not isinstance(is_permanent, bool):
            raise GPT2LabError(f"is_permanent must be True or False, got {is_permanent!r:.80}")
        if not isinstance(prepend, bool):
            raise GPT2LabError(f"prepend must be True or False, got {prepend!r:.80}")
        if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
            raise GPT2LabError(f"level must be None or an int, got {level!r:.80}")
        added = []
        hook = _PersistentHook(fn, dir, is_permanent, level)
        for hp in self._resolve(name):
            hp.add(hook, prepend=prepend)
            added.append((hp, fn))
        return added

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks, as TransformerLens' `reset_hooks`: the persistent hooks
        (`add_hook`) in `direction` ("fwd", "bwd" or "both"), except permanent ones unless
        `including_permanent`, only those tagged `level` if given; and, with `level` None,
        the hooks this caller's enclosing `hooks()` blocks attached (until those blocks
        end; other threads keep theirs). `clear_contexts` empties every `hook.ctx`."""
        _check_direction(direction, both=True)
        if clear_contexts:
            self.clear_contexts()
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent, level)
        scopes = _scopes.get()
        if scopes and level is None:
            mine = set(self.hook_dict.values())

            def kept(hp: HookPoint, fns: tuple[HookFn, ...]) -> tuple[HookFn, ...]:
                if hp not in mine:
                    return fns
                return tuple(f for f in fns if not _removable(f, direction, True, None))

            _scopes.set(tuple(
                _Scope(
                    {hp: k for hp, f in s.hooks.items() if (k := kept(hp, f))},
                    s.owner, s.root, s.writes_only,
                )
                for s in scopes if s.root.open
            ))  # fmt: skip

    def clear_contexts(self) -> None:
        """Empty every hook point's `ctx` dict."""
        for hp in self.hook_dict.values():
            hp.clear_context()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
    ) -> Iterator[None]:
        """Attach hooks for the duration of a `with` block (forward passes, `generate`,
        `stream`: the hooks see every step, prompt and each new token, with the KV cache).

        The hooks belong to this thread (or asyncio task) only: other callers of the same
        model, concurrently, run without them. A backward hook `fn(grad, hook)` sees the
        gradient of the loss with respect to the activation at that point when
        `.backward()` runs inside the block.
        """
        pairs = self._pairs(fwd_hooks, "fwd_hooks")
        pairs += [(hp, _backward_hook(fn)) for hp, fn in self._pairs(bwd_hooks, "bwd_hooks")]
        with self._scope(pairs, writes_only=False):
            yield

    @contextmanager
    def _scope(self, pairs: list[tuple[HookPoint, HookFn]], writes_only: bool) -> Iterator[None]:
        """Open a block holding these (hook point, function) pairs in this context."""
        global _open_blocks
        attached: dict[HookPoint, tuple[HookFn, ...]] = {}
        for hp, fn in pairs:
            attached[hp] = (*attached.get(hp, ()), fn)
        scope = _Scope(attached, self, writes_only=writes_only)
        with _lock:
            _open_blocks += 1
        _scopes.set((*_scopes.get(), scope))
        try:
            yield
        finally:
            scope.open, scope.hooks = False, {}  # closed in every context that lists it
            with _lock:
                _open_blocks -= 1
            _scopes.set(tuple(s for s in _scopes.get() if s.root.open))

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NameOrPredicate, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One forward pass with hooks attached (TransformerLens' `run_with_hooks`); model
        keywords (`return_type`, `loss_per_token`, ...) pass through.

        Backward hooks stay attached only during the forward pass; gradients still reach
        them when the caller runs `.backward()` later, because they ride on the tensors.
        `clear_contexts=True` empties every `hook.ctx` afterwards. The hooks always end
        with the call (`reset_hooks_end=False` is refused: `add_hook` keeps a hook).
        """
        if reset_hooks_end is not True:
            raise GPT2LabError(
                "run_with_hooks(reset_hooks_end=False) is not supported: hooks belong to the "
                "call; attach lasting ones with model.add_hook(name, fn)"
            )
        if not isinstance(clear_contexts, bool):
            raise GPT2LabError(f"clear_contexts must be True or False, got {clear_contexts!r:.80}")
        try:
            with self.hooks(fwd_hooks, bwd_hooks):
                return self(*args, **kwargs)
        finally:
            if clear_contexts:
                self.clear_contexts()

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
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, torch.Tensor]]:
        """Forward pass that records activations: returns (output, ActivationCache).

        `names_filter` is a hook name, a list of names or a predicate; by default every
        hook point is recorded except `hook_result` (per-head outputs, [batch, pos, head,
        d_model]: large, and derivable from `hook_z`; name it to get it). `pos_slice`
        keeps some positions (an int, a `slice`, a (stop,)/(start, stop) tuple or a list
        of indices, TransformerLens' `Slice` rules). `stop_at_layer=n` (a model keyword)
        stops before block n and returns the residual stream. With `incl_bwd` the output
        (or `metric(output)`) must be a scalar; `.backward()` runs and the gradients are
        recorded as `name + "_grad"`. Model keywords (`return_type`, `loss_per_token`)
        pass through; `return_cache_object=False` returns a plain dict instead of the
        ActivationCache. After `model.set_use_attn_result(True)` the default also records
        `hook_result`.
        """
        from .interp.cache import ActivationCache, PosSlice

        if not isinstance(return_cache_object, bool):
            raise GPT2LabError(
                f"return_cache_object must be True or False, got {return_cache_object!r:.80}"
            )
        keep = _names_predicate(
            names_filter, self.hook_dict, getattr(self, "_use_attn_result", False)
        )
        pos = PosSlice(pos_slice)
        store: dict[str, torch.Tensor] = {}

        def save(name: str, pos_dim: int, x: torch.Tensor) -> None:
            x = x.detach()
            if remove_batch_dim:
                if x.shape[0] != 1:
                    raise GPT2LabError(
                        f"remove_batch_dim=True needs a batch of one, got {x.shape[0]} rows"
                    )
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
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)


NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


def _names_predicate(
    names_filter: NamesFilter, hook_dict: Mapping[str, HookPoint], attn_result: bool = False
) -> Callable[[str], bool]:
    """`names_filter` as a predicate; a name that is no hook point (a typo) is an error,
    not an empty cache, and so is a predicate that matches nothing. None: every point
    (but hook_result unless `attn_result`)."""
    if names_filter is None:
        if attn_result:
            return lambda name: True
        return lambda name: not name.endswith("hook_result")
    if isinstance(names_filter, str):
        names_filter = [names_filter]
    if callable(names_filter):
        if not any(names_filter(n) for n in hook_dict):
            raise GPT2LabError("names_filter matches no hook point (see model.hook_names())")
        return names_filter
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        wanted = set(names_filter)
        for name in wanted:
            if not isinstance(name, str) or name not in hook_dict:
                raise GPT2LabError(
                    f"names_filter: no hook point named {name!r}{_did_you_mean(name, hook_dict)}"
                )
        return wanted.__contains__
    raise GPT2LabError(
        "names_filter must be a hook name, a list of names or a function name -> bool"
    )


def _did_you_mean(name: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else " (see model.hook_names())"


def _backward_hook(fn: HookFn) -> HookFn:
    """Turn `fn(grad, hook)` into a forward hook that registers it on the activation."""

    def register(x: torch.Tensor, hook: HookPoint) -> None:
        if x.requires_grad:
            x.register_hook(lambda grad: fn(grad, hook))

    register.dir = "bwd"  # type: ignore[attr-defined]
    register.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return register


class _PersistentHook:
    """A hook attached by `add_hook`, with TransformerLens' handle attributes."""

    __slots__ = ("fn", "dir", "is_permanent", "level", "_run", "__name__")

    def __init__(self, fn: HookFn, dir: str, is_permanent: bool, level: int | None):
        self.fn, self.dir, self.is_permanent, self.level = fn, dir, is_permanent, level
        self._run = _backward_hook(fn) if dir == "bwd" else fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        return self._run(x, hook)


def _check_direction(dir: Any, both: bool = False) -> None:
    allowed = ("fwd", "bwd", "both") if both else ("fwd", "bwd")
    if not isinstance(dir, str) or dir not in allowed:
        raise GPT2LabError(f"direction must be {', '.join(map(repr, allowed))}; got {dir!r:.80}")


def _removable(fn: HookFn, direction: str, including_permanent: bool, level: int | None) -> bool:
    """Whether `reset_hooks` / `remove_hooks` with these arguments removes `fn`."""
    if direction != "both" and getattr(fn, "dir", "fwd") != direction:
        return False
    if including_permanent:
        return True
    if getattr(fn, "is_permanent", False):
        return False
    return level is None or getattr(fn, "level", None) == level


def hooked(model: HookedModule) -> bool:
    """Whether the current caller runs `model` hooked: a persistent hook on one of its
    hook points, or a `hooks()` block of this model open in this context (even one that
    attached nothing: `with model.hooks():` asks for the hooked path explicitly).

    The model asks once per forward and, if so, computes every layer step by step (see
    `GPT2.forward`): what a hook reads must not depend on which other hooks are attached."""
    return _hooks_in_effect(model, with_writes_only=False)


def any_hook(model: HookedModule) -> bool:
    """Whether any hook of `model` would fire in this context, writes-only ones
    (steering, which keeps the fused kernels) included: the native decoding step
    (kernels/step.py) has no hook points, so it must step aside for every one."""
    return _hooks_in_effect(model, with_writes_only=True)


def _hooks_in_effect(model: HookedModule, with_writes_only: bool) -> bool:
    points = model.hook_points
    if _has_persistent(model, points):
        return True
    if _open_blocks:
        for scope in _scopes.get():
            if (scope.writes_only and not with_writes_only) or not scope.root.open:
                continue
            if scope.owner is model or not points.isdisjoint(scope.hooks):
                return True
    return False


def _has_persistent(model: HookedModule, points: frozenset[HookPoint]) -> bool:
    """Whether a hook point of `model` holds a persistent hook, remembered until any hook
    point's persistent hooks change. The epoch is read before the walk: a change made
    during it leaves a stale epoch behind, and the next call walks again."""
    epoch = _persistent_epoch
    seen = model.__dict__.get("_persistent_seen")
    if seen is not None and seen[0] is epoch and seen[1] is points:
        return seen[2]
    found = any(hp.persistent for hp in points)
    model.__dict__["_persistent_seen"] = (epoch, points, found)
    return found


class Positions(NamedTuple):
    """Where the tokens of the forward pass now running sit in their sequences, for hooks
    that act by position (steering): `ids` [batch, pos], each token's position among the
    real tokens of its row (what the position embedding sees by default: left padding is
    not counted, a KV cache's earlier tokens are); `real` [batch, pos] bool, False on
    padding (None when nothing is padded); `prompt` [batch], how many real tokens the
    row's prompt has (the tokens of the first call into the KV cache), None without a
    cache: then every token is prompt."""

    ids: torch.Tensor
    real: torch.Tensor | None
    prompt: torch.Tensor | None


_positions: ContextVar[Positions | None] = ContextVar("gpt2lab_positions", default=None)


def positions() -> Positions:
    """The positions of the forward pass now running (see `Positions`), from inside a
    hook of a `hooks()` block (or a steering block)."""
    found = _positions.get()
    if found is None:
        raise GPT2LabError(
            "hooks.positions() is only known inside a forward pass run in a hooks() block"
        )
    return found


@contextmanager
def where_tokens_are(seq_pos, key_mask, past: int, cache: Any) -> Iterator[None]:
    """While a hooks() or steering block is open, tell hooks where this forward pass's
    tokens sit in their sequences (`hooks.positions()`): steering by position counts
    the same positions with a KV cache (one new token per call) as without one."""
    if not _open_blocks:
        yield
        return
    prompt = None
    if cache is not None:
        end = cache.prompt_end
        prompt = (
            cache.key_mask[:, :end].sum(1)
            if cache.has_padding
            else seq_pos.new_full((seq_pos.shape[0],), end)
        )
    real = None if key_mask is None else key_mask[:, past:]
    token = _positions.set(Positions(seq_pos, real, prompt))
    try:
        yield
    finally:
        _positions.reset(token)
