"""A token stream for corpus-scale passes (neuron statistics, cross-model correlations).

A corpus is either a dataset made by `gpt2lab prepare` (a folder with manifest.json: one
split of its memory-mapped uint16 shards, documents already ending in `<|endoftext|>`) or
text: files and folders, each text file one document (JSONL: one per line), tokenized
with the model's tokenizer piece by piece and followed by `<|endoftext|>`. Either way the
stream is read in blocks, so memory stays flat however big the corpus.

`windows` cuts the stream into consecutive, non-overlapping windows of `seq_len` tokens
and groups them into batches: batch b holds windows [b * batch_size, (b + 1) * batch_size).
Each token carries its document number (how many `<|endoftext|>` came before it), its
position in that document and its offset in the whole stream, so a result can always be
traced back to its text. Processes split the work by batch number (rank r of `world`
takes the batches with b % world == r: disjoint, and together exactly the one-process
stream) and a run resumes at any batch number (`start`).

The last window is never dropped: when the stream (or `max_tokens`) ends inside a
window, the window is padded with `<|endoftext|>` whose `keep` is False and whose doc,
pos and offset are -1. Padding sits after the real tokens, so under a causal model it
changes nothing they see; every real token is counted exactly once.

`drop` names token strings ("<|endoftext|>", "\\n") whose positions get keep=False: the
model still reads them (they are context), the statistics skip them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..errors import GPT2LabError
from ..tokenizer import EOT

BLOCK_TOKENS = 1 << 20  # tokens read from the shards at a time
HASH_BYTES = 1 << 20  # bytes read at a time when hashing text files


class TokenSource:
    """A corpus as a flat token stream read front to back in blocks (`blocks()`), with a
    `description` (kind, paths, content hash) for the metadata of results made from it."""

    eot: int
    tokenizer: object
    description: dict

    def blocks(self) -> Iterator[np.ndarray]:
        """The whole stream, in order, as int64 arrays of any length."""
        raise NotImplementedError

    def count_tokens(self) -> int:
        """Tokens in the stream (text: one tokenizing pass, far cheaper than a forward)."""
        if "tokens" not in self.description:
            self.description["tokens"] = sum(len(b) for b in self.blocks())
        return self.description["tokens"]


class ShardSource(TokenSource):
    """One split of a `gpt2lab prepare` dataset (memory-mapped, read a block at a time)."""

    def __init__(self, directory: Path, split: str, tokenizer):
        from ..training.data import MANIFEST, TokenShards

        self.shards = TokenShards(directory, split, tokenizer.vocab_size)
        self.tokenizer, self.eot = tokenizer, tokenizer.eot_token
        manifest = (directory / MANIFEST).read_bytes()
        self.description = {
            "kind": "shards",
            "paths": [str(directory)],
            "split": split,
            "tokens": self.shards.n_tokens,
            "hash": "sha256:" + hashlib.sha256(manifest).hexdigest(),  # names every shard
        }

    def blocks(self) -> Iterator[np.ndarray]:
        n = self.shards.n_tokens
        for start in range(0, n, BLOCK_TOKENS):
            yield self.shards.window(start, min(BLOCK_TOKENS, n - start)).astype(np.int64)


class TextSource(TokenSource):
    """Text files and folders, one document per file (per line for JSONL), tokenized as
    read; `<|endoftext|>` follows every document."""

    def __init__(self, paths: list[Path], tokenizer):
        from ..training.data import Skipped, input_files

        self.paths, self.tokenizer, self.eot = paths, tokenizer, tokenizer.eot_token
        digest, files = hashlib.sha256(), 0
        for file in input_files(paths, Skipped()):  # content hash: same text, same hash
            files += 1
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            with open(file, "rb") as f:
                while block := f.read(HASH_BYTES):
                    digest.update(block)
        self.description = {
            "kind": "text",
            "paths": [str(p) for p in paths],
            "files": files,
            "hash": "sha256:" + digest.hexdigest(),
        }

    def blocks(self) -> Iterator[np.ndarray]:
        from ..training.data import iter_documents

        for pieces in iter_documents(self.paths):
            empty = True  # an empty file is no document (no lone <|endoftext|>)
            for piece in pieces:
                ids = self.tokenizer.encode(piece)
                if ids:
                    empty = False
                    yield np.asarray(ids, dtype=np.int64)
            if not empty:
                yield np.asarray([self.eot], dtype=np.int64)


def open_corpus(source, tokenizer, *, split: str = "train") -> TokenSource:
    """The corpus at `source` (a path or a list of paths): a prepared dataset folder
    (its `split`), or text files and folders tokenized with `tokenizer`."""
    items = [source] if isinstance(source, (str, Path)) else validate.as_list(source)
    if not items or not all(isinstance(p, (str, Path)) for p in items):
        raise GPT2LabError(f"corpus must be a path or a list of paths, got {validate.show(source)}")
    paths = [Path(p) for p in items]
    for path in paths:
        if not path.exists():
            raise GPT2LabError(f"corpus {path} does not exist")
    from ..training.data import is_dataset

    datasets = [p for p in paths if p.is_dir() and is_dataset(p)]
    if datasets:
        if len(paths) > 1:
            raise GPT2LabError(
                f"corpus: {datasets[0]} is a prepared dataset; give it alone, not with other paths"
            )
        if split not in ("train", "val"):
            raise GPT2LabError(f"split must be 'train' or 'val', got {validate.show(split)}")
        return ShardSource(paths[0], split, tokenizer)
    return TextSource(paths, tokenizer)


@dataclass(frozen=True)
class Window:
    """One batch of windows, with where each token came from (padding: -1, keep False)."""

    index: int  # batch number in the global stream (resume from index + 1)
    tokens: torch.Tensor  # [rows, seq_len] int64
    doc: torch.Tensor  # [rows, seq_len] int64: document number of each token in the stream
    offset: torch.Tensor  # [rows, seq_len] int64: the token's offset in the whole stream
    keep: torch.Tensor  # [rows, seq_len] bool: the token passes the declared filters
    pos: torch.Tensor  # [rows, seq_len] int64: the token's position in its document


def drop_ids(tokenizer, drop: Sequence[str]) -> list[int]:
    """The token ids of the `drop` strings; each must be exactly one token."""
    items = validate.as_list(drop)
    if items is None:
        raise GPT2LabError(f"drop must be a list of token strings, got {validate.show(drop)}")
    ids = []
    for text in items:
        if not isinstance(text, str):
            raise GPT2LabError(
                f"drop: each entry must be a token string, got {validate.show(text)}"
            )
        found = [tokenizer.eot_token] if text == EOT else tokenizer.encode(text)
        if len(found) != 1:
            raise GPT2LabError(
                f"drop: {text!r} is {len(found)} tokens, not one; name single tokens only"
            )
        ids.append(found[0])
    return sorted(set(ids))


def windows(
    source: TokenSource,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    drop: Sequence[str] = ("<|endoftext|>",),
) -> Iterator[Window]:
    """The batches of `source` for process `rank` of `world`, from batch number `start`.

    The stream is read in full by every process (cheap next to a forward pass) so that
    document numbers are right; batches of other ranks, and those before `start`, are
    skipped without being built. An empty corpus, or one whose every token is dropped,
    is an error (raised once the stream has been read)."""
    if not isinstance(source, TokenSource):
        raise GPT2LabError(f"source must come from open_corpus, got {validate.show(source)}")
    seq_len = validate.integer("seq_len", seq_len, 1)
    batch_size = validate.integer("batch_size", batch_size, 1)
    if max_tokens is not None:
        max_tokens = validate.integer("max_tokens", max_tokens, 1)
    start = validate.integer("start", start, 0)
    world = validate.integer("world", world, 1)
    rank = validate.integer("rank", rank, 0, world - 1)
    dropped = np.asarray(drop_ids(source.tokenizer, drop), dtype=np.int64)
    return _windows(source, seq_len, batch_size, max_tokens, start, rank, world, dropped)


def _windows(source, seq_len, batch_size, max_tokens, start, rank, world, dropped):
    per_batch = seq_len * batch_size
    eot = source.eot
    seen = kept = 0  # tokens read, tokens kept (whole stream, every rank)
    doc = pos = 0  # document number and position in it of the next token
    pending: list[np.ndarray] = []  # blocks not yet cut into a batch
    pending_n = 0
    batch = 0

    def cut(tokens: np.ndarray, first: int, doc0: int, pos0: int) -> Window:
        """A batch from `tokens` (real tokens, possibly fewer than per_batch: padded)."""
        n = len(tokens)
        rows = -(-n // seq_len)
        ends = np.flatnonzero(tokens == eot)  # documents end after these
        # document number of each token: doc0 + number of <|endoftext|> before it
        doc_of = doc0 + np.concatenate([[0], np.cumsum(tokens[:-1] == eot)])
        starts = np.zeros(n, dtype=np.int64)  # index in `tokens` where each token's doc began
        if len(ends):
            marks = np.zeros(n, dtype=np.int64)
            marks[ends[ends + 1 < n] + 1] = ends[ends + 1 < n] + 1
            starts = np.maximum.accumulate(marks)
        pos_of = np.arange(n) - starts + np.where(doc_of == doc0, pos0, 0)
        out_tok = np.full(rows * seq_len, eot, dtype=np.int64)
        out_doc = np.full(rows * seq_len, -1, dtype=np.int64)
        out_off = np.full(rows * seq_len, -1, dtype=np.int64)
        out_pos = np.full(rows * seq_len, -1, dtype=np.int64)
        out_tok[:n], out_doc[:n], out_pos[:n] = tokens, doc_of, pos_of
        out_off[:n] = first + np.arange(n)
        keep = np.zeros(rows * seq_len, dtype=bool)
        keep[:n] = ~np.isin(tokens, dropped)
        shape = (rows, seq_len)
        return Window(
            index=batch,
            tokens=torch.from_numpy(out_tok).view(shape),
            doc=torch.from_numpy(out_doc).view(shape),
            offset=torch.from_numpy(out_off).view(shape),
            keep=torch.from_numpy(keep).view(shape),
            pos=torch.from_numpy(out_pos).view(shape),
        )

    def advance(tokens: np.ndarray) -> None:
        """Move doc / pos past `tokens`."""
        nonlocal doc, pos
        ends = np.flatnonzero(tokens == eot)
        if len(ends):
            doc += len(ends)
            pos = len(tokens) - 1 - int(ends[-1])
        else:
            pos += len(tokens)

    def take(tokens: np.ndarray) -> Window | None:
        """Account for one batch's tokens; a Window when the batch is this process's."""
        nonlocal seen, kept, batch
        mine = batch >= start and batch % world == rank
        out = cut(tokens, seen, doc, pos) if mine else None
        kept += int(len(tokens) - np.isin(tokens, dropped).sum())
        seen += len(tokens)
        advance(tokens)
        batch += 1
        return out

    for block in source.blocks():
        if max_tokens is not None:
            block = block[: max(0, max_tokens - seen - pending_n)]
        pending.append(block)
        pending_n += len(block)
        while pending_n >= per_batch:
            flat = np.concatenate(pending)
            window = take(flat[:per_batch])
            pending, pending_n = [flat[per_batch:]], pending_n - per_batch
            if window is not None:
                yield window
        if max_tokens is not None and seen + pending_n >= max_tokens:
            break
    if pending_n:
        window = take(np.concatenate(pending))
        if window is not None:
            yield window
    if seen == 0:
        raise GPT2LabError(f"the corpus {_name(source)} has no tokens")
    if kept == 0:
        raise GPT2LabError(
            f"the corpus {_name(source)} has no tokens left after dropping "
            f"{len(dropped)} token kind(s); drop fewer"
        )


def _name(source: TokenSource) -> str:
    return ", ".join(source.description.get("paths", [])) or "(unnamed)"


def describe(source: TokenSource) -> str:
    """The source's description as compact JSON (for metadata files)."""
    return json.dumps(source.description, sort_keys=True)
