"""Steering for the HTTP API: vectors registered at start-up, and a request's `steering`.

Vectors come from the folder given at start-up (`--steering-dir`), each file by its
stem; a request names one, or sends a direction inline. A request never names a path:
the registry is the only way from a request to a file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import GPT2LabError
from ..steering import Steering, SteeringVector
from .schemas import SteeringSpec

VECTOR_SUFFIXES = (".safetensors", ".gguf")
MAX_STEERINGS = 8  # steering entries in one request


def load_vectors(folder: str | Path, model: Any) -> dict[str, SteeringVector]:
    """Every vector file in `folder` (not its sub-folders), by file stem, checked against
    `model`; a file that is not a vector is an error naming it (found at start-up rather
    than by the first request that asks for it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GPT2LabError(f"--steering-dir {folder} is not a folder")
    out: dict[str, SteeringVector] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in VECTOR_SUFFIXES:
            if path.stem in out:
                raise GPT2LabError(f"two steering vectors named {path.stem!r} in {folder}")
            out[path.stem] = SteeringVector.load(path, model)
    return out


def describe(vectors: dict[str, SteeringVector]) -> list[dict[str, Any]]:
    """What GET /v1/steering lists: names, hooks and shapes, and the record's method."""
    return [
        {
            "name": name,
            "hooks": {h: list(d.shape) for h, d in v.directions.items()},
            "method": v.meta.get("method"),
            "operator": v.meta.get("operator"),
        }
        for name, v in sorted(vectors.items())
    ]


_FROM = re.compile(r"^from=\d+$")


def build_steering(
    specs: SteeringSpec | list[SteeringSpec] | None,
    vectors: dict[str, SteeringVector],
    model: Any,
) -> list[Steering] | None:
    """A request's `steering` as Steering objects, checked against the model (a bad hook,
    a wrong width, an unknown name: GPT2LabError, answered with 400)."""
    if specs is None:
        return None
    items = specs if isinstance(specs, list) else [specs]
    if not items:
        return None
    if len(items) > MAX_STEERINGS:
        raise GPT2LabError(f"at most {MAX_STEERINGS} steering entries per request")
    out = []
    for i, spec in enumerate(items):
        where = f"steering[{i}]" if isinstance(specs, list) else "steering"
        vector = _vector(spec, vectors, where)
        positions = spec.positions
        if isinstance(positions, str) and positions not in ("all", "prompt", "generated"):
            if not _FROM.match(positions):
                raise GPT2LabError(
                    f"{where}.positions must be all, prompt, generated, from=k or k, "
                    f"got {positions!r}"
                )
        positions = _capped(positions, model.cfg.n_ctx)
        steering = Steering(vector, spec.coefficient, spec.operator, positions, spec.preserve_norm)
        steering.hook_pairs(model)  # checks hooks and widths now, not mid-generation
        out.append(steering)
    return out


def _capped(positions: str | int, n_ctx: int) -> str | int:
    """`k` or `from=k` past the context steers no position, as `n_ctx` does; capped so
    that a k beyond int64 is not an overflow inside the hook."""
    k = positions if isinstance(positions, int) else None
    if isinstance(positions, str) and positions.startswith("from="):
        k = int(positions[5:])
    if k is None or k <= n_ctx:
        return positions
    return n_ctx


def _vector(spec: SteeringSpec, vectors: dict[str, SteeringVector], where: str) -> SteeringVector:
    if (spec.name is None) == (spec.values is None):
        raise GPT2LabError(f"{where}: give either name (a registered vector) or values, not both")
    if spec.name is not None:
        if spec.name not in vectors:
            known = ", ".join(sorted(vectors)) or "none (the server has no --steering-dir)"
            raise GPT2LabError(f"{where}: no steering vector named {spec.name!r}; known: {known}")
        vector = vectors[spec.name]
        return vector.only(spec.hook) if spec.hook is not None else vector
    if spec.hook is None:
        raise GPT2LabError(f"{where}: inline values need a hook (e.g. blocks.0.hook_resid_pre)")
    values = torch.tensor(spec.values, dtype=torch.float32)
    if values.numel() == 0:
        raise GPT2LabError(f"{where}.values is empty")
    return SteeringVector({spec.hook: values}, {"method": "inline (HTTP request)"})
