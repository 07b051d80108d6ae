"""Token shards: text corpora -> uint16 memory-mapped files, and batches drawn from them.

`prepare` streams documents (text files, folders, JSONL with a named field), splits
them into train / val by document, tokenizes on both cores and appends the ids, with
`<|endoftext|>` after every document, to raw uint16 shard files plus a small JSON
manifest. Memory stays flat however big the corpus: large text files are cut into
pieces at places where GPT-2's pre-tokenizer would cut anyway, so the ids are exactly
those of the whole file.

`TokenShards` draws training batches whose content depends only on (seed, index):
resuming a run at step s, or splitting the work over N processes, sees exactly the
batches an uninterrupted single-process run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import GPT2LabError
from ..tokenizer import Tokenizer

MANIFEST = "manifest.json"
PIECE_CHARS = 1 << 20  # large files are tokenized in pieces of about this many characters
TOKENIZER_ID = "gpt2"  # the only vocabulary gpt2lab shards use


# ---- reading documents ---------------------------------------------------------------
def _safe_cut(text: str) -> int:
    """An index where the text can be split without changing GPT-2's tokens: right
    after a newline that has a non-space before it and a non-space after it."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", 0, i)
    return -1


def _text_pieces(path: Path) -> Iterator[str]:
    """A text file as pieces of about PIECE_CHARS characters whose tokens concatenate exactly."""
    carry = ""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while block := f.read(PIECE_CHARS):
            carry += block
            cut = _safe_cut(carry)
            if cut > 0:
                yield carry[:cut]
                carry = carry[cut:]
    if carry:
        yield carry


def iter_documents(inputs: Iterable[str | Path], field: str = "text") -> Iterator[Iterator[str]]:
    """Each document as an iterator of text pieces (a text file is one document; a JSONL
    file holds one document per line, in `field`)."""
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise GPT2LabError(f"input {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix in (".jsonl", ".ndjson"):
                yield from _jsonl_documents(file, field)
            else:
                yield _text_pieces(file)


def _jsonl_documents(path: Path, field: str) -> Iterator[Iterator[str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise GPT2LabError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise GPT2LabError(
                    f"{path}:{lineno} has no string field {field!r} (choose one with --field)"
                )
            yield iter([record[field]])


def _goes_to_val(index: int, val_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# ---- writing shards ----------------------------------------------------------------------
class _ShardWriter:
    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, ids: list[int]) -> None:
        array = np.asarray(ids, dtype=np.uint16)
        while len(array):
            if self._file is None or self._count >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self._count
            self._file.write(array[:room].tobytes())
            self._count += min(room, len(array))
            self.shards[-1]["tokens"] = self._count
            array = array[room:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.out / name, "wb")
        self._count = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    *,
    field: str = "text",
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize documents into `out/{train,val}_NNNN.bin` (uint16) + `out/manifest.json`."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not inputs:
        raise GPT2LabError("prepare needs at least one input file or folder")
    if not 0 <= val_fraction < 1:
        raise GPT2LabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer()
    writers = {split: _ShardWriter(out, split, shard_tokens) for split in ("train", "val")}
    docs = {"train": 0, "val": 0}
    pending: list[tuple[str, str, bool]] = []  # (split, text piece, ends a document)

    def flush() -> None:
        texts = [text for _, text, _ in pending]
        for (split, _, ends), ids in zip(
            pending, tok.encode_batch(texts, num_threads=2), strict=True
        ):
            writers[split].write(ids + [tok.eot_token] if ends else ids)
        pending.clear()

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("tokenizing")
        for index, pieces in enumerate(iter_documents(inputs, field)):
            split = "val" if _goes_to_val(index, val_fraction, seed) else "train"
            previous = ""
            for n, piece in enumerate(pieces):
                if n:
                    pending.append((split, previous, False))
                previous = piece
            pending.append((split, previous, True))
            docs[split] += 1
            if len(pending) >= 64:  # tokenize in batches, on both cores
                flush()
            tokens = sum(s["tokens"] for w in writers.values() for s in w.shards)
            bar.update(task, description=f"tokenizing: {index + 1:,} documents, {tokens:,} tokens")
        flush()
    for w in writers.values():
        w.close()
    if docs["train"] == 0 or sum(s["tokens"] for s in writers["train"].shards) <= docs["train"]:
        raise GPT2LabError("prepare found no text for the train split (are the inputs empty?)")
    manifest = {
        "tokenizer": TOKENIZER_ID,
        "vocab_size": tok.vocab_size,
        "dtype": "uint16",
        "eot_token": tok.eot_token,
        "documents": docs,
        "splits": {split: w.shards for split, w in writers.items()},
        "tokens": {split: sum(s["tokens"] for s in w.shards) for split, w in writers.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---- reading shards ------------------------------------------------------------------
def read_manifest(directory: str | Path, vocab_size: int | None = None) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise GPT2LabError(f"{directory} has no {MANIFEST}; create it with `gpt2lab prepare`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GPT2LabError(f"{path} is not valid JSON") from None
    if manifest.get("tokenizer") != TOKENIZER_ID or manifest.get("dtype") != "uint16":
        raise GPT2LabError(
            f"{directory} was made with tokenizer {manifest.get('tokenizer')!r}, not GPT-2's; prepare it again"
        )
    if vocab_size is not None and manifest.get("vocab_size") != vocab_size:
        raise GPT2LabError(
            f"{directory} was made with a vocabulary of {manifest.get('vocab_size')} tokens, "
            f"but the model has {vocab_size}"
        )
    return manifest


class TokenStream:
    """A flat token stream (`n_tokens`, `window(start, length)`) that training batches
    are drawn from; `what` names it in errors. Subclasses: `TokenShards` here, the lens
    trainer's in-memory `TokenArray`."""

    n_tokens: int
    what: str

    def window(self, start: int, length: int) -> np.ndarray:
        raise NotImplementedError

    def batch(
        self, batch_size: int, seq_len: int, seed: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` of the stream defined by `seed`: (inputs, targets).
        Its content depends only on (seed, index), so a resumed run draws the same."""
        if self.n_tokens <= seq_len + 1:
            raise GPT2LabError(
                f"{self.what} has {self.n_tokens} tokens, fewer than one window of {seq_len + 1}"
            )
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        starts = torch.randint(
            0, self.n_tokens - seq_len - 1, (batch_size,), generator=gen
        ).tolist()
        rows = np.stack([self.window(s, seq_len + 1) for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


class TokenShards(TokenStream):
    """One split of a prepared dataset, memory-mapped, concatenated end to end."""

    def __init__(self, directory: str | Path, split: str, vocab_size: int | None = None):
        directory = Path(directory)
        manifest = read_manifest(directory, vocab_size)
        shards = [s for s in manifest["splits"].get(split, []) if s["tokens"] > 0]
        self.arrays = []
        for shard in shards:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != 2 * shard["tokens"]:
                raise GPT2LabError(f"shard {path} is missing or does not match the manifest")
            self.arrays.append(np.memmap(path, dtype=np.uint16, mode="r"))
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.n_tokens = int(self.starts[-1])
        self.split = split
        self.what = f"the {split} split"

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries if need be."""
        parts, pos, end = [], start, start + length
        while pos < end:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            a = self.arrays[i]
            lo = pos - int(self.starts[i])
            take = min(len(a) - lo, end - pos)
            parts.append(a[lo : lo + take])
            pos += take
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
