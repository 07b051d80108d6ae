"""The corpus reader (gpt2lab.interp.corpus) against a brute-force stream built by hand:
every file encoded whole with the tokenizer, `<|endoftext|>` after each, then cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab import GPT2LabError
from gpt2lab.interp.corpus import open_corpus, windows
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.training.data import prepare

TEXTS = {
    "a.txt": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n",
    "b/c.txt": "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "b/d.txt": "Friends, Romans, countrymen, lend me your ears;\n" * 7,
    "e.txt": "",  # an empty file is no document
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def reference(tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stream, each token's document and position in it, by brute force."""
    ids, docs, pos = [], [], []
    for d, name in enumerate(n for n in sorted(TEXTS) if TEXTS[n]):
        doc = tok.encode(TEXTS[name]) + [tok.eot_token]
        ids += doc
        docs += [d] * len(doc)
        pos += list(range(len(doc)))
    return np.array(ids), np.array(docs), np.array(pos)


def flat(ws, field):
    return np.concatenate([getattr(w, field).reshape(-1).numpy() for w in ws])


@pytest.mark.parametrize("seq_len,batch", [(7, 3), (16, 1), (5, 50)])
def test_text_stream_equals_brute_force(tok, corpus_dir, seq_len, batch):
    ids, docs, pos = reference(tok)
    ws = list(windows(open_corpus(corpus_dir, tok), seq_len=seq_len, batch_size=batch, drop=()))
    assert [w.index for w in ws] == list(range(len(ws)))
    assert all(w.tokens.shape[1] == seq_len and w.tokens.dtype == torch.int64 for w in ws)
    assert all(w.tokens.shape[0] == batch for w in ws[:-1])
    real = flat(ws, "offset") >= 0
    n = len(ids)
    assert open_corpus(corpus_dir, tok).count_tokens() == n
    assert real.sum() == n and real[:n].all()  # padding only at the very end
    np.testing.assert_array_equal(flat(ws, "tokens")[:n], ids)
    np.testing.assert_array_equal(flat(ws, "doc")[:n], docs)
    np.testing.assert_array_equal(flat(ws, "pos")[:n], pos)
    np.testing.assert_array_equal(flat(ws, "offset")[:n], np.arange(n))
    keep = flat(ws, "keep")
    assert keep[:n].all() and not keep[n:].any()
    assert (flat(ws, "tokens")[n:] == tok.eot_token).all()


def test_drop_filters_keep(tok, corpus_dir):
    ids, _, _ = reference(tok)
    ws = list(windows(open_corpus(corpus_dir, tok), seq_len=8, batch_size=2,
                      drop=["<|endoftext|>", "\n"]))  # fmt: skip
    keep = flat(ws, "keep")[: len(ids)]
    np.testing.assert_array_equal(keep, ~np.isin(ids, [tok.eot_token, 198]))


def test_ranks_resume_and_cap(tok, corpus_dir):
    src = open_corpus(corpus_dir, tok)
    one = list(windows(src, seq_len=4, batch_size=3))
    parts = [list(windows(src, seq_len=4, batch_size=3, rank=r, world=3)) for r in range(3)]
    assert sorted(w.index for p in parts for w in p) == [w.index for w in one]
    for r, p in enumerate(parts):
        assert all(w.index % 3 == r for w in p)
        for w in p:
            torch.testing.assert_close(w.tokens, one[w.index].tokens, rtol=0, atol=0)
            torch.testing.assert_close(w.pos, one[w.index].pos, rtol=0, atol=0)
    resumed = list(windows(src, seq_len=4, batch_size=3, start=5))
    assert [w.index for w in resumed] == [w.index for w in one[5:]]
    assert all(torch.equal(a.doc, b.doc) for a, b in zip(resumed, one[5:], strict=True))
    ids, _, _ = reference(tok)
    capped = list(windows(src, seq_len=4, batch_size=3, max_tokens=30, drop=()))
    assert (flat(capped, "offset") >= 0).sum() == 30
    np.testing.assert_array_equal(flat(capped, "tokens")[:30], ids[:30])


def test_shards_equal_their_tokens(tok, corpus_dir, tmp_path):
    prepare([corpus_dir], tmp_path / "ds", val_fraction=0.0, progress=False)
    raw = np.fromfile(tmp_path / "ds" / "train_0000.bin", dtype=np.uint16).astype(np.int64)
    src = open_corpus(tmp_path / "ds", tok)
    assert src.description["kind"] == "shards" and src.description["hash"].startswith("sha256:")
    ws = list(windows(src, seq_len=9, batch_size=2, drop=()))
    n = len(raw)
    assert src.count_tokens() == n
    np.testing.assert_array_equal(flat(ws, "tokens")[:n], raw)
    ends = np.concatenate([[0], np.cumsum(raw[:-1] == tok.eot_token)])
    np.testing.assert_array_equal(flat(ws, "doc")[:n], ends)


def test_text_hash_follows_content(tok, tmp_path):
    (tmp_path / "x.txt").write_text("one text")
    first = open_corpus(tmp_path / "x.txt", tok).description["hash"]
    assert open_corpus([tmp_path / "x.txt"], tok).description["hash"] == first
    (tmp_path / "x.txt").write_text("another text")
    assert open_corpus(tmp_path / "x.txt", tok).description["hash"] != first


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "does not exist"),
        ("empty", "has no tokens"),
        ("only_eot_dropped", "no tokens left after dropping"),
        ("seq_len", "seq_len must be an integer >= 1"),
        ("batch", "batch_size must be an integer >= 1"),
        ("rank", r"rank must be an integer in \[0, 1\]"),
        ("multi_token_drop", "not one"),
        ("bad_drop", "drop must be a list"),
        ("not_path", "corpus must be a path"),
    ],
)
def test_bad_inputs(tok, tmp_path, case, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nl.txt").write_text("\n\n\n\n")
    good = tmp_path / "nl.txt"
    run = {
        "missing": lambda: open_corpus(tmp_path / "nope", tok),
        "empty": lambda: list(windows(open_corpus(tmp_path / "empty.txt", tok), seq_len=4,
                                      batch_size=1)),
        "only_eot_dropped": lambda: list(windows(open_corpus(good, tok), seq_len=4, batch_size=1,
                                                 drop=["\n\n", "<|endoftext|>"])),
        "seq_len": lambda: windows(open_corpus(good, tok), seq_len=0, batch_size=1),
        "batch": lambda: windows(open_corpus(good, tok), seq_len=4, batch_size=True),
        "rank": lambda: windows(open_corpus(good, tok), seq_len=4, batch_size=1, rank=2,
                                world=2),
        "multi_token_drop": lambda: windows(open_corpus(good, tok), seq_len=4, batch_size=1,
                                            drop=["hello world"]),
        "bad_drop": lambda: windows(open_corpus(good, tok), seq_len=4, batch_size=1, drop=5),
        "not_path": lambda: open_corpus(3, tok),
    }[case]  # fmt: skip
    with pytest.raises(GPT2LabError, match=match) as info:
        run()
    assert "\n" not in str(info.value)
