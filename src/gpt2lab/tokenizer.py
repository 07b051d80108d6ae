"""GPT-2's byte-level BPE tokenizer, exact ids, no network.

OpenAI's `encoder.json` and `vocab.bpe` ship inside the package; tiktoken does the
merging (it is an order of magnitude faster than a Python BPE). tiktoken's own
`get_encoding("gpt2")` would download the files, so the encoding is built here from
the shipped ones. `<|endoftext|>` is a special token only where the caller allows it:
by default the text "<|endoftext|>" is encoded as ordinary characters, so untrusted
text cannot inject document boundaries.
"""

from __future__ import annotations

import codecs
import json
import operator
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

import tiktoken

from .errors import GPT2LabError
from .validate import boolean, integer

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|...).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in encoder.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    data = resources.files("gpt2lab") / "data"
    encoder: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    eot_id = encoder.pop(EOT)
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items()}
    return tiktoken.Encoding(
        name="gpt2lab-gpt2",
        pat_str=PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: eot_id},
        explicit_n_vocab=len(ranks) + 1,
    )


class Tokenizer:
    """`encode` / `decode` with exactly GPT-2's ids (50257 tokens, `<|endoftext|>` = 50256)."""

    def __init__(self) -> None:
        self._enc = _encoding()
        self.eot_token: int = self._enc.eot_token
        self.vocab_size: int = self._enc.n_vocab

    # transformers' names for GPT-2's one special token, which notebooks read
    # (`model.tokenizer.bos_token_id`): it begins, ends and pads, as in TransformerLens
    bos_token_id = eos_token_id = pad_token_id = property(lambda self: self.eot_token)
    bos_token = eos_token = pad_token = EOT

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; with `allow_special`, "<|endoftext|>" becomes id 50256."""
        if not isinstance(text, str):
            raise GPT2LabError(f"encode expects a string, got {type(text).__name__}")
        if boolean("allow_special", allow_special):
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = False, num_threads: int = 2
    ) -> list[list[int]]:
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise GPT2LabError("encode_batch expects a list of strings")
        num_threads = integer("num_threads", num_threads, 1)
        if boolean("allow_special", allow_special):
            return self._enc.encode_batch(
                list(texts), num_threads=num_threads, allowed_special="all"
            )
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; bytes that do not form valid UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise GPT2LabError("decode expects a sequence of integer token ids") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GPT2LabError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        return self._enc.decode_bytes(ids)

    def token_bytes(self, token: int) -> bytes:
        return self.decode_bytes([token])

    def id_to_str(self, token: int) -> str:
        """A token's text, for tables and plots (partial UTF-8 shown as U+FFFD)."""
        return self.decode([token])

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


class StreamDecoder:
    """Turns tokens into text as they arrive, never emitting half a UTF-8 character.

    A GPT-2 token can end in the middle of a multi-byte character (emoji, CJK); the
    incremental UTF-8 decoder holds those bytes back until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._tok.decode_bytes([token]))

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
