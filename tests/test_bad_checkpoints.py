"""Malformed checkpoint files: every one is a GPT2LabError that names the file.

Each case starts from a valid one-layer checkpoint written by gpt2lab.save and breaks
one thing: the safetensors header (not an object, missing or mistyped fields, offsets
that overlap, leave gaps or run past the file, nesting deep enough to blow the JSON
parser's stack), the weights (integer dtypes, wrong shapes, missing or unknown
tensors), a `pytorch_model.bin` (empty, garbage, truncated, int keys, not a dict,
pickled objects), a shard index, or config.json (wrong types, "false" as a bool, NaN
epsilon, sizes past the limits). The promise checked is the one the CLI relies on:
`GPT2LabError` (never another exception type) with a one-line message naming the file.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.checkpoint import ours_to_hf, save, write_safetensors

CFG = GPT2Config(n_layers=1, d_model=8, n_heads=2, n_ctx=8, d_vocab=16)
WTE = "transformer.wte.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("good")
    save(GPT2(CFG).init_weights(seed=0), directory)
    return directory


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


# ---- helpers that write broken files -------------------------------------------------
def hf_state() -> list[tuple[str, torch.Tensor]]:
    """The model's tensors under their HF names, in HF's layout (as save writes them)."""
    out = []
    for name, tensor in GPT2(CFG).init_weights(seed=0).state_dict().items():
        hf_name, transpose = ours_to_hf(name)
        out.append((hf_name, tensor.T.contiguous() if transpose else tensor))
    return out


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def raw_header(blob: bytes):
    """A safetensors file whose header is exactly `blob`."""

    def make(d: Path) -> None:
        _, data = split(d / "model.safetensors")
        write_raw(d / "model.safetensors", blob, data)

    return make


def edit_header(fn):
    """A safetensors file whose header (a dict) `fn` changes in place."""

    def make(d: Path) -> None:
        header, data = split(d / "model.safetensors")
        fn(header)
        write_raw(d / "model.safetensors", json.dumps(header).encode(), data)

    return make


def set_entry(key: str, value):
    def fn(header: dict) -> None:
        if value is _DELETE:
            del header[WTE][key]
        else:
            header[WTE][key] = value

    return edit_header(fn)


_DELETE = object()


def last_tensor(header: dict) -> dict:
    return max(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0]
    )


def second_tensor_overlaps(header: dict) -> None:
    entries = sorted(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0]
    )
    first, second = entries[0], entries[1]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


def gap(d: Path) -> None:
    header, data = split(d / "model.safetensors")
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [x + 8 for x in v["data_offsets"]]
    write_raw(d / "model.safetensors", json.dumps(header).encode(), bytes(8) + data)


def raw_file(name: str, content: bytes):
    def make(d: Path) -> None:
        (d / name).write_bytes(content)

    return make


def truncate(name: str, keep_fraction: float):
    def make(d: Path) -> None:
        raw = (d / name).read_bytes()
        (d / name).write_bytes(raw[: int(len(raw) * keep_fraction)])

    return make


def tensors(change):
    """model.safetensors rewritten from the (HF-named) tensors after `change` edits them."""

    def make(d: Path) -> None:
        state = dict(hf_state())
        change(state)
        write_safetensors(d / "model.safetensors", list(state.items()), {"format": "pt"})

    return make


def as_bin(content):
    """model.safetensors replaced by a pytorch_model.bin holding `content()` (torch.save)."""

    def make(d: Path) -> None:
        (d / "model.safetensors").unlink()
        torch.save(content(), d / "pytorch_model.bin")

    return make


def as_raw_bin(content: bytes):
    def make(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(content)

    return make


def truncated_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save(dict(hf_state()), d / "pytorch_model.bin")
    truncate("pytorch_model.bin", 0.5)(d)


def index(content: str, keep_weights: bool = False):
    def make(d: Path) -> None:
        if not keep_weights:
            (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(content)

    return make


def config(**changes):
    def make(d: Path) -> None:
        hf = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                hf.pop(key, None)
            else:
                hf[key] = value
        (d / "config.json").write_text(json.dumps(hf))

    return make


def config_dir(d: Path) -> None:
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def shape_change(name: str, shape):
    def change(state: dict) -> None:
        state[name] = torch.zeros(shape)

    return change


def dtype_change(dtype):
    def change(state: dict) -> None:
        state[WTE] = state[WTE].to(dtype)

    return change


def drop(name: str):
    def change(state: dict) -> None:
        del state[name]

    return change


def add(name: str, shape=(8,)):
    def change(state: dict) -> None:
        state[name] = torch.zeros(shape)

    return change


ST, BIN, CONFIG = "model.safetensors", "pytorch_model.bin", "config.json"
INDEX = "model.safetensors.index.json"
DEEP = 100_000

CASES = {
    # the safetensors header
    "header-list": (raw_header(b"[]"), ST),
    "header-int": (raw_header(b"5"), ST),
    "header-string": (raw_header(b'"weights"'), ST),
    "header-null": (raw_header(b"null"), ST),
    "header-not-json": (raw_header(b"{not json"), ST),
    "header-not-utf8": (raw_header(b'{"\xff\xfe": 1}'), ST),
    "header-nested": (raw_header(b"[" * DEEP + b"]" * DEEP), ST),
    "header-nested-entry": (raw_header(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"), ST),
    "header-size-huge": (lambda d: (d / ST).write_bytes((2**63).to_bytes(8, "little") + b"{}"), ST),
    "header-size-past-end": (
        lambda d: (d / ST).write_bytes((1000).to_bytes(8, "little") + b"{}"),
        ST,
    ),
    "empty-file": (raw_file(ST, b""), ST),
    "four-bytes": (raw_file(ST, b"\0\0\0\0"), ST),
    "entry-list": (edit_header(lambda h: h.__setitem__(WTE, [1, 2])), ST),
    "entry-string": (edit_header(lambda h: h.__setitem__(WTE, "F32")), ST),
    "no-data_offsets": (set_entry("data_offsets", _DELETE), ST),
    "no-dtype": (set_entry("dtype", _DELETE), ST),
    "no-shape": (set_entry("shape", _DELETE), ST),
    "dtype-unknown": (set_entry("dtype", "F8_E4M3"), ST),
    "dtype-list": (set_entry("dtype", ["F32"]), ST),
    "shape-string": (set_entry("shape", "[16, 8]"), ST),
    "shape-negative": (set_entry("shape", [-16, -8]), ST),
    "shape-bool": (set_entry("shape", [True, 128]), ST),
    "shape-float": (set_entry("shape", [16.0, 8]), ST),
    "shape-nested": (set_entry("shape", [[16], 8]), ST),
    "shape-huge": (set_entry("shape", [2**70, 2**70]), ST),
    "offsets-negative": (set_entry("data_offsets", [-512, 0]), ST),
    "offsets-reversed": (edit_header(lambda h: h[WTE]["data_offsets"].reverse()), ST),
    "offsets-three": (set_entry("data_offsets", [0, 256, 512]), ST),
    "offsets-float": (set_entry("data_offsets", [0.0, 512.0]), ST),
    "offsets-strings": (set_entry("data_offsets", ["0", "512"]), ST),
    "offsets-null": (set_entry("data_offsets", None), ST),
    "offsets-overlap": (edit_header(second_tensor_overlaps), ST),
    "offsets-gap": (gap, ST),
    "offsets-past-end": (
        edit_header(lambda h: last_tensor(h)["data_offsets"].__setitem__(1, 10**9)),
        ST,
    ),
    "data-truncated": (truncate(ST, 0.9), ST),
    # the tensors against config.json
    "int64-weights": (tensors(dtype_change(torch.int64)), ST),
    "int32-weights": (tensors(dtype_change(torch.int32)), ST),
    "bool-weights": (tensors(dtype_change(torch.bool)), ST),
    "uint8-weights": (tensors(dtype_change(torch.uint8)), ST),
    "wrong-shape": (tensors(shape_change(WTE, (8, 16))), ST),
    "wrong-shape-3d": (tensors(shape_change(WTE, (16, 8, 1))), ST),
    "missing-tensor": (tensors(drop("transformer.ln_f.bias")), ST),
    "unknown-tensor": (tensors(add("transformer.foo.weight")), ST),
    "extra-layer": (tensors(add("transformer.h.1.ln_1.weight")), ST),
    "layer-index-huge": (tensors(add(f"transformer.h.{10**30}.ln_1.weight")), ST),
    # pytorch_model.bin
    "bin-empty": (as_raw_bin(b""), BIN),
    "bin-garbage": (as_raw_bin(b"garbage!" * 16), BIN),
    "bin-zip-garbage": (as_raw_bin(b"PK\x03\x04" + b"\0" * 60), BIN),
    "bin-pickle-garbage": (as_raw_bin(b"\x80\x02" + b"\xff" * 60), BIN),
    "bin-truncated": (truncated_bin, BIN),
    "bin-int-keys": (as_bin(lambda: {1: torch.zeros(2)}), BIN),
    "bin-list": (as_bin(lambda: [torch.zeros(2)]), BIN),
    "bin-tensor": (as_bin(lambda: torch.zeros(2)), BIN),
    "bin-string-value": (as_bin(lambda: {WTE: "weights"}), BIN),
    "bin-int64": (as_bin(lambda: {k: v.long() for k, v in hf_state()}), BIN),
    "bin-wrong-shape": (as_bin(lambda: {**dict(hf_state()), WTE: torch.zeros(3)}), BIN),
    "bin-unknown-name": (as_bin(lambda: {**dict(hf_state()), "foo": torch.zeros(3)}), BIN),
    "bin-missing": (as_bin(lambda: {WTE: dict(hf_state())[WTE]}), BIN),
    "bin-pickled-object": (as_bin(lambda: {WTE: datetime.date(2020, 1, 1)}), BIN),
    # shard indexes
    "index-not-json": (index("{not json"), INDEX),
    "index-list": (index("[]"), INDEX),
    "index-no-weight_map": (index("{}"), INDEX),
    "index-weight_map-list": (index('{"weight_map": []}'), INDEX),
    "index-shard-int": (index('{"weight_map": {"a": 5}}'), INDEX),
    "index-shard-path": (index('{"weight_map": {"a": "../model.safetensors"}}'), INDEX),
    "index-missing-shard": (index('{"weight_map": {"a": "model-2.safetensors"}}'), "model-2"),
    "index-nested": (index('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}"), INDEX),
    # config.json
    "config-empty": (raw_file(CONFIG, b""), CONFIG),
    "config-list": (raw_file(CONFIG, b"[]"), CONFIG),
    "config-binary": (raw_file(CONFIG, bytes(range(256))), CONFIG),
    "config-nested": (raw_file(CONFIG, b"[" * DEEP + b"]" * DEEP), CONFIG),
    "config-nested-value": (
        raw_file(CONFIG, b'{"model_type": "gpt2", "n_layer": ' + b"[" * 900 + b"]" * 900 + b"}"),
        CONFIG,
    ),
    "config-5000-digits": (raw_file(CONFIG, b'{"n_layer": 1' + b"0" * 5000 + b"}"), CONFIG),
    "config-dir": (config_dir, CONFIG),
    "config-n_layer-string": (config(n_layer="1"), CONFIG),
    "config-n_layer-true": (config(n_layer=True), CONFIG),
    "config-n_layer-float": (config(n_layer=1.0), CONFIG),
    "config-n_layer-null": (config(n_layer=None), CONFIG),
    "config-n_layer-huge": (config(n_layer=200_000), CONFIG),
    "config-n_layer-negative": (config(n_layer=-1), CONFIG),
    "config-params-huge": (config(n_layer=200, n_embd=16384, n_head=16), CONFIG),
    "config-n_positions-huge": (config(n_positions=10**9), CONFIG),
    "config-vocab-zero": (config(vocab_size=0), CONFIG),
    "config-n_inner-zero": (config(n_inner=0), CONFIG),
    "config-n_inner-string": (config(n_inner="32"), CONFIG),
    "config-eps-nan": (config(layer_norm_epsilon=math.nan), CONFIG),
    "config-eps-inf": (config(layer_norm_epsilon=math.inf), CONFIG),
    "config-eps-negative": (config(layer_norm_epsilon=-1e-5), CONFIG),
    "config-eps-zero": (config(layer_norm_epsilon=0), CONFIG),
    "config-eps-string": (config(layer_norm_epsilon="1e-5"), CONFIG),
    "config-eps-bool": (config(layer_norm_epsilon=True), CONFIG),
    "config-flag-string": (config(scale_attn_weights="false"), CONFIG),
    "config-flag-int": (config(scale_attn_weights=0), CONFIG),
    "config-flag-null": (config(scale_attn_by_inverse_layer_idx=None), CONFIG),
    "config-tie-string": (config(tie_word_embeddings="false"), CONFIG),
    "config-cross-attention-string": (config(add_cross_attention="no"), CONFIG),
    "config-activation-list": (config(activation_function=["gelu"]), CONFIG),
    "config-no-model_type": (config(model_type=_DELETE), CONFIG),
    "config-model_type-list": (config(model_type=["gpt2"]), CONFIG),
    "config-heads-indivisible": (config(n_head=3), CONFIG),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_clear_error_naming_the_file(ckpt, case):
    make, file_name = CASES[case]
    make(ckpt)
    with pytest.raises(GPT2LabError) as err:
        gpt2lab.load(ckpt)
    message = str(err.value)
    assert file_name in message, message
    assert message and "\n" not in message


def test_the_unbroken_checkpoint_loads(ckpt):
    """The baseline the cases above break: it loads, with the weights saved."""
    model = gpt2lab.load(ckpt)
    assert model.cfg == CFG
    assert torch.equal(model.wte.weight, GPT2(CFG).init_weights(seed=0).wte.weight)


def test_valid_variations_still_load(ckpt):
    """What the strict checks must not refuse: extra HF keys, n_inner null, a float32
    .bin, the legacy attention buffers, trailing bytes after the tensor data."""
    config(n_inner=None, some_future_option={"a": [1, 2]}, n_ctx=8)(ckpt)
    with open(ckpt / ST, "ab") as f:
        f.write(b"\0" * 16)
    assert gpt2lab.load(ckpt).cfg == CFG
    (ckpt / ST).unlink()
    state = dict(hf_state())
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    torch.save(state, ckpt / BIN)
    assert gpt2lab.load(ckpt).cfg == CFG


def test_headers_are_checked_against_the_config_before_reading_weights(ckpt, monkeypatch):
    """A header that does not fit config.json is refused before any tensor data is read."""
    import gpt2lab.checkpoint as checkpoint

    tensors(shape_change(WTE, (8, 16)))(ckpt)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(checkpoint, "read_safetensors", no_reading)
    with pytest.raises(GPT2LabError, match="shape"):
        gpt2lab.load(ckpt)


def test_loading_refuses_what_does_not_fit_in_memory(ckpt, monkeypatch):
    """The memory the weights need is compared with what is free before building."""
    import gpt2lab.validate as validate

    monkeypatch.setattr(validate, "UNCHECKED_BYTES", 0)
    monkeypatch.setattr(validate, "available_memory", lambda device=None: 1000)
    with pytest.raises(GPT2LabError, match="would need .* of memory"):
        gpt2lab.load(ckpt)
