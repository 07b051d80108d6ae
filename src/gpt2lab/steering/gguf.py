"""llama.cpp control vectors (`--control-vector FILE.gguf`), the layout repeng writes.

The file is a GGUF of architecture "controlvector" with 1-D float32 tensors named
`direction.{k}`. llama.cpp (common_control_vector_load_one, llama_adapter_cvec, the GPT-2
graph's `build_cvec(cur, il)` after the MLP's residual add; commit 0c1e570) adds
`direction.k` to the output of block k, counting from 0: that is our
`blocks.{k}.hook_resid_post`. k = 0 is refused by llama.cpp (the loader keeps no slot for
it) and k >= n_layers is never used, so only blocks 1..n_layers-1 can be steered; repeng
uses the same numbering (key k steers the output of `transformer.h[k]`).

Because block k's output is block k+1's input, `blocks.{k+1}.hook_resid_pre` is written
as `direction.k` too. llama.cpp only adds (at a strength given on its command line), so
only a vector meant for "add" at every position exports; the coefficient is multiplied
in. Reading a file back gives `blocks.{k}.hook_resid_post` directions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GPT2LabError
from .vector import SteeringVector, model_record, writing

ARCH = "controlvector"


def gguf_layer(model: Any, hook: str) -> int:
    """The `direction.{k}` index llama.cpp uses for our hook, or a clear error."""
    n = model.cfg.n_layers
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if not m:
        raise GPT2LabError(
            f"llama.cpp control vectors act on block outputs (hook_resid_post / the next "
            f"block's hook_resid_pre); {hook} has no GGUF equivalent"
        )
    k = int(m.group(1)) - (1 if m.group(2) == "pre" else 0)
    if not 1 <= k <= n - 1:
        raise GPT2LabError(
            f"{hook} would be direction.{k}: llama.cpp steers only the outputs of blocks 1.."
            f"{n - 1} (blocks.1.hook_resid_post .. blocks.{n - 1}.hook_resid_post)"
        )
    return k


def save_gguf(
    vector: SteeringVector, path: str | Path, model: Any, coefficient: float = 1.0
) -> Path:
    """Write `coefficient * vector` as a llama.cpp control vector."""
    try:
        import gguf
    except ImportError:
        raise GPT2LabError(
            "writing GGUF needs the gguf package: pip install 'gpt2lab[gguf]'"
        ) from None
    vector.check(model)
    layers: dict[int, np.ndarray] = {}
    for hook, d in vector.directions.items():
        if d.dim() != 1:
            raise GPT2LabError(
                f"the direction at {hook} is a sequence (ActAdd): llama.cpp adds one vector per layer"
            )
        k = gguf_layer(model, hook)
        if k in layers:
            raise GPT2LabError(f"two directions map to llama.cpp's layer {k} ({hook} and another)")
        layers[k] = (float(coefficient) * d).numpy().astype(np.float32)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", "gpt2")
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        for k in sorted(layers):
            writer.add_tensor(f"direction.{k}", layers[k])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    return path


def load_gguf(path: str | Path, model: Any) -> SteeringVector:
    """Read a control vector GGUF (ours, repeng's or llama.cpp's cvector-generator's)."""
    try:
        import gguf
    except ImportError:
        raise GPT2LabError(
            "reading GGUF needs the gguf package: pip install 'gpt2lab[gguf]'"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise GPT2LabError(f"{path} does not exist or is not a file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises bare ValueError / struct errors
        raise GPT2LabError(
            f"{path} is not a GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    directions = {}
    n = model.cfg.n_layers
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if not m:
            raise GPT2LabError(f"{path}: tensor {t.name!r} is not a control vector direction")
        k = int(m.group(1))
        if not 1 <= k <= n - 1:
            raise GPT2LabError(
                f"{path}: direction.{k} is outside llama.cpp's layers 1..{n - 1} for this model"
            )
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        directions[f"blocks.{k}.hook_resid_post"] = torch.from_numpy(data.copy())
    if not directions:
        raise GPT2LabError(f"{path} holds no direction tensors")
    meta = {"method": "gguf control vector", "model": {**model_record(model), "fingerprint": None},
            "data": {"file": path.name}}  # fmt: skip
    return SteeringVector(directions, meta).check(model)
