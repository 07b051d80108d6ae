"""Token streams for training and evaluating lenses.

A lens is trained on random windows of a corpus and evaluated on fixed consecutive
windows, so two lenses are compared on exactly the same tokens. The corpus can be a
token tensor, a plain text file, or a folder of token shards made by `gpt2lab prepare`
(there the train split trains and the val split evaluates, so evaluation is held out).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import GPT2LabError
from ..training.data import MANIFEST, TokenShards, TokenStream

if TYPE_CHECKING:
    from ..model import GPT2


class TokenArray(TokenStream):
    """A flat token stream held in memory; batches are drawn as from `TokenShards`."""

    what = "the lens data"

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.n_tokens = len(ids)

    def window(self, start: int, length: int) -> np.ndarray:
        return self.ids[start : start + length]


def token_source(model: GPT2, data: Any, split: str = "train") -> Any:
    """`data` as something with `n_tokens`, `window(start, n)` and `batch(...)`: a token
    tensor / array / list, a text file (tokenized whole), or a shards folder (`split`)."""
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple)):
        ids = torch.as_tensor(np.asarray(data)).reshape(-1).long()
        if ids.numel() == 0:
            raise GPT2LabError("the lens data holds no tokens")
        if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
            raise GPT2LabError(f"lens data token ids must be in [0, {model.cfg.d_vocab})")
        return TokenArray(ids.numpy())
    if not isinstance(data, (str, Path)):
        raise GPT2LabError(
            f"lens data must be token ids, a text file or a shards folder; got {type(data).__name__}"
        )
    path = Path(data)
    if not path.exists():
        raise GPT2LabError(f"lens data {path} does not exist")
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise GPT2LabError(
                f"{path} is a folder without {MANIFEST}; make shards with `gpt2lab prepare`"
            )
        shards = TokenShards(path, split, vocab_size=model.cfg.d_vocab)
        if shards.n_tokens == 0:
            raise GPT2LabError(f"{path} has no tokens in its {split} split")
        return shards
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GPT2LabError(f"{path} is not UTF-8 text") from None
    ids = model.tokenizer.encode(text)
    if not ids:
        raise GPT2LabError(f"{path} holds no text")
    return TokenArray(np.asarray(ids, dtype=np.int64))


def eval_windows(model: GPT2, data: Any, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Fixed evaluation windows [n, seq_len] from the start of `data` (a [batch, pos]
    tensor is taken as it is, up to `max_tokens`; shards give their val split)."""
    if not 1 <= seq_len <= model.cfg.n_ctx:
        raise GPT2LabError(
            f"seq_len must be from 1 to the context ({model.cfg.n_ctx}), got {seq_len}"
        )
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if data.shape[1] > model.cfg.n_ctx or data.numel() == 0:
            raise GPT2LabError(f"lens data rows must hold 1 to {model.cfg.n_ctx} tokens")
        token_source(model, data)  # validates the ids
        return data[: max(1, max_tokens // data.shape[1])].long()
    source = token_source(model, data, split="val")
    n = min(source.n_tokens, max_tokens)
    if n < seq_len:
        return torch.from_numpy(np.asarray(source.window(0, n), dtype=np.int64))[None]
    rows = [np.asarray(source.window(i * seq_len, seq_len)) for i in range(n // seq_len)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))
