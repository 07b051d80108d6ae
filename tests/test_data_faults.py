"""`gpt2lab prepare` under bad inputs and faults (issue 11, class 6): binary and non-UTF-8
files are skipped and counted, a dataset never ingests its own (or another) dataset,
every argument is checked before anything is written, and a re-prepare that fails or
is killed half-way leaves the previous dataset exactly as it was."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpt2lab.training.data as data_mod
from gpt2lab import GPT2LabError, Tokenizer
from gpt2lab.cli import main
from gpt2lab.training.data import MANIFEST, TokenShards, is_dataset, prepare

TOK = Tokenizer()
DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "b.txt": "Second one: café ☕, naïve — ünïcödé 日本語 text.",
    "sub/c.txt": "A third document, in a sub-folder.\n\n\nWith blank lines.",
}


def write_corpus(root: Path, docs: dict[str, str] = DOCS) -> Path:
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def expected_ids(texts) -> list[int]:
    return [t for text in texts for t in TOK.encode(text) + [TOK.eot_token]]


def train_ids(out: Path) -> list[int]:
    shards = TokenShards(out, "train")
    return shards.window(0, shards.n_tokens).tolist()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders a run into parent/name left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---- binary and non-UTF-8 files --------------------------------------------------------
BINARY = {
    "png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4,
    "nul-late-in-first-block": b"plain text " * 200 + b"\0" + b"more",
    "random-no-nul": bytes((i * 37 + 11) % 255 + 1 for i in range(5000)),
    "latin-1": "café crème brûlée, à la carte.\n".encode("latin-1"),
    "utf-16": "hello world, in UTF-16".encode("utf-16"),
    "lone-continuation": b"valid start \x80 then junk",
    "cut-off-character": "ends in the middle of ☕".encode()[:-1],
    "overlong": b"overlong slash \xc0\xaf is not UTF-8",
    "surrogate": b"a surrogate \xed\xa0\x80 is not UTF-8",
}


@pytest.mark.parametrize("kind", list(BINARY))
def test_binary_or_non_utf8_file_in_a_folder_is_skipped_and_counted(kind, tmp_path):
    src = write_corpus(tmp_path / "src")
    (src / f"z_{kind}.dat").write_bytes(BINARY[kind])
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert train_ids(tmp_path / "out") == expected_ids(DOCS[k] for k in sorted(DOCS))
    assert manifest["documents"]["train"] == len(DOCS)
    skipped = manifest["skipped"]["binary_files"]
    assert skipped == {"count": 1, "examples": [str(src / f"z_{kind}.dat")]}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"]


def test_invalid_utf8_deep_inside_a_large_file_skips_the_whole_file(tmp_path, monkeypatch):
    """The check reads the whole file, not only its first block: no U+FFFD soup, and no
    half of a document in the shards."""
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 64)
    src = write_corpus(tmp_path / "src")
    (src / "late.txt").write_bytes(b"good line of text\n" * 500 + b"\xff bad byte\n")
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert train_ids(tmp_path / "out") == expected_ids(DOCS[k] for k in sorted(DOCS))
    assert manifest["skipped"]["binary_files"]["count"] == 1
    assert TOK.encode("\ufffd")[0] not in train_ids(tmp_path / "out")


MANY_DOCS = {
    f"d{i:02d}.txt": f"Document {i}.\n" + "It has a line of text.\n" * (i + 3) for i in range(12)
}
LATE_BAD = {  # invalid UTF-8 past the first piece (PIECE_CHARS = 16), wherever it is
    "second-piece": b"good line of text\n" + b"\xff bad byte\n" + b"more text\n" * 20,
    "deep": b"good line of text\n" * 50 + b"caf\xe9\n" + b"more text\n" * 5,
    "last-byte": b"good line of text\n" * 50 + "\u2615".encode()[:-1],
    "first-piece": b"\xc0\xaf overlong, then good text\n" * 5,
}


@pytest.mark.parametrize("hold", ["held", "streamed"])
@pytest.mark.parametrize("where", list(LATE_BAD))
def test_a_file_found_not_utf8_part_way_leaves_no_trace(where, hold, tmp_path, monkeypatch):
    """A file that turns out not to be UTF-8 after some of its pieces were read is
    dropped whole, whether it was held in memory (small) or checked by a first pass and
    then streamed (big). The dataset is byte for byte the one made without that file:
    no piece of it in the shards, and the other documents in the same split (a skipped
    file takes no place in the train/val draw)."""
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 16)
    if hold == "streamed":
        monkeypatch.setattr(data_mod, "HOLD_BYTES", 8)  # every file takes the big-file path
    clean = write_corpus(tmp_path / "clean", MANY_DOCS)
    src = write_corpus(tmp_path / "src", MANY_DOCS)
    for name in ("d03_bad.txt", "d07_bad.txt"):  # sorted among the good ones
        (src / name).write_bytes(LATE_BAD[where])
    want = prepare([clean], tmp_path / "want", val_fraction=0.4, shard_tokens=50, progress=False)
    got = prepare([src], tmp_path / "got", val_fraction=0.4, shard_tokens=50, progress=False)
    assert got["skipped"]["binary_files"] == {
        "count": 2, "examples": [str(src / "d03_bad.txt"), str(src / "d07_bad.txt")]
    }  # fmt: skip
    assert {k: v for k, v in got.items() if k != "skipped"} == {
        k: v for k, v in want.items() if k != "skipped"
    }
    shards = {name: data for name, data in snapshot(tmp_path / "want").items() if name != MANIFEST}
    assert {
        name: data for name, data in snapshot(tmp_path / "got").items() if name != MANIFEST
    } == shards
    assert want["documents"]["val"] > 0 and want["documents"]["train"] > 0


@pytest.mark.parametrize("passes", [1, 2])
def test_each_text_file_is_read_once(passes, tmp_path, monkeypatch):
    """Checking UTF-8 and tokenizing share one read: a file's bytes are read once, plus
    the first block for the binary sniff. Files above HOLD_BYTES are read twice (a
    checking pass, then a streaming one), so that memory stays flat."""
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 1000)
    if passes == 2:
        monkeypatch.setattr(data_mod, "HOLD_BYTES", 1)
    docs = {**DOCS, "big.txt": "a line of text\n" * 3000, "bad.txt": "ok\n" * 3000 + "\udcff"}
    src = tmp_path / "src"
    src.mkdir()
    for name, text in docs.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    read: dict[str, int] = {}
    real_open = open

    class Counting:
        def __init__(self, f, path):
            self.f, self.path = f, str(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read[self.path] = read.get(self.path, 0) + len(data)
            return data

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f, path) if mode == "rb" else f

    monkeypatch.setattr(data_mod, "open", counting_open, raising=False)
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"]["binary_files"]["examples"] == [str(src / "bad.txt")]
    assert set(read) == {str(src / name) for name in docs}
    for name in docs:
        size = (src / name).stat().st_size
        once = size if passes == 1 or name == "bad.txt" else 2 * size  # (bad: check only)
        assert once <= read[str(src / name)] <= once + min(size, data_mod.SNIFF_BYTES), name


@pytest.mark.parametrize("piece_chars", [1, 2, 3, 7, 64])
def test_multibyte_characters_across_read_blocks_are_kept_whole(piece_chars, tmp_path, monkeypatch):
    text = "naïve café ☕ 日本語\n" * 20 + "🙂 emoji at the end\nlast line"
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data_mod, "PIECE_CHARS", piece_chars)
    prepare([tmp_path / "u.txt"], tmp_path / "out", val_fraction=0.0, progress=False)
    assert train_ids(tmp_path / "out") == expected_ids([text])


def test_a_folder_of_nothing_but_binary_files_says_so(tmp_path):
    (tmp_path / "src").mkdir()
    for kind in ("png", "latin-1"):
        (tmp_path / "src" / f"{kind}.bin").write_bytes(BINARY[kind])
    with pytest.raises(GPT2LabError, match=r"no text .*skipped 2 binary or non-UTF-8 files"):
        prepare([tmp_path / "src"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path):
    src = write_corpus(tmp_path / "src")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]\n")
    (src / ".notes.txt").write_text("private")
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert train_ids(tmp_path / "out") == expected_ids(DOCS[k] for k in sorted(DOCS))
    assert manifest["skipped"]["hidden"]["count"] == 2


# ---- JSONL encoding errors ---------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", [b"caf\xe9", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
)
def test_jsonl_line_that_is_not_utf8_is_an_error_naming_file_and_line(bad, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "' + bad + b'"}\n{"text": "after"}\n')
    with pytest.raises(GPT2LabError, match=rf"{path}:3 is not UTF-8"):
        prepare([path], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_binary_jsonl_in_a_folder_is_skipped_and_bom_is_accepted(tmp_path):
    src = write_corpus(tmp_path / "src")
    (src / "blob.jsonl").write_bytes(BINARY["png"])
    (src / "rows.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "with a BOM"}\n{"text": "two"}\n')
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    texts = [DOCS["a.txt"], DOCS["b.txt"], "with a BOM", "two", DOCS["sub/c.txt"]]
    assert train_ids(tmp_path / "out") == expected_ids(texts)
    assert manifest["skipped"]["binary_files"]["count"] == 1


# ---- a dataset never ingests a dataset -------------------------------------------------------
def test_preparing_into_a_subfolder_of_the_input_twice_gives_the_same_dataset(tmp_path):
    src = write_corpus(tmp_path / "src")
    fresh = prepare([src], tmp_path / "fresh", val_fraction=0.3, shard_tokens=20, progress=False)
    first = prepare([src], src / "shards", val_fraction=0.3, shard_tokens=20, progress=False)
    files_after_first = snapshot(src / "shards")
    second = prepare([src], src / "shards", val_fraction=0.3, shard_tokens=20, progress=False)
    for manifest in (first, second):
        assert manifest["tokens"] == fresh["tokens"]
        assert manifest["documents"] == fresh["documents"]
        assert manifest["splits"] == fresh["splits"]
    assert first["skipped"]["dataset_folders"]["count"] == 0  # it did not exist yet
    assert second["skipped"]["dataset_folders"] == {"count": 1, "examples": [str(src / "shards")]}
    assert snapshot(src / "shards").keys() == files_after_first.keys()
    assert train_ids(src / "shards") == train_ids(tmp_path / "fresh")
    assert leftovers(src, "shards") == []


def test_other_datasets_inside_the_input_are_skipped_and_an_unrelated_manifest_is_data(tmp_path):
    src = write_corpus(tmp_path / "src")
    prepare([src / "a.txt"], src / "old" / "dataset", val_fraction=0.0, progress=False)
    (src / "web").mkdir()
    (src / "web" / "manifest.json").write_text('{"name": "a web app manifest"}')
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert manifest["skipped"]["dataset_folders"]["examples"] == [str(src / "old" / "dataset")]
    texts = [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.txt"], '{"name": "a web app manifest"}']
    assert train_ids(tmp_path / "out") == expected_ids(texts)


def test_cli_summary_counts_what_was_skipped(tmp_path, capsys):
    src = write_corpus(tmp_path / "src")
    (src / "img.png").write_bytes(BINARY["png"])
    argv = ["prepare", str(src), "--out", str(src / "shards"), "--val-fraction", "0"]
    for run in range(2):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert err == ""
        assert lines[0].startswith(f"{src / 'shards'}: train ")
        assert f"1 binary or non-UTF-8 file ({src / 'img.png'})" in lines[1]
        assert ("folder holding a gpt2lab dataset" in lines[1]) == (run == 1)


# ---- atomic writes: failures and kills leave the old dataset -------------------------------
@pytest.fixture
def old_dataset(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A corpus, a dataset made from part of it, and that dataset's files."""
    src = write_corpus(tmp_path / "src")
    out = tmp_path / "data"
    prepare([src / "a.txt"], out, val_fraction=0.0, progress=False)
    return src, out, snapshot(out)


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), GPT2LabError),
        (OSError(errno.EROFS, "Read-only file system"), GPT2LabError),
        (Boom("a bug half-way"), Boom),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_a_failing_reprepare_keeps_the_old_dataset(error, expected, old_dataset, monkeypatch):
    src, out, before = old_dataset
    real_write = data_mod._ShardWriter.write
    calls = []

    def write_then_fail(self, ids):
        calls.append(len(ids))
        if len(calls) == 2:
            raise error
        real_write(self, ids)

    monkeypatch.setattr(data_mod, "PIECE_CHARS", 8)  # many writes
    monkeypatch.setattr(data_mod._ShardWriter, "write", write_then_fail)
    with pytest.raises(expected) as info:
        prepare([src], out, val_fraction=0.0, progress=False)
    if expected is GPT2LabError:
        assert "previous dataset there is unchanged" in str(info.value)
        assert str(out) in str(info.value)
    assert snapshot(out) == before
    assert leftovers(out.parent, out.name) == []


def test_a_failing_final_rename_puts_the_old_dataset_back(old_dataset, monkeypatch):
    src, out, before = old_dataset
    real_rename = os.rename

    def rename(a, b):
        if Path(a).name.startswith(f".{out.name}.tmp-"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b)

    monkeypatch.setattr(data_mod.os, "rename", rename)
    with pytest.raises(GPT2LabError, match="cannot move the new dataset"):
        prepare([src], out, val_fraction=0.0, progress=False)
    assert snapshot(out) == before
    assert leftovers(out.parent, out.name) == []


KILL_MIDWAY = """
import os, signal, sys
import gpt2lab.training.data as d
d.PIECE_CHARS = 8
real = d._ShardWriter.write
def write(self, ids):
    real(self, ids)
    self._file.flush()
    if sum(s["tokens"] for s in self.shards) > 30:
        os.kill(os.getpid(), signal.SIGKILL)
d._ShardWriter.write = write
d.prepare([sys.argv[1]], sys.argv[2], val_fraction=0.0, progress=False)
"""


def test_a_killed_reprepare_keeps_the_old_dataset_and_the_next_run_cleans_up(old_dataset):
    src, out, before = old_dataset
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILL_MIDWAY), str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert snapshot(out) == before  # untouched, and still loads
    assert train_ids(out) == expected_ids([DOCS["a.txt"]])
    (stale,) = leftovers(out.parent, out.name)
    half = out.parent / stale
    assert any(half.glob("train_*.bin"))  # it was killed mid-way through writing
    assert not is_dataset(half)  # and the half folder does not look like a dataset
    with pytest.raises(GPT2LabError, match="manifest.json"):
        TokenShards(half, "train")
    manifest = prepare([src], out, val_fraction=0.0, progress=False)
    assert leftovers(out.parent, out.name) == []  # the stale folder is gone
    assert manifest["documents"]["train"] == len(DOCS)


# ---- arguments and output folders, checked before anything is written ------------------------
BAD_ARGUMENTS = {
    "shard_tokens=0": dict(shard_tokens=0),
    "shard_tokens=-1": dict(shard_tokens=-1),
    "shard_tokens=True": dict(shard_tokens=True),
    "shard_tokens=1.5": dict(shard_tokens=1.5),
    "shard_tokens='10'": dict(shard_tokens="10"),
    "val_fraction=nan": dict(val_fraction=float("nan")),
    "val_fraction=inf": dict(val_fraction=float("inf")),
    "val_fraction=-0.1": dict(val_fraction=-0.1),
    "val_fraction=1": dict(val_fraction=1),
    "val_fraction='0.1'": dict(val_fraction="0.1"),
    "val_fraction=True": dict(val_fraction=True),
    "field=''": dict(field=""),
    "field=None": dict(field=None),
    "seed='x'": dict(seed="x"),
    "seed=1.5": dict(seed=1.5),
    "num_threads=0": dict(num_threads=0),
    "num_threads=-2": dict(num_threads=-2),
    "num_threads=1.5": dict(num_threads=1.5),
    "num_threads='2'": dict(num_threads="2"),
    "num_threads=True": dict(num_threads=True),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_invalid_arguments_are_rejected_before_writing(case, tmp_path):
    write_corpus(tmp_path / "src")
    with pytest.raises(GPT2LabError, match=list(BAD_ARGUMENTS[case])[0]):
        prepare([tmp_path / "src"], tmp_path / "out", progress=False, **BAD_ARGUMENTS[case])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_numpy_numbers_are_plain_numbers(tmp_path):
    src = write_corpus(tmp_path / "src")
    plain = prepare([src], tmp_path / "plain", val_fraction=0.25, shard_tokens=20, seed=3,
                    progress=False)  # fmt: skip
    numpy = prepare([src], tmp_path / "numpy", val_fraction=np.float64(0.25),
                    shard_tokens=np.int64(20), seed=np.uint8(3), progress=False)  # fmt: skip
    assert numpy == plain
    assert snapshot(tmp_path / "numpy") == snapshot(tmp_path / "plain")


def test_the_shards_do_not_depend_on_the_tokenizer_threads(tmp_path, capsys):
    src = write_corpus(tmp_path / "src")
    one = prepare([src], tmp_path / "one", val_fraction=0.25, num_threads=1, progress=False)
    for threads, code in (("3", 0), ("0", 2)):
        argv = ["prepare", str(src), "--out", str(tmp_path / threads), "--val-fraction", "0.25",
                "--threads", threads]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code
    assert "--threads" in capsys.readouterr().err
    assert len(train_ids(tmp_path / "one")) > 20 and one["tokenizer"]
    assert snapshot(tmp_path / "3") == snapshot(tmp_path / "one")
    assert not (tmp_path / "0").exists()


def test_no_inputs_is_an_error(tmp_path):
    with pytest.raises(GPT2LabError, match="at least one input"):
        prepare([], tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "where, message",
    [
        ("a-file", "is a file; give a folder"),
        ("a-file/out", "is a file, not a folder"),
        ("a-file/deeper/out", "is a file, not a folder"),
        ("not-a-dataset", "already holds files and no gpt2lab dataset"),
        ("dataset-plus-notes", "other files (notes.txt)"),
        ("/proc/gpt2lab-test-out", "cannot create a folder in /proc"),
        ("/proc/self/gpt2lab/out", "cannot create the folder"),
        ("/", "not the root"),
    ],
)
def test_outputs_that_cannot_or_must_not_be_written_are_refused(where, message, tmp_path):
    src = write_corpus(tmp_path / "src")
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "thesis.tex").write_text("years of work")
    prepare([src / "a.txt"], tmp_path / "dataset-plus-notes", val_fraction=0.0, progress=False)
    (tmp_path / "dataset-plus-notes" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    out = where if where.startswith("/") else tmp_path / where
    with pytest.raises(GPT2LabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare([src], out, progress=False)
    assert snapshot(tmp_path) == before


def test_an_empty_existing_folder_is_filled(tmp_path):
    src = write_corpus(tmp_path / "src")
    (tmp_path / "empty").mkdir()
    prepare([src], tmp_path / "empty", val_fraction=0.0, progress=False)
    assert train_ids(tmp_path / "empty") == expected_ids(DOCS[k] for k in sorted(DOCS))
    assert np.fromfile(tmp_path / "empty" / "train_0000.bin", dtype=np.uint16).size > 0


def test_a_single_path_is_one_input_not_its_characters(tmp_path):
    write_corpus(tmp_path / "src")
    manifest = prepare(
        tmp_path / "src" / "a.txt", tmp_path / "out", val_fraction=0.0, progress=False
    )
    assert manifest["documents"]["train"] == 1
