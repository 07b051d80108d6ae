"""A steering vector: one direction per hook point, and a record of what it is for.

A direction is `[width]` (added at every chosen position) or `[n, width]` (ActAdd's
sequence, added at n consecutive positions). The record says which model it was made on
(its shape and a fingerprint of its weights), how it was made and from what data, where
it was read (the read position), and the operator it is meant for. The public steering
tools share one defect this record exists to stop: a vector file that does not say
where it belongs, applied at the wrong site, silently steers much less.

Files are safetensors (one tensor per hook, named by the exact hook name) with the
record as JSON in the header's metadata, readable by any safetensors tool.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GPT2LabError
from ..validate import show

FORMAT = "gpt2lab.steering/1"
OPERATORS = ("add", "ablate", "ablate_add", "cap")


def hook_width(model: Any, hook: str) -> int:
    """The size of the last axis at `hook` (what a direction there must have), or an
    error for an unknown hook point or one whose last axis is not a unit axis."""
    if not isinstance(hook, str) or hook not in model.hook_dict:
        from ..hooks import _did_you_mean

        raise GPT2LabError(f"no hook point named {hook!r}{_did_you_mean(hook, model.hook_dict)}")
    cfg = model.cfg
    last = hook.rsplit(".", 1)[-1]
    if hook.startswith("blocks.") and ".mlp." in hook and last in ("hook_pre", "hook_post"):
        return cfg.d_mlp
    if last in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_attn_scores",
                "hook_pattern", "hook_scale"):  # fmt: skip
        raise GPT2LabError(
            f"{hook} has a head or score axis: steer the residual stream (hook_resid_pre, "
            "hook_resid_mid, hook_resid_post), hook_attn_out, hook_mlp_out or mlp.hook_post"
        )
    return cfg.d_model


def weights_fingerprint(model: Any) -> str:
    """A fingerprint of the model's weights, cheap enough to compute on every save and
    load (about 4096 evenly spaced values of each tensor, with its name and shape):
    another checkpoint differs in it with certainty, a bit flip somewhere may not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_record(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab, "fingerprint": weights_fingerprint(model),
    }  # fmt: skip


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Create missing parent folders (as every gpt2lab output does) and turn a failed
    write into one line naming the file."""
    from safetensors import SafetensorError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise GPT2LabError(f"cannot write {path}: {reason}") from None


def texts_digest(*groups: Any) -> str:
    """The sha256 of the texts a vector was made from (order kept), to name the data."""
    return "sha256:" + hashlib.sha256(json.dumps(groups, ensure_ascii=False).encode()).hexdigest()


@dataclass
class SteeringVector:
    """`{hook name: direction}` plus the record (`meta`) of how and where it was made.

    Vectors add, subtract and scale (`2 * v`, `v - w`, `-v`): hooks present in only one
    operand keep their direction; the record keeps the left operand's model and says
    which arithmetic made it."""

    directions: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.directions, dict) or not self.directions:
            raise GPT2LabError("a steering vector needs at least one {hook name: direction}")
        clean = {}
        for hook, d in self.directions.items():
            if not isinstance(hook, str):
                raise GPT2LabError(f"steering vector hook names are strings, got {show(hook)}")
            if (
                not isinstance(d, torch.Tensor)
                or not d.is_floating_point()
                or d.dim() not in (1, 2)
            ):
                raise GPT2LabError(
                    f"the direction at {hook} must be a float tensor [width] or [n, width], "
                    f"got {show(d)}"
                )
            if d.numel() == 0 or not bool(torch.isfinite(d).all()):
                raise GPT2LabError(f"the direction at {hook} is empty or not finite")
            clean[hook] = d.detach().float().cpu()
        self.directions = clean
        self.meta = dict(self.meta)

    @property
    def hooks(self) -> list[str]:
        return list(self.directions)

    def __getitem__(self, hook: str) -> torch.Tensor:
        return self.directions[hook]

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{h}: {list(d.shape)} |{float(d.norm()):.3g}|" for h, d in self.directions.items()
        )
        return f"SteeringVector({parts}; {self.meta.get('method', '?')})"

    # ---- arithmetic ------------------------------------------------------------------
    def _combine(self, other: SteeringVector, sign: float, symbol: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        out = dict(self.directions)
        for hook, d in other.directions.items():
            if hook in out:
                if out[hook].shape != d.shape:
                    raise GPT2LabError(
                        f"cannot combine directions of shapes {list(out[hook].shape)} and "
                        f"{list(d.shape)} at {hook}"
                    )
                out[hook] = out[hook] + sign * d
            else:
                out[hook] = sign * d
        meta = {**self.meta, "method": f"({self.meta.get('method', '?')}) {symbol} "
                f"({other.meta.get('method', '?')})"}  # fmt: skip
        return SteeringVector(out, meta)

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0, "-")

    def __mul__(self, scale: float) -> SteeringVector:
        if (
            not isinstance(scale, numbers.Real)
            or isinstance(scale, bool)
            or not math.isfinite(scale)
        ):
            return NotImplemented
        meta = {**self.meta, "method": f"{scale:g} * ({self.meta.get('method', '?')})"}
        return SteeringVector({h: d * float(scale) for h, d in self.directions.items()}, meta)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or scale == 0:
            raise GPT2LabError(
                f"a steering vector is divided by a non-zero number, got {show(scale)}"
            )
        return self * (1.0 / float(scale))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def only(self, *hooks: str) -> SteeringVector:
        """The same vector restricted to some of its hooks."""
        missing = [h for h in hooks if h not in self.directions]
        if missing or not hooks:
            raise GPT2LabError(
                f"this vector has no direction at {missing[0] if missing else '(none named)'}; "
                f"it has {', '.join(self.directions)}"
            )
        return SteeringVector({h: self.directions[h] for h in hooks}, self.meta)

    # ---- checks against a model --------------------------------------------------------
    def check(self, model: Any, *, warn: bool = True) -> SteeringVector:
        """Refuse a vector that cannot apply to `model` (an unknown hook, another width);
        warn when it was made on other weights (another fingerprint)."""
        for hook, d in self.directions.items():
            width = hook_width(model, hook)
            if d.shape[-1] != width:
                raise GPT2LabError(
                    f"the direction at {hook} has width {d.shape[-1]}, but this model's "
                    f"{hook} has width {width} (a vector made for another model size?)"
                )
        made = self.meta.get("model", {}).get("fingerprint")
        if warn and made and made != weights_fingerprint(model):
            warnings.warn(
                f"this steering vector was made on other weights (fingerprint {made}, this "
                f"model {weights_fingerprint(model)}): it may steer less or differently",
                stacklevel=3,
            )
        return self

    # ---- files -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file; the record goes into its header as JSON."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix == ".gguf":
            raise GPT2LabError(
                "save a .gguf control vector with steering.save_gguf(vector, path, model)"
            )
        meta = {"format": FORMAT, **self.meta}
        tensors = {h: d.contiguous() for h, d in self.directions.items()}
        tmp = path.with_name(path.name + ".tmp")
        header = {"gpt2lab": json.dumps(meta, ensure_ascii=False)}
        with writing(path):
            save_file(tensors, str(tmp), metadata=header)
            tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> SteeringVector:
        """Read a file written by `save` (or a .gguf control vector, given the model);
        with `model`, also `check` it against that model."""
        path = Path(path)
        if path.suffix == ".gguf":
            from .gguf import load_gguf

            if model is None:
                raise GPT2LabError(
                    "a .gguf control vector is read against a model: load(path, model)"
                )
            return load_gguf(path, model)
        if not path.is_file():
            raise GPT2LabError(f"{path} does not exist or is not a file")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise GPT2LabError(
                f"{path} is not a steering vector file ({str(e).splitlines()[0]})"
            ) from None
        try:
            meta = json.loads(header["gpt2lab"])
            assert isinstance(meta, dict) and meta.get("format") == FORMAT
        except (KeyError, ValueError, AssertionError):
            raise GPT2LabError(
                f"{path} is a safetensors file but not a gpt2lab steering vector (no record "
                "in its header saying where it belongs)"
            ) from None
        meta.pop("format")
        vector = cls(tensors, meta)
        return vector.check(model) if model is not None else vector
