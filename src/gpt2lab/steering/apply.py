"""Applying steering vectors: an operator, a coefficient and the positions it acts on.

With direction v at a hook, coefficient c, and u = v / |v| (0 for a zero vector), the
activation x at each chosen position becomes

    add         x + c v                     (ActAdd, CAA, mean difference)
    ablate      x - (x . u) u               (the direction projected out; c unused)
    ablate_add  x - (x . u) u + c v         (projection set to c |v|: steer to a level)
    cap         x + (min(x . u, c) - x . u) u  (the projection capped at c)

and with `preserve_norm`, rescaled to its norm before steering. `add` uses v as given
(its norm is part of the vector); the others use its unit direction, so a non-unit
vector ablates exactly its direction.

Positions are absolute positions in the sequence, prompt and generated tokens together,
counted over real tokens (left padding is not counted; a BOS token, if prepended, is
position 0): "all", "prompt", "generated", "from=k" (or k), or a boolean mask over
positions ([pos] or [rows, pos]). The model tells the hooks where each forward pass's
tokens sit (`hooks.positions()`), so decoding with the KV cache, one token per call,
steers exactly the positions a full recomputation of the sequence would: the public
tools that count positions within each call steer every new token as if it were
position 0 (steering-vectors #60, CAA #3). The prompt is what the first call into the KV
cache held; without a cache (scoring, run_with_cache) every token is prompt.

A direction [n, width] (ActAdd) is added at n consecutive positions starting at 0
("all"), at k ("from=k") or at the first generated token ("generated").

Steering runs the model's fused kernels (steering hooks only write, so they do not
switch the model to the step-by-step path hooks that read need): a zero vector, or a
row steered by nothing in a batch of steered rows, computes bit for bit what the plain
model does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..errors import GPT2LabError
from ..hooks import positions as current_positions
from ..validate import show
from .vector import OPERATORS, SteeringVector

Coefficient = Union[float, Sequence[float], torch.Tensor]
Where = Union[str, int, Sequence[bool], torch.Tensor]


@dataclass(frozen=True)
class Steering:
    """A steering vector (or one per batch row) with how to apply it. Use it as
    `with steering.applied(model):`, or pass it as `steer=` to generate / stream /
    score / perplexity. Checked when made (`model` given) or when applied."""

    vector: SteeringVector | tuple[SteeringVector | None, ...]
    coefficient: Coefficient = 1.0
    operator: str = "add"
    positions: Where = "all"
    preserve_norm: bool = False

    def __post_init__(self) -> None:
        vector = self.vector
        if isinstance(vector, (list, tuple)):
            if not vector or not all(v is None or isinstance(v, SteeringVector) for v in vector):
                raise GPT2LabError(
                    "per-row steering takes a list with one SteeringVector (or None) per row"
                )
            if all(v is None for v in vector):
                raise GPT2LabError("per-row steering needs a vector for at least one row")
            object.__setattr__(self, "vector", tuple(vector))
        elif not isinstance(vector, SteeringVector):
            raise GPT2LabError(f"steer with a SteeringVector, got {show(vector)}")
        if not isinstance(self.operator, str) or self.operator not in OPERATORS:
            raise GPT2LabError(
                f"operator must be one of {', '.join(OPERATORS)}; got {show(self.operator)}"
            )
        if not isinstance(self.preserve_norm, bool):
            raise GPT2LabError(
                f"preserve_norm must be True or False, got {show(self.preserve_norm)}"
            )
        object.__setattr__(self, "coefficient", _coefficient(self.coefficient, self.rows))
        object.__setattr__(self, "positions", _where(self.positions))

    @property
    def rows(self) -> int | None:
        """Rows for per-row steering (None: every row alike)."""
        return len(self.vector) if isinstance(self.vector, tuple) else None

    def hook_pairs(self, model: Any) -> list[tuple[str, _SteerHook]]:
        """(hook name, function) for each hook this steering touches, checked on `model`."""
        vectors = self.vector if isinstance(self.vector, tuple) else (self.vector,)
        hooks: dict[str, None] = {}
        for v in vectors:
            if v is not None:
                v.check(model)
                hooks.update(dict.fromkeys(v.hooks))
        pairs = []
        for hook in hooks:
            dirs = [None if v is None else v.directions.get(hook) for v in vectors]
            pairs.append((hook, _SteerHook(hook, dirs, self, per_row=self.rows is not None)))
        return pairs

    @contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Steer `model` for this thread (or asyncio task) while the block is open: every
        forward pass, generate, stream, score and run_with_cache inside it."""
        with model._scope(model._pairs(self.hook_pairs(model), "steering"), writes_only=True):
            yield


def steer(
    model: Any,
    vector: SteeringVector | Sequence[SteeringVector | None],
    coefficient: Coefficient = 1.0,
    *,
    operator: str = "add",
    positions: Where = "all",
    preserve_norm: bool = False,
):
    """`with steer(model, vector, 4.0):` steers the model inside the block (see the
    module docstring for operators and positions). A list of vectors (None for rows left
    alone), and a list of coefficients, steer each row of a batch its own way."""
    return Steering(vector, coefficient, operator, positions, preserve_norm).applied(model)


def as_steering(value: Any) -> list[Steering]:
    """What `steer=` accepts in generate / stream / score: a Steering, a SteeringVector
    (added with coefficient 1), a (vector, coefficient) pair, or a list of these."""
    if isinstance(value, (Steering, SteeringVector)) or (
        isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], SteeringVector)
    ):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise GPT2LabError(
            "steer= takes a Steering, a SteeringVector, a (vector, coefficient) pair or a "
            f"list of them, got {show(value)}"
        )
    out = []
    for item in value:
        if isinstance(item, Steering):
            out.append(item)
        elif isinstance(item, SteeringVector):
            out.append(Steering(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], SteeringVector):
            out.append(Steering(item[0], item[1]))
        else:
            raise GPT2LabError(f"steer= got an item {show(item)}; expected a Steering or a vector")
    return out


@contextmanager
def steered(model: Any, value: Any) -> Iterator[None]:
    """Apply what `steer=` was given (nothing for None) around a call."""
    if value is None:
        yield
        return
    from contextlib import ExitStack

    items = as_steering(value)
    with ExitStack() as stack:
        for item in items:
            stack.enter_context(item.applied(model))
        yield


def steered_stream(model: Any, prompt: str, value: Any, options: dict[str, Any]) -> Iterator[str]:
    """`model.stream(prompt, steer=...)`: the steering block is opened in a context of
    its own, which `stream` copies, so every step is steered wherever it is advanced, and
    closed when the stream ends or is closed. Arguments are checked before it returns."""
    import contextvars

    from ..generation import stream

    ctx = contextvars.copy_context()
    block = steered(model, value)
    ctx.run(block.__enter__)
    try:
        pieces = ctx.run(stream, model, prompt, **options)
    except BaseException:
        ctx.run(block.__exit__, None, None, None)
        raise
    return _closing(ctx, block, pieces)


def _closing(ctx: Any, block: Any, pieces: Iterator[str]) -> Iterator[str]:
    try:
        yield from pieces
    finally:
        ctx.run(block.__exit__, None, None, None)


# ---- checking what was given -----------------------------------------------------------
def _coefficient(value: Any, rows: int | None) -> float | torch.Tensor:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise GPT2LabError(f"the steering coefficient must be finite, got {value}")
        return float(value)
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dim() != 1 or t.numel() == 0 or isinstance(value, (str, bytes)):
        raise GPT2LabError(f"the coefficient is a number or one number per row, got {show(value)}")
    if not bool(torch.isfinite(t).all()):
        raise GPT2LabError("the steering coefficients must be finite")
    if rows is not None and t.numel() != rows:
        raise GPT2LabError(f"{t.numel()} coefficients for {rows} rows of vectors")
    return t


def _where(value: Any) -> str | int | torch.Tensor:
    if isinstance(value, str):
        if value in ("all", "prompt", "generated"):
            return value
        if value.startswith("from="):
            try:
                return _start(int(value[5:]))
            except ValueError:
                pass
        raise GPT2LabError(
            f"positions must be 'all', 'prompt', 'generated', 'from=k' or a mask, got {value!r}"
        )
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _start(int(value))
    try:
        mask = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        mask = None
    if mask is None or mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.numel() == 0:
        raise GPT2LabError(
            "positions must be 'all', 'prompt', 'generated', 'from=k' or a boolean mask "
            f"[pos] or [rows, pos], got {show(value)}"
        )
    return mask


def _start(k: int) -> int:
    if k < 0:
        raise GPT2LabError(f"positions from=k needs k >= 0, got {k}")
    return k


# ---- the hook ------------------------------------------------------------------------
class _SteerHook:
    """The function steering puts on one hook point: which rows, which positions, and
    the operator, on tensors moved once to the activation's device."""

    def __init__(self, hook: str, dirs: list[torch.Tensor | None], s: Steering, per_row: bool):
        self.__name__ = f"steering@{hook}"
        self.op, self.where, self.preserve = s.operator, s.positions, s.preserve_norm
        shapes = {tuple(d.shape) for d in dirs if d is not None}
        if len(shapes) != 1:
            raise GPT2LabError(f"per-row directions at {hook} differ in shape: {sorted(shapes)}")
        (shape,) = shapes
        self.sequence = len(shape) == 2  # ActAdd: n positions
        if self.sequence and per_row:
            raise GPT2LabError("a sequence direction (ActAdd) applies to every row alike")
        if self.sequence and (isinstance(self.where, torch.Tensor) or self.where == "prompt"):
            raise GPT2LabError(
                "a sequence direction (ActAdd) starts at a position: 'all' (0), 'from=k' or "
                "'generated'"
            )
        width = shape[-1]
        self.active = None if not per_row else torch.tensor([d is not None for d in dirs])
        v = torch.stack([torch.zeros(width) if d is None else d for d in dirs])  # [rows, ...]
        self.v = v if per_row else v[0]
        c = s.coefficient
        if per_row and not isinstance(c, torch.Tensor):
            c = torch.full((len(dirs),), c)
        elif isinstance(c, torch.Tensor) and not per_row:
            self.active = torch.ones(c.numel(), dtype=torch.bool)  # per-row coefficients
            self.v = v[0].expand(c.numel(), *shape).contiguous()
        self.c = c
        self._on: dict[Any, tuple] = {}

    def _tensors(self, x: torch.Tensor) -> tuple:
        key = x.device
        if key not in self._on:  # a block is used by one caller: no lock needed
            v = self.v.to(x.device)
            norm = v.norm(dim=-1, keepdim=True)
            u = torch.where(norm > 0, v / norm.clamp_min(1e-30), torch.zeros_like(v))
            c = self.c.to(x.device) if isinstance(self.c, torch.Tensor) else self.c
            active = None if self.active is None else self.active.to(x.device)
            self._on[key] = (v, u, c, active)
        return self._on[key]

    def __call__(self, x: torch.Tensor, hook: Any) -> torch.Tensor:
        v, u, c, active = self._tensors(x)
        where = current_positions()
        B, T = x.shape[0], x.shape[1]
        if x.dim() != 3:
            raise GPT2LabError(
                f"steering at {hook.name} needs [batch, pos, width], got {list(x.shape)}"
            )
        sel = self._selected(where, B, T)
        if self.sequence:
            n = v.shape[0]
            offset = where.ids - self._seq_start(where, B)  # [B, T]
            inside = (offset >= 0) & (offset < n)
            sel = inside if sel is None else sel & inside
            idx = offset.clamp(0, n - 1)
            v, u = v[idx], u[idx]  # [B, T, width]
        elif active is not None:  # per row: [rows, width] -> [B, 1, width]
            v, u, c, active = (_rows(t, B, hook) for t in (v, u, c, active))
            v, u, c = v[:, None], u[:, None], c[:, None, None]
            sel = active[:, None].expand(B, T) if sel is None else sel & active[:, None]
        new = self._operate(x, v, u, c)
        if self.preserve:
            new = new * (
                x.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            )
        if sel is None:
            return new
        return torch.where(sel[..., None], new, x)

    def _operate(self, x, v, u, c):
        if self.op == "add":
            return x + c * v
        proj = (x * u).sum(-1, keepdim=True)
        if self.op == "ablate":
            return x - proj * u
        if self.op == "ablate_add":
            return x - proj * u + c * v
        return (
            x + (torch.clamp(proj, max=c) - proj) * u
            if not isinstance(c, torch.Tensor)
            else (x + (torch.minimum(proj, c.expand_as(proj)) - proj) * u)
        )

    def _selected(self, where, B: int, T: int) -> torch.Tensor | None:
        """[B, T] bool of the positions to steer, or None for every one."""
        mode, real = self.where, where.real
        if self.sequence or mode == "all":
            return real
        ids = where.ids
        if mode == "prompt":
            sel = None if where.prompt is None else ids < where.prompt[:, None]
        elif mode == "generated":
            if where.prompt is None:
                sel = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
            else:
                sel = ids >= where.prompt[:, None]
        elif isinstance(mode, int):
            sel = ids >= mode
        else:  # a mask over positions, [pos] or [rows, pos]
            mask = mode.to(ids.device)
            mask = mask[None].expand(B, -1) if mask.dim() == 1 else _rows(mask, B, None)
            inside = ids < mask.shape[1]
            sel = inside & mask.gather(1, ids.clamp(max=mask.shape[1] - 1))
        if real is None:
            return sel
        return real if sel is None else sel & real

    def _seq_start(self, where, B: int) -> torch.Tensor | int:
        if self.where == "generated":
            if where.prompt is None:
                return 1 << 62  # nothing is generated without a KV cache
            return where.prompt[:, None]
        return self.where if isinstance(self.where, int) else 0


def _rows(t: Any, B: int, hook: Any) -> Any:
    """Per-row values for a batch of B rows: as given, or each row repeated when the
    batch holds several rows per prompt (beams, contrastive candidates, consecutive)."""
    if not isinstance(t, torch.Tensor) or t.shape[0] == B:
        return t
    R = t.shape[0]
    if B % R:
        where = f" at {hook.name}" if hook is not None else ""
        raise GPT2LabError(f"per-row steering for {R} rows met a batch of {B} rows{where}")
    return t.repeat_interleave(B // R, dim=0)
