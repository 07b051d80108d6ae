"""Token shards: text corpora -> uint16 memory-mapped files, and batches drawn from them.

`prepare` streams documents (text files, folders, JSONL with a named field), splits
them into train / val by document, tokenizes on both cores and appends the ids, with
`<|endoftext|>` after every document, to raw uint16 shard files plus a small JSON
manifest. Memory stays flat however big the corpus or its files: large text files
are cut into pieces at places where GPT-2's pre-tokenizer would cut anyway, so the ids
are exactly those of the whole file.

A split by document needs documents: one file (nanoGPT's `input.txt`, a play) is one
document, and it lands whole in train or in val. So a corpus of fewer than
MIN_SPLIT_DOCUMENTS documents, or one whose split by document left a split empty, is
split by tokens instead: each document's last `val_fraction` of tokens (rounded, cut
at a token boundary) goes to val and the rest to train, each part ending in
`<|endoftext|>` so no training window joins two documents unmarked. Deterministic (no
seed involved); the manifest's `split` says which way and why, and the CLI says it too.

What goes in, and what is left out (and counted in the manifest's `skipped`):

- Text files must be UTF-8. A file with a NUL byte in its first 8 KiB (as git and grep
  decide "binary") or with any byte sequence that is not UTF-8 is skipped whole: images,
  archives or Latin-1 text in a corpus folder never become U+FFFD soup, and no part of a
  skipped file reaches the shards. A file up to HOLD_BYTES is read once, decoded
  strictly into memory and kept only when all of it decoded; a bigger one is checked
  by a first streaming pass, then streamed into the shards (read twice, memory flat).
- A JSONL file is structured data the user asked for: a line that is not UTF-8 (like a
  line that is not JSON) is an error naming file:line, not a silent skip. A JSONL file
  that is binary from its first block on is skipped like any binary file.
- Inside input folders, hidden files and folders (".git", our own temporary folders) are
  skipped, and so is every folder holding a gpt2lab dataset (a `manifest.json` of ours),
  the output folder included: `prepare corpus --out corpus/shards` run twice gives the
  same dataset, never one that ingested its own shards.

Writing is atomic: the dataset is built in a hidden sibling folder and renamed into
place only when complete (manifest last). An existing dataset at `--out` is replaced
only then; a run that fails or is killed half-way leaves it untouched, and leaves no
folder that looks like a dataset (the next run removes the stale temporary folder).

`TokenShards` draws training batches whose content depends only on (seed, index):
resuming a run at step s, or splitting the work over N processes, sees exactly the
batches an uninterrupted single-process run would have seen.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..errors import GPT2LabError
from ..tokenizer import Tokenizer

MANIFEST = "manifest.json"
PIECE_CHARS = 1 << 20  # large files are tokenized in pieces of about this many characters
SNIFF_BYTES = 8192  # a NUL byte in this first block marks a binary file (git's rule)
HOLD_BYTES = 64 << 20  # files up to this size are read once, into memory; bigger: twice
TOKENIZER_ID = "gpt2"  # the only vocabulary gpt2lab shards use
SHARD_FILE = re.compile(r"(train|val)_\d{4,}\.bin")
EXAMPLES = 5  # skipped paths named per kind in the manifest
# Fewer documents than this are split by tokens, not by document: at the default
# val_fraction of 0.05 a split by document expects one val document at 20 documents,
# and below that val is usually empty or a single, unrepresentative document.
MIN_SPLIT_DOCUMENTS = 20
COPY_TOKENS = 1 << 22  # tokens copied at a time when a corpus is split by tokens


# ---- what was left out ------------------------------------------------------------------
@dataclasses.dataclass
class Skipped:
    """Inputs left out of a dataset, by kind, with a few example paths each."""

    binary: list[str] = dataclasses.field(default_factory=list)  # binary or not UTF-8
    datasets: list[str] = dataclasses.field(
        default_factory=list
    )  # folders holding a gpt2lab dataset
    hidden: list[str] = dataclasses.field(
        default_factory=list
    )  # hidden files and folders in a folder walk

    def to_manifest(self) -> dict:
        return {
            kind: {"count": len(paths), "examples": paths[:EXAMPLES]}
            for kind, paths in (
                ("binary_files", self.binary),
                ("dataset_folders", self.datasets),
                ("hidden", self.hidden),
            )
        }


SKIPPED_LABELS = {  # manifest key: (one, several)
    "binary_files": ("binary or non-UTF-8 file", "binary or non-UTF-8 files"),
    "dataset_folders": ("folder holding a gpt2lab dataset", "folders holding a gpt2lab dataset"),
    "hidden": ("hidden file or folder", "hidden files or folders"),
}


def skipped_summary(manifest: dict) -> str:
    """One line saying what `prepare` left out ("" when nothing was), for the CLI."""
    parts = []
    for kind, (one, several) in SKIPPED_LABELS.items():
        entry = (manifest.get("skipped") or {}).get(kind) or {}
        count = entry.get("count", 0)
        if not count:
            continue
        examples = list(entry.get("examples", []))[:3]
        more = ", ..." if count > len(examples) else ""
        named = f" ({', '.join(examples)}{more})" if examples else ""
        parts.append(f"{count} {one if count == 1 else several}{named}")
    return "skipped " + "; ".join(parts) if parts else ""


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


def _decoded_blocks(path: Path, size: int) -> Iterator[str]:
    """The file as text, strictly UTF-8, in blocks of about `size` characters (a
    multi-byte character cut by a block boundary is carried over, never broken)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    with open(path, "rb") as f:
        while block := f.read(size):
            if text := decoder.decode(block):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail


def _text_pieces(path: Path) -> Iterator[str]:
    """A text file as pieces of about PIECE_CHARS characters whose tokens concatenate
    exactly. Raises UnicodeDecodeError, part-way through, when the file is not UTF-8."""
    carry = ""
    for block in _decoded_blocks(path, PIECE_CHARS):
        carry += block
        cut = _safe_cut(carry)
        if cut > 0:
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def is_dataset(directory: Path) -> bool:
    """Whether a folder holds a gpt2lab dataset (a manifest.json that `prepare` wrote)."""
    path = directory / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > 1 << 24:
            return False
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("tokenizer") == TOKENIZER_ID
        and isinstance(manifest.get("splits"), dict)
    )


def input_files(
    inputs: Iterable[str | Path],
    skipped: Skipped,
    exclude: Iterable[Path] = (),
    ignore: Iterable[Path] = (),
) -> Iterator[Path]:
    """The files to read, in a stable order: each input file, and every file under each
    input folder sorted by path, minus what is skipped (recorded in `skipped`): hidden
    entries and dataset folders inside a walk, and the folders in `exclude` (counted as
    datasets: the output) and in `ignore` (not counted: the folder being written)."""
    exclude = {Path(p).resolve() for p in exclude}
    ignore = {Path(p).resolve() for p in ignore}
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise GPT2LabError(f"input {path} does not exist")
        if not path.is_dir():
            yield path
        elif path.resolve() in exclude or is_dataset(path):
            skipped.datasets.append(str(path))
        else:
            yield from sorted(_walk(path, skipped, exclude, ignore))


def _walk(top: Path, skipped: Skipped, exclude: set[Path], ignore: set[Path]) -> Iterator[Path]:
    def fail(error: OSError) -> None:
        raise error  # an unreadable folder is an error, not a silent gap in the corpus

    for root, dirs, files in os.walk(top, onerror=fail):
        here = Path(root)
        keep = []
        for name in sorted(dirs):
            sub = here / name
            if sub.resolve() in ignore:
                continue
            if name.startswith("."):
                skipped.hidden.append(str(sub))
            elif sub.resolve() in exclude or is_dataset(sub):
                skipped.datasets.append(str(sub))
            else:
                keep.append(name)
        dirs[:] = keep  # os.walk descends only into these
        for name in files:
            if name.startswith("."):
                skipped.hidden.append(str(here / name))
            elif (here / name).is_file():  # not a socket, FIFO or broken link
                yield here / name


def iter_documents(
    inputs: Iterable[str | Path],
    field: str = "text",
    skipped: Skipped | None = None,
    exclude: Iterable[Path] = (),
    ignore: Iterable[Path] = (),
) -> Iterator[Iterable[str]]:
    """Each document as its text pieces (a text file is one document; a JSONL file holds
    one document per line, in `field`). Binary and non-UTF-8 files are left out and
    recorded in `skipped`; see the module notes for the rules. A document is known to
    be UTF-8 throughout before any piece of it is given out."""
    skipped = Skipped() if skipped is None else skipped
    for file in input_files(inputs, skipped, exclude, ignore):
        if _is_binary(file):
            skipped.binary.append(str(file))
        elif file.suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_documents(file, field)
        elif file.stat().st_size <= HOLD_BYTES:
            try:
                yield list(_text_pieces(file))  # one read; kept only if all of it decoded
            except UnicodeDecodeError:
                skipped.binary.append(str(file))
        elif _is_utf8(file):
            yield _streamed_pieces(file)
        else:
            skipped.binary.append(str(file))


def _is_utf8(path: Path) -> bool:
    """A streaming strict decode of the whole file (the first pass for big files)."""
    try:
        for _ in _decoded_blocks(path, PIECE_CHARS):
            pass
    except UnicodeDecodeError:
        return False
    return True


def _streamed_pieces(path: Path) -> Iterator[str]:
    try:
        yield from _text_pieces(path)
    except UnicodeDecodeError:
        raise GPT2LabError(
            f"{path} changed while it was being read (it is no longer UTF-8)"
        ) from None


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(SNIFF_BYTES)


def _jsonl_documents(path: Path, field: str) -> Iterator[Iterator[str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GPT2LabError(
                    f"{path}:{lineno} is not UTF-8 text (byte {e.start + 1} of the line); "
                    "fix or remove that line"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the JSON
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
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
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the dataset is renamed into place
            self._file.close()
            self._file = None


# ---- the output folder -------------------------------------------------------------------
def _check_arguments(inputs, field, val_fraction, shard_tokens, seed) -> tuple[float, int, int]:
    """Every argument checked before anything is read or written (with the messages all
    of gpt2lab uses, from `validate`); returns val_fraction, shard_tokens and seed as
    plain Python numbers (a numpy integer is a fine shard size)."""
    if not inputs:
        raise GPT2LabError("prepare needs at least one input file or folder")
    if not isinstance(field, str) or not field:
        raise GPT2LabError(f"field must be a non-empty string, got {field!r}")
    return (
        validate.number("val_fraction", val_fraction, 0, 1, high_open=True),
        validate.integer("shard_tokens", shard_tokens, low=1),
        validate.integer("seed", seed),
    )


def _check_output(out: Path, given: str) -> None:
    """Refuse an --out we must not replace: a file, or a folder holding anything but an
    (old) gpt2lab dataset. Replacing a dataset removes its folder's files, so that folder
    must hold nothing else."""
    if out == out.parent:
        raise GPT2LabError(f"--out {given} must name a folder to create, not the root")
    if out.exists() and not out.is_dir():
        raise GPT2LabError(f"--out {given} is a file; give a folder for the dataset")
    if not out.is_dir():
        return
    names = [p.name for p in out.iterdir()]
    if not names:
        return
    if not is_dataset(out):
        raise GPT2LabError(
            f"--out {given} already holds files and no gpt2lab dataset; give a new or empty folder"
        )
    others = sorted(n for n in names if n != MANIFEST and not SHARD_FILE.fullmatch(n))
    if others:
        raise GPT2LabError(
            f"--out {given} holds a dataset and other files ({', '.join(others[:3])}), which "
            "replacing the dataset would delete; move them or give another folder"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove temporary folders that killed runs into `out` left behind (full disks stay
    full otherwise); a folder of a process still running is left alone."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:tmp|old)-(\d+)-[0-9a-f]+")
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _scratch(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` (same file system, so a rename moves it into place)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_workdir(out: Path, given: str) -> Path:
    """Create the hidden folder the dataset is built in, next to `out`; every way this
    can fail (a file where a folder should be, no permission, a read-only or pseudo file
    system) is one GPT2LabError naming --out."""
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise GPT2LabError(f"--out {given}: {ancestor} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2LabError(
            f"--out {given}: cannot create the folder {out.parent}: {e.strerror or e}"
        ) from e
    try:
        _remove_stale(out)
        work = _scratch(out, "tmp")
        work.mkdir()
    except OSError as e:
        raise GPT2LabError(
            f"--out {given}: cannot create a folder in {out.parent}: {e.strerror or e}"
        ) from e
    return work


def _publish(work: Path, out: Path) -> None:
    """Move the finished dataset into place; an old one (or an empty folder) at `out` is
    moved aside first and removed only once the new one is there."""
    if not out.exists():
        os.rename(work, out)
        return
    old = _scratch(out, "old")
    os.rename(out, old)
    try:
        os.rename(work, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    *,
    field: str = "text",
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = None,
) -> dict:
    """Tokenize documents into `out/{train,val}_NNNN.bin` (uint16) + `out/manifest.json`.

    The dataset is written atomically (see the module notes): `out` is either the old
    dataset or the complete new one, never half of either. Returns the manifest, whose
    `skipped` says which inputs were left out (binary, dataset folders, hidden).
    num_threads: tokenizer threads (default: one per core this process may use); the
        shards do not depend on it."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    val_fraction, shard_tokens, seed = _check_arguments(
        inputs, field, val_fraction, shard_tokens, seed
    )
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    num_threads = validate.integer("num_threads", num_threads, 1)
    given = str(out)
    out = Path(out).absolute()
    _check_output(out, given)
    work = _make_workdir(out, given)
    published = False
    try:
        manifest = _tokenize_into(
            work, inputs, out, field, val_fraction, shard_tokens, seed, progress, num_threads
        )
        try:
            _publish(work, out)
        except OSError as e:
            raise GPT2LabError(
                f"cannot move the new dataset into {given}: {e.strerror or e}"
            ) from e
        published = True
    finally:
        if not published:
            shutil.rmtree(work, ignore_errors=True)
    return manifest


def _tokenize_into(
    work: Path, inputs, out: Path, field: str, val_fraction: float, shard_tokens: int,
    seed: int, progress: bool, num_threads: int,
) -> dict:  # fmt: skip
    """Tokenize every document into shards in `work`; write the manifest last."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    tok = Tokenizer()
    writers = {split: _ShardWriter(work, split, shard_tokens) for split in ("train", "val")}
    docs = {"train": 0, "val": 0}
    skipped = Skipped()
    # (split, text piece, the document's entry in `lengths` or None, ends a document)
    pending: list[tuple[str, str, list | None, bool]] = []
    # [split, tokens] of each document, in order, kept only while a split by tokens may
    # still be needed (see _needs_token_split): a few entries, never one per document
    # of a big corpus.
    lengths: list[list] = []

    def flush() -> None:
        texts = [text for _, text, _, _ in pending]
        for (split, _, entry, ends), ids in zip(
            pending, tok.encode_batch(texts, num_threads=num_threads), strict=True
        ):
            writers[split].write(ids + [tok.eot_token] if ends else ids)
            if entry is not None:
                entry[1] += len(ids) + ends
        pending.clear()

    documents = iter_documents(inputs, field, skipped, exclude=[out], ignore=[work])
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
        transient=True,
    ) as bar, _writing(work, out):  # fmt: skip
        task = bar.add_task("tokenizing")
        index = 0  # documents taken so far: a skipped file takes no place in the split
        for pieces in documents:
            split = "val" if _goes_to_val(index, val_fraction, seed) else "train"
            entry = None
            if val_fraction > 0 and (index < MIN_SPLIT_DOCUMENTS or 0 in docs.values()):
                entry = [split, 0]
                lengths.append(entry)
            previous = ""
            for n, piece in enumerate(pieces):  # a big file streams: flush as it goes
                if n:
                    pending.append((split, previous, entry, False))
                    if len(pending) >= 64:
                        flush()
                previous = piece
            pending.append((split, previous, entry, True))
            docs[split] += 1
            index += 1
            if len(pending) >= 64:  # tokenize in batches, on both cores
                flush()
            tokens = sum(s["tokens"] for w in writers.values() for s in w.shards)
            bar.update(task, description=f"tokenizing: {index:,} documents, {tokens:,} tokens")
        flush()
        for w in writers.values():
            w.close()
        split_info = {"by": "document", "val_fraction": val_fraction, "seed": seed}
        reason = _needs_token_split(docs, val_fraction)
        if reason:
            bar.update(task, description=f"splitting {index:,} documents by tokens")
            writers, docs = _split_by_tokens(work, writers, lengths, val_fraction, tok.eot_token)
            split_info = {"by": "tokens", "val_fraction": val_fraction, "reason": reason}
        if docs["train"] == 0 or sum(s["tokens"] for s in writers["train"].shards) <= docs["train"]:
            left_out = skipped_summary({"skipped": skipped.to_manifest()})
            raise GPT2LabError(
                "prepare found no text for the train split "
                + (f"({left_out})" if left_out else "(are the inputs empty?)")
            )
        manifest = {
            "tokenizer": TOKENIZER_ID,
            "vocab_size": tok.vocab_size,
            "dtype": "uint16",
            "eot_token": tok.eot_token,
            "documents": docs,
            "split": split_info,
            "splits": {split: w.shards for split, w in writers.items()},
            "tokens": {split: sum(s["tokens"] for s in w.shards) for split, w in writers.items()},
            "skipped": skipped.to_manifest(),
        }
        with open(work / MANIFEST, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return manifest


# ---- splitting by tokens -------------------------------------------------------------------
def _needs_token_split(docs: dict[str, int], val_fraction: float) -> str:
    """Why the corpus must be split by tokens rather than by document ("" when not):
    too few documents for a split by document to mean anything, or a split left empty.
    Never when val_fraction is 0 (no val split was asked for)."""
    total = docs["train"] + docs["val"]
    if val_fraction == 0 or total == 0:
        return ""
    if total < MIN_SPLIT_DOCUMENTS:
        return f"{total} document{'s' if total != 1 else ''}, fewer than {MIN_SPLIT_DOCUMENTS}"
    for split in ("val", "train"):
        if docs[split] == 0:
            return f"the split by document left {split} empty"
    return ""


def _split_by_tokens(
    work: Path, writers: dict[str, _ShardWriter], lengths: list[list], val_fraction: float,
    eot: int,
) -> tuple[dict[str, _ShardWriter], dict[str, int]]:  # fmt: skip
    """Rewrite the shards split by tokens: each document's last round(val_fraction x n)
    of its n tokens (its `<|endoftext|>` not counted) go to val, the others to train,
    each part followed by `<|endoftext|>`. `lengths` holds every document's [split,
    tokens] in order, as the split by document wrote them. The new shards are built in
    a subfolder of `work`, copied a block at a time (memory stays flat), then moved over
    the old ones. Returns the new writers and documents per split."""
    streams = {
        split: TokenShards.from_shards(work, w.shards, split) for split, w in writers.items()
    }
    staging = work / "by-tokens"
    staging.mkdir()
    new = {split: _ShardWriter(staging, split, w.shard_tokens) for split, w in writers.items()}
    docs = {"train": 0, "val": 0}
    offset = {"train": 0, "val": 0}
    for split, n in lengths:
        start = offset[split]
        offset[split] += n
        text = n - 1  # the document's tokens before its <|endoftext|>
        n_val = int(val_fraction * text + 0.5)
        parts = {"train": (start, text - n_val), "val": (start + text - n_val, n_val)}
        for part, (first, count) in parts.items():
            if count > 0:
                for at in range(first, first + count, COPY_TOKENS):
                    take = min(COPY_TOKENS, first + count - at)
                    new[part].write(streams[split].window(at, take))
                new[part].write([eot])
                docs[part] += 1
    for w in new.values():
        w.close()
    del streams  # close the memory maps before their files go
    for w in writers.values():
        for shard in w.shards:
            (work / shard["file"]).unlink()
    for w in new.values():
        for shard in w.shards:
            os.replace(staging / shard["file"], work / shard["file"])
    staging.rmdir()
    return new, docs


def split_summary(manifest: dict) -> str:
    """The CLI's line for a prepared dataset: tokens and documents per split, and, when
    the corpus was split by tokens, how and why."""
    tokens, docs = manifest["tokens"], manifest["documents"]
    split = manifest.get("split") or {}
    if split.get("by") != "tokens":

        def documents(n: int) -> str:
            return f"{n} document" + ("" if n == 1 else "s")

        return (
            f"train {tokens['train']:,} tokens ({documents(docs['train'])}), "
            f"val {tokens['val']:,} tokens ({documents(docs['val'])})"
        )
    share = f"{100 * split['val_fraction']:g}%"
    return (
        f"train {tokens['train']:,} tokens, val {tokens['val']:,} tokens: split by tokens "
        f"({split['reason']}), the last {share} of each document's tokens is val"
    )


class _writing:
    """Turns an OS error while writing into `work` (a full or read-only disk) into one
    GPT2LabError that names the dataset and says the old one is untouched."""

    def __init__(self, work: Path, out: Path):
        self.work, self.out = work, out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if not isinstance(error, OSError) or not self._ours(error):
            return False
        note = "; the previous dataset there is unchanged" if self.out.exists() else ""
        raise GPT2LabError(
            f"cannot write the dataset {self.out}: {error.strerror or error}{note}"
        ) from error

    def _ours(self, error: OSError) -> bool:
        """A write error has no file name (a full disk) or one inside `work`."""
        if error.filename is None:
            return True
        return Path(error.filename).absolute().is_relative_to(self.work)


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
        self._open(directory, manifest["splits"].get(split, []), split)

    @classmethod
    def from_shards(cls, directory: Path, shards: list[dict], split: str) -> TokenShards:
        """The shards listed (manifest entries), before a manifest exists (`prepare`)."""
        self = cls.__new__(cls)
        self._open(directory, shards, split)
        return self

    def _open(self, directory: Path, shards: list[dict], split: str) -> None:
        shards = [s for s in shards if s["tokens"] > 0]
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
