"""gpt2lab.Tokenizer against independent GPT-2 BPE implementations over the shipped files.

References (all read src/gpt2lab/data/encoder.json and vocab.bpe, none uses tiktoken):
  * `reference`: a pure-Python port of OpenAI's gpt-2 `encoder.py` (the "slow" BPE). In
    transformers 5.x `GPT2Tokenizer` is no longer a pure-Python tokenizer, so the slow
    implementation lives here.
  * `hf_gpt2`: `transformers.GPT2Tokenizer` (backed by HF `tokenizers`, byte-level BPE).
  * `hf_bpe`: a bare `tokenizers.Tokenizer` (BPE model + ByteLevel pre-tokenizer,
    add_prefix_space=False) with no added/special tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2lab
from gpt2lab import GPT2LabError, Tokenizer

DATA = Path(gpt2lab.__file__).parent / "data"
ENCODER_JSON = DATA / "encoder.json"
VOCAB_BPE = DATA / "vocab.bpe"
EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# ---------------------------------------------------------------------------------------------
# Independent pure-Python GPT-2 BPE (port of openai/gpt-2 src/encoder.py)
# ---------------------------------------------------------------------------------------------


def _openai_bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


class ReferenceBPE:
    """OpenAI's original GPT-2 encoder algorithm, written out independently of gpt2lab."""

    PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, encoder_path: Path, bpe_path: Path):
        self.encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = bpe_path.read_text(encoding="utf-8").split("\n")[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = _openai_bytes_to_unicode()
        self.pat = regex.compile(self.PAT)
        self.cache: dict[str, tuple[str, ...]] = {}

    def bpe(self, token: str) -> tuple[str, ...]:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pat.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


# ---------------------------------------------------------------------------------------------
# Fixtures (built once per module)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    return ReferenceBPE(ENCODER_JSON, VOCAB_BPE)


@pytest.fixture(scope="module")
def hf_gpt2():
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer(vocab=str(ENCODER_JSON), merges=str(VOCAB_BPE), add_prefix_space=False)
    assert len(hf) == N_VOCAB  # the files really were loaded
    return hf


@pytest.fixture(scope="module")
def hf_bpe():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    hf = HFTokenizer(BPE.from_file(str(ENCODER_JSON), str(VOCAB_BPE)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    assert hf.get_vocab_size() == N_VOCAB
    return hf


# ---------------------------------------------------------------------------------------------
# Corpus (no "<|endoftext|>" here: HF treats it as a special token; tested separately)
# ---------------------------------------------------------------------------------------------

LONG_PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
    "was the season of Light, it was the season of Darkness, it was the spring of hope, it "
    "was the winter of despair, we had everything before us, we had nothing before us, we "
    "were all going direct to Heaven, we were all going direct the other way \u2014 in short, "
    "the period was so far like the present period, that some of its noisiest authorities "
    "insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. "
) * 3

PYTHON_CODE = '''\
def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
\treturn fib(n - 1) + fib(n - 2)  # tab-indented on purpose


class Foo(object):
        def __init__(self):
            self.x = {"a": [1, 2, 3], 'b': None}
'''

JSON_CODE = """{
  "name": "gpt2lab",
  "version": "0.1.0",
  "nested": {
    "list": [1, 2.5, -3e10, true, false, null],
    "emoji": "\\ud83d\\ude00"
  }
}"""

CORPUS = [
    "Hello world!",
    "",
    " ",
    "a",
    # emoji, ZWJ sequences, skin tones, flags, variation selectors
    "I love 🍕 and 🎉🎉🎉!",
    "family: 👨\u200d👩\u200d👧\u200d👦 and couple 👩\u200d❤\ufe0f\u200d👨",
    "thumbs 👍🏽👍🏿👋🏻 wave",
    "flags 🇫🇷🇯🇵🇺🇸 ok",
    "☃️ ❤️ ✔︎",
    # CJK
    "中文分词测试：你好，世界！",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트 입니다",
    # RTL scripts
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם! מה שלומך?",
    # combining marks and other Unicode
    "e\u0301 cafe\u0301 vs café",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319a\u0300lgo",
    "Ελληνικά και Русский текст",
    "नमस्ते दुनिया",
    "\u00a0non-breaking\u00a0space\u2003em-space\u3000ideographic",
    "zero\u200bwidth\ufeffBOM",
    # whitespace runs
    "two  spaces   three    four",
    "trailing spaces   ",
    "   leading spaces",
    "line one\nline two\n",
    "para one\n\n\npara two",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\n",
    "\t\ttabs\tand\t\tmore\t",
    "mixed \t \n \r\n  \t",
    " \n",
    # code
    PYTHON_CODE,
    JSON_CODE,
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    # contractions (lower and upper case)
    "don't I'm they'll we've she'd it's you're",
    "DON'T I'M THEY'LL WE'VE SHE'D IT'S YOU'RE",
    "'s 't 're 've 'm 'll 'd ''s rock'n'roll",
    # numbers
    "pi is 3.14159 and 1,000,000 is a million, year 2026",
    "0123456789 42 -7 +3.0e-10 1/2 ½ ² ٣",
    # punctuation runs
    "Wait... what?!?! (really) [yes] {no} <maybe> --- *** ### $$$ %%% ^^^",
    "!!!???...,,,;;;:::'\"`~@",
    # URLs / emails / paths
    "See https://example.com/path/to/page?query=1&x=y#frag for details.",
    "mail me at someone@example.org or visit www.python.org/downloads/",
    "C:\\Users\\name\\file.txt and /usr/local/bin/python3",
    # long paragraph
    LONG_PARAGRAPH,
]

CORPUS_IDS = [f"c{i}" for i in range(len(CORPUS))]

# Texts whose GPT-2 tokens split multi-byte UTF-8 characters.
SPLIT_TEXTS = [
    "family: 👨\u200d👩\u200d👧\u200d👦 and 👍🏽",
    "中文分词测试：你好，世界！",
    "emoji soup 🍕🎉🦄🧑\u200d🚀 日本語 한국어",
    "e\u0301 and 👩🏿\u200d🔬 at the end 🏳️\u200d🌈",
]


# ---------------------------------------------------------------------------------------------
# 1. Ids equal independent implementations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_ids_match_pure_python_reference(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_ids_match_transformers_gpt2tokenizer(tok, hf_gpt2, text):
    assert tok.encode(text) == hf_gpt2.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_ids_match_hf_tokenizers_bytelevel_bpe(tok, hf_bpe, text):
    assert tok.encode(text) == hf_bpe.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_decode_matches_and_roundtrips_corpus(tok, hf_bpe, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf_bpe.decode(ids) == text


def test_corpus_is_nontrivial(tok):
    # Guard against a vacuous comparison: the corpus must produce many, varied ids.
    all_ids = [i for text in CORPUS for i in tok.encode(text)]
    assert len(all_ids) > 1000
    assert len(set(all_ids)) > 400


def test_endoftext_against_references(tok, reference, hf_gpt2, hf_bpe):
    text = f"first doc{EOT}second doc"
    ordinary = tok.encode(text)
    # As ordinary text it matches the references that have no special tokens...
    assert ordinary == reference.encode(text)
    assert ordinary == hf_bpe.encode(text, add_special_tokens=False).ids
    # ...and with allow_special it matches HF, which treats it as the special token.
    special = tok.encode(text, allow_special=True)
    assert special == hf_gpt2.encode(text, add_special_tokens=False)
    assert special.count(EOT_ID) == 1
    assert EOT_ID not in ordinary


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_ids_match_hf_bpe_on_random_text(tok, hf_bpe, text):
    assert tok.encode(text) == hf_bpe.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------
# 2. Property tests: round trip and id range
# ---------------------------------------------------------------------------------------------


def _check_roundtrip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < N_VOCAB for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    if text:
        assert ids
    else:
        assert ids == []


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_text(tok, text):
    _check_roundtrip(tok, text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_roundtrip_any_text_long(tok, text):
    _check_roundtrip(tok, text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["👨\u200d👩\u200d👧", "🏽", "中", "文", "é", "\u0301", " ", "\n", "a"])
        | st.text(max_size=5),
        max_size=40,
    ).map("".join)
)
def test_roundtrip_multibyte_heavy_text(tok, text):
    _check_roundtrip(tok, text)


# ---------------------------------------------------------------------------------------------
# 3. Exact known values
# ---------------------------------------------------------------------------------------------


def test_hello_world_ids(tok):
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert tok("Hello world!") == [15496, 995, 0]
    assert tok.decode([15496, 995, 0]) == "Hello world!"
    assert tok.encode(" Hello") == [18435]


def test_vocab_constants(tok):
    assert tok.eot_token == EOT_ID
    assert tok.vocab_size == N_VOCAB
    assert len(tok) == N_VOCAB


def test_endoftext_is_ordinary_text_by_default(tok):
    ids = tok.encode(EOT)
    assert len(ids) > 1
    assert EOT_ID not in ids
    assert tok.decode(ids) == EOT
    assert tok.encode(EOT, allow_special=True) == [EOT_ID]
    assert tok.encode(f"a{EOT}b", allow_special=True) == [64, EOT_ID, 65]
    assert tok.decode([EOT_ID]) == EOT
    assert tok.decode_bytes([EOT_ID]) == EOT.encode()


def test_shipped_vocab_file_checksums():
    assert hashlib.md5(ENCODER_JSON.read_bytes()).hexdigest() == "dffec25a898b1f5e569bec4dffd7e5c0"
    assert hashlib.md5(VOCAB_BPE.read_bytes()).hexdigest() == "75a37753dd7a28a2c5df80c28bf06e4e"


def test_decode_of_partial_character_is_replacement(tok):
    ids = tok.encode("文")
    assert len(ids) == 2  # "文" (e6 96 87) is split by GPT-2's BPE
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == "文"


# ---------------------------------------------------------------------------------------------
# 4. encode_batch
# ---------------------------------------------------------------------------------------------


def test_encode_batch_equals_encode(tok):
    texts = CORPUS + [EOT, f"x{EOT}y"] + SPLIT_TEXTS
    expected = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected
    assert tok.encode_batch(tuple(texts), num_threads=4) == expected


def test_encode_batch_allow_special_equals_encode(tok):
    texts = [f"doc one{EOT}doc two", EOT, "no special here", ""]
    expected = [tok.encode(t, allow_special=True) for t in texts]
    assert tok.encode_batch(texts, allow_special=True) == expected
    assert expected[1] == [EOT_ID]
    assert tok.encode_batch(texts) != expected  # without allow_special, EOT stays text


def test_encode_batch_empty(tok):
    assert tok.encode_batch([]) == []


# ---------------------------------------------------------------------------------------------
# 5. Streaming decoder
# ---------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_stream_decoder_holds_back_partial_characters(tok, text):
    ids = tok.encode(text)
    # The text really contains tokens that are not valid UTF-8 on their own.
    partial = []
    for t in ids:
        try:
            tok.decode_bytes([t]).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(t)
    assert partial, "test text does not split any UTF-8 character"

    pieces, tail = _stream(tok, ids)
    for piece in pieces:
        assert isinstance(piece, str)
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # no lone surrogates
    assert tail == ""
    assert "".join(pieces) + tail == text
    # Some push() must have emitted nothing (bytes held back for the next token).
    assert any(p == "" for p in pieces)


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
        max_size=80,
    )
)
def test_stream_decoder_property(tok, text):
    pieces, tail = _stream(tok, tok.encode(text))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == text


def test_stream_decoder_flush_reports_unfinished_character(tok):
    first = tok.encode("文")[0]
    dec = tok.stream_decoder()
    assert dec.push(first) == ""
    assert dec.flush() == "\ufffd"
    # A fresh decoder is independent of the previous one.
    dec2 = tok.stream_decoder()
    assert "".join(dec2.push(i) for i in tok.encode("文")) + dec2.flush() == "文"


def test_stream_decoder_rejects_bad_id(tok):
    dec = tok.stream_decoder()
    with pytest.raises(GPT2LabError):
        dec.push(N_VOCAB)


# ---------------------------------------------------------------------------------------------
# 6. Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [N_VOCAB, -1, 10**9])
def test_decode_out_of_range_raises(tok, bad_id):
    with pytest.raises(GPT2LabError, match=str(bad_id)):
        tok.decode([15496, bad_id])
    with pytest.raises(GPT2LabError):
        tok.decode_bytes([bad_id])


def test_decode_boundary_ids_are_valid(tok):
    assert tok.decode([0]) == "!"
    assert tok.decode([N_VOCAB - 1]) == EOT
    assert tok.decode([]) == ""


@pytest.mark.parametrize("value", [None, 123, b"bytes", ["a", "b"], 3.5])
def test_encode_non_string_raises(tok, value):
    with pytest.raises(GPT2LabError):
        tok.encode(value)
    with pytest.raises(GPT2LabError):
        tok.encode(value, allow_special=True)


@pytest.mark.parametrize("ids", [[1.7], ["5"], ["x"], None])
def test_decode_non_integer_ids_raise(tok, ids):
    with pytest.raises(GPT2LabError, match="integer token ids"):
        tok.decode(ids)


def test_decode_accepts_integer_like_ids(tok):
    import numpy as np
    import torch

    assert tok.decode(torch.tensor([15496, 995, 0])) == "Hello world!"
    assert tok.decode(np.array([15496, 995, 0])) == "Hello world!"


@pytest.mark.parametrize("texts", ["abc", ["a", 3]])
def test_encode_batch_rejects_non_lists_of_strings(tok, texts):
    with pytest.raises(GPT2LabError, match="list of strings"):
        tok.encode_batch(texts)
