"""GPT-2 models as GGUF files, both ways: the format llama.cpp (and ollama, LM Studio,
llama-cpp-python) runs.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py, class GPT2Model in
conversion/gpt2.py) and loader (src/models/gpt2.cpp, LLM_ARCH_GPT2), read at the
llama.cpp vendored by llama-cpp-python 0.3.36:

- architecture "gpt2"; keys gpt2.context_length, embedding_length, feed_forward_length,
  block_count, attention.head_count, attention.layer_norm_epsilon, general.file_type.
- tensors token_embd, position_embd, output_norm, and per block blk.N.attn_norm,
  attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down (weight and bias each). The output
  matrix is tied: llama.cpp reuses token_embd when output.weight is absent.
- ggml lists dimensions innermost first, so a weight ggml calls {n_embd, 3*n_embd} is
  numpy's [3*n_embd, n_embd]: nn.Linear's [out, in], which gpt2lab already uses. (The
  converter transposes HF's Conv1D [in, out] to get there; we have nothing to undo.)
- which tensors keep float32 in a bf16 or q8_0 file is the converter's rule: every 1-D
  tensor (biases, norms) and position_embd; the matrices, token_embd included, take the
  file's type. A matrix whose rows are not a multiple of 32 cannot be q8_0 and falls
  back to f16, as in the converter.
- the tokenizer is GPT-2's (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2", the 50257
  byte-level tokens of encoder.json with <|endoftext|> a control token, the 50000 merges
  of vocab.bpe, bos = eos = 50256) and add_bos_token false, which is gpt2lab's default
  (no BOS), so llama.cpp tokenizes a prompt exactly as gpt2lab does.

q8_0 is ggml's block format: blocks of 32 consecutive weights along a row, each stored
as int8 `q = roundf(w / d)` with one float16 scale `d = max|w| / 127`, so a weight comes
back as `q * f16(d)`. That is within `d/2 + 127 |d - f16(d)|` of the original (the
rounding, plus the scale's own float16 rounding, at most 2**-11 relative, which adds at
most 0.062 d). The quantization is the gguf package's, bit-exact with ggml-quants.c.
"""

from __future__ import annotations

import json
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GPT2LabError, first_line

ARCH = "gpt2"
GGUF_MAGIC = b"GGUF"
EOT_ID = 50256
# dtype argument -> (ggml type name, llama.cpp file type name)
SAVE_DTYPES = {
    "f32": ("F32", "ALL_F32"), "float32": ("F32", "ALL_F32"), "fp32": ("F32", "ALL_F32"),
    "bf16": ("BF16", "MOSTLY_BF16"), "bfloat16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}  # fmt: skip
READ_TYPES = ("F32", "F16", "BF16", "Q8_0")  # tensor types load_gguf reads
MATRICES = ("token_embd.weight", "attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
            "ffn_down.weight")  # the tensors that take the file's type  # fmt: skip
TANH_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # what ggml_gelu computes
BLOCK_NAMES = {  # gpt2lab module -> llama.cpp tensor, inside block N
    "ln1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}  # fmt: skip
TOP_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_final.weight": "output_norm.weight",
    "ln_final.bias": "output_norm.bias",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GPT2LabError(
            "GGUF files need the gguf package: pip install 'gpt2lab[gguf]'"
        ) from None
    return gguf


def tensor_names(n_layers: int) -> dict[str, str]:
    """{gpt2lab state_dict name: GGUF tensor name}, in the order llama.cpp's converter
    writes them."""
    names = dict(TOP_NAMES)
    for i in range(n_layers):
        for ours, theirs in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    return names


# ---- the tokenizer -----------------------------------------------------------------------
def gpt2_vocab() -> tuple[list[str], list[str]]:
    """(the 50257 byte-level token strings in id order, the 50000 merges), from the files
    gpt2lab ships (the same ones its Tokenizer is built from)."""
    data = resources.files("gpt2lab") / "data"
    encoder: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for token, i in encoder.items():
        tokens[i] = token
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line]  # the first line is "#version: 0.2"
    return tokens, merges


# ---- writing -----------------------------------------------------------------------------
def _check_savable(model: Any) -> None:
    from .quantize import is_quantized

    cfg = model.cfg
    if is_quantized(model):
        raise GPT2LabError(
            "cannot write a GGUF from an int8 model: load the float model and save it with "
            "dtype='q8_0' (llama.cpp's 8-bit format)"
        )
    if getattr(model, "processing", None) is not None or model.unembed.weight is not None:
        raise GPT2LabError(
            "cannot write a GGUF from a processed model (its unembedding is untied and has a "
            "bias, which llama.cpp's GPT-2 has not); save the original model"
        )
    why = None
    if cfg.act_fn not in TANH_GELU:
        why = f"activation {cfg.act_fn} (llama.cpp's GPT-2 uses the tanh GELU, gelu_new)"
    elif not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        why = "attention scaling other than 1/sqrt(d_head)"
    elif cfg.ln_free:
        why = "LayerNorm-free blocks"
    elif cfg.d_vocab < EOT_ID + 1:
        why = f"a vocabulary of {cfg.d_vocab} tokens, fewer than GPT-2's tokenizer has"
    if why:
        raise GPT2LabError(f"llama.cpp's GPT-2 architecture cannot run a model with {why}")


def _save_type(gguf, name: str, shape: tuple[int, ...], file_type: str):
    """The ggml type a tensor is written in (llama.cpp's converter's rule, module docstring)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[file_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def save_gguf(model: Any, path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write `model` as a GGUF that llama.cpp runs (`llama-cli -m PATH`): dtype "f32",
    "bf16" or "q8_0" for the matrices (see the module docstring). The tensors are
    converted and written one at a time, so the peak memory is the model plus one
    tensor; the file appears atomically (written under PATH.tmp, then renamed)."""
    gguf = _gguf()
    if not isinstance(dtype, str) or dtype.lower() not in SAVE_DTYPES:
        raise GPT2LabError(f"unknown GGUF dtype {dtype!r} (use f32, bf16 or q8_0)")
    type_name, file_type = SAVE_DTYPES[dtype.lower()]
    _check_savable(model)
    cfg = model.cfg
    path = Path(path)
    state = model.state_dict()
    plan = []  # (gguf name, our tensor, ggml type)
    for ours, theirs in tensor_names(cfg.n_layers).items():
        t = state[ours]
        plan.append((theirs, t, _save_type(gguf, theirs, tuple(t.shape), type_name)))

    tokens, merges = gpt2_vocab()
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    types[EOT_ID] = int(gguf.TokenType.CONTROL)
    for i in range(len(tokens), cfg.d_vocab):  # a padded vocabulary, as the converter pads it
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), ARCH)  # opens nothing until write_header_to_file
        try:
            writer.add_name(str(getattr(model, "model_name", None) or "gpt2lab model"))
            writer.add_block_count(cfg.n_layers)
            writer.add_context_length(cfg.n_ctx)
            writer.add_embedding_length(cfg.d_model)
            writer.add_feed_forward_length(cfg.d_mlp)
            writer.add_head_count(cfg.n_heads)
            writer.add_layer_norm_eps(cfg.layer_norm_eps)
            writer.add_file_type(int(gguf.LlamaFileType[file_type]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            writer.add_bos_token_id(EOT_ID)
            writer.add_eos_token_id(EOT_ID)
            writer.add_add_bos_token(False)
            for name, t, qtype in plan:
                shape = tuple(t.shape)
                nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _name, t, qtype in plan:
                data = t.detach().to("cpu", torch.float32).contiguous().numpy()
                writer.write_tensor_data(gguf.quants.quantize(data, qtype))
        finally:
            writer.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GPT2LabError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    return path


# ---- reading -----------------------------------------------------------------------------
# GGUF is read here rather than with gguf.GGUFReader, which builds numpy views for every
# part of every key (2.5 s for a GPT-2 vocabulary's 100k strings); this reads the same
# header in 0.1 s, checks every length and offset against the file, and copies only the
# tensors it loads. The tests check our files with GGUFReader.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Corrupt(Exception):
    """The header runs past the end of the file or holds an impossible value."""


class GGUFFile:
    """A GGUF's keys (`fields`: name -> value) and tensor directory (`tensors`: name ->
    (ggml dims, innermost first; ggml type number; absolute offset; bytes))."""

    def __init__(self, path: Path):
        self.path = path
        self.fields: dict[str, Any] = {}
        self.tensors: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
        with open(path, "rb") as f:
            self._buf = f.read(1 << 16)
            self._f = f
            self._size = os.fstat(f.fileno()).st_size
            self._pos = 4
            try:
                self._parse()
            except (_Corrupt, struct.error, UnicodeDecodeError, OverflowError) as e:
                detail = f" ({e})" if str(e) else ""
                raise GPT2LabError(f"{path} is truncated or corrupt{detail}") from None
        del self._buf, self._f

    # -- low-level reads, refilling the buffer from the file as the header goes on
    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > self._size:
            raise _Corrupt(f"the header runs past the end of the file ({self._size} bytes)")
        while self._pos + n > len(self._buf):
            more = self._f.read(max(1 << 20, n))
            if not more:
                raise _Corrupt("the file ended inside its header")
            self._buf += more
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, kind: int):
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._scalar(10)).decode("utf-8")

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, n = self._scalar(4), self._scalar(10)
            if n > self._size:
                raise _Corrupt(f"an array of {n} items in a {self._size}-byte file")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                return list(struct.unpack(f"<{n}{fmt[1]}", self._take(n * struct.calcsize(fmt))))
            return [self._value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise _Corrupt(f"unknown value type {kind}")
        return self._scalar(kind)

    def _parse(self) -> None:
        version = self._scalar(4)
        if version not in (2, 3):
            raise _Corrupt(f"GGUF version {version}; gpt2lab reads versions 2 and 3")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        if n_tensors > self._size or n_kv > self._size:
            raise _Corrupt(f"{n_tensors} tensors and {n_kv} keys in a {self._size}-byte file")
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if n_dims > 8:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0:
            raise _Corrupt(f"general.alignment is {align!r}")
        start = -(-self._pos // align) * align
        gguf = _gguf()
        for name, dims, kind, offset in infos:
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name} has unknown type {kind}") from None
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if n < 0 or (dims and dims[0] % block):
                raise _Corrupt(f"tensor {name} has dims {list(dims)}, not whole blocks of {block}")
            nbytes = n // block * size
            if start + offset + nbytes > self._size:
                raise _Corrupt(
                    f"tensor {name} ends at byte {start + offset + nbytes}, the file has {self._size}"
                )
            self.tensors[name] = (dims, kind, start + offset, nbytes)

    def type_name(self, name: str) -> str:
        return _gguf().GGMLQuantizationType(self.tensors[name][1]).name

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy's shape of a tensor (ggml's dims reversed)."""
        return tuple(reversed(self.tensors[name][0]))

    def check_type(self, name: str) -> None:
        kind = self.type_name(name)
        if kind not in READ_TYPES:
            raise GPT2LabError(
                f"{self.path}: tensor {name} is {kind}, which gpt2lab does not read "
                f"(it reads {', '.join(t.lower() for t in READ_TYPES)}); convert the model to "
                "q8_0, bf16 or f32"
            )

    def read(self, name: str) -> np.ndarray:
        """A tensor's values, dequantized to float32, in numpy's shape."""
        gguf = _gguf()
        self.check_type(name)
        dims, kind, offset, nbytes = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(kind)
        raw = np.empty(nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(raw) != nbytes:
                raise GPT2LabError(f"{self.path} is truncated (while reading {name})")
        shape = self.shape(name)
        if qtype.name == "F32":
            return raw.view(np.float32).reshape(shape)
        if qtype.name == "F16":
            return raw.view(np.float16).astype(np.float32).reshape(shape)
        rows = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw
        return gguf.quants.dequantize(rows, qtype).reshape(shape)


def open_gguf(path: Path) -> GGUFFile:
    """A GGUF's header, or one line saying why the file is not a readable GGUF."""
    if not path.is_file():
        raise GPT2LabError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GPT2LabError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return GGUFFile(path)


def _key(file: GGUFFile, key: str, default: Any = ...) -> Any:
    if key not in file.fields:
        if default is ...:
            raise GPT2LabError(f"{file.path} lacks the key {key}, which a GPT-2 GGUF has")
        return default
    return file.fields[key]


def _shortest_float(x: float) -> float:
    """A float32 read back as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


def read_config(file: GGUFFile):
    """The GPT2Config a GPT-2 GGUF describes (hyper-parameters from its keys, the
    vocabulary size from token_embd), checked against llama.cpp's requirements."""
    from .config import GPT2Config

    path = file.path
    arch = _key(file, "general.architecture")
    if arch != ARCH:
        raise GPT2LabError(
            f"{path} holds a {arch!r} model; gpt2lab reads GGUFs of architecture 'gpt2' only"
        )

    def key(name: str, default: Any = ...) -> Any:
        return _key(file, f"{ARCH}.{name}", default)

    n_heads = key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_heads)
    if n_kv != n_heads:
        raise GPT2LabError(f"{path}: {n_kv} key/value heads for {n_heads} heads; GPT-2 has no GQA")
    if "token_embd.weight" not in file.tensors:
        raise GPT2LabError(f"{path} lacks the tensor token_embd.weight")
    embd = file.tensors["token_embd.weight"][0]
    eps = key("attention.layer_norm_epsilon")
    try:
        return GPT2Config(
            n_layers=key("block_count"),
            d_model=key("embedding_length"),
            n_heads=n_heads,
            n_ctx=key("context_length"),
            d_vocab=embd[1] if len(embd) == 2 else 0,
            d_mlp=key("feed_forward_length"),
            layer_norm_eps=_shortest_float(eps) if isinstance(eps, float) else eps,
            act_fn="gelu_new",
        )
    except GPT2LabError as e:
        raise GPT2LabError(f"{path}: {e}") from None


def check_tokenizer(file: GGUFFile, d_vocab: int) -> str:
    """Which tokenizer the loaded model uses (returned as a note). gpt2lab has GPT-2's
    only, so a file with another vocabulary is refused rather than read with wrong ids."""
    path = file.path
    kind = _key(file, "tokenizer.ggml.model", None)
    if kind is None:
        return "gpt2lab's GPT-2 tokenizer (the file has none)"
    tokens = _key(file, "tokenizer.ggml.tokens", None)
    merges = _key(file, "tokenizer.ggml.merges", None)
    ours, our_merges = gpt2_vocab()
    if kind != "gpt2" or not isinstance(tokens, list) or tokens[: len(ours)] != ours:
        first = next(
            (i for i, (a, b) in enumerate(zip(tokens or [], ours, strict=False)) if a != b), None
        )
        if kind != "gpt2":
            detail = f"a {kind!r} tokenizer"
        elif first is not None:
            detail = f"token {first} is {tokens[first]!r}, GPT-2's is {ours[first]!r}"
        else:
            detail = f"{len(tokens or [])} tokens, GPT-2 has {len(ours)}"
        raise GPT2LabError(
            f"{path}: its tokenizer is not GPT-2's ({detail}); gpt2lab has GPT-2's only"
        )
    if merges != our_merges:
        raise GPT2LabError(f"{path}: its BPE merges are not GPT-2's; gpt2lab has GPT-2's only")
    types = _key(file, "tokenizer.ggml.token_type", [])
    unused = int(_gguf().TokenType.UNUSED)
    if len(tokens) != d_vocab or any(t != unused for t in types[len(ours) :]):
        raise GPT2LabError(
            f"{path}: {len(tokens)} tokens for an embedding of {d_vocab} rows (tokens beyond "
            "GPT-2's 50257 must be unused padding)"
        )
    return "gpt2lab's GPT-2 tokenizer (the file's vocabulary and merges are GPT-2's)"


def load_gguf(
    path: str | os.PathLike,
    dtype: Any = None,
    quantize: str | None = None,
    *,
    device: Any = None,
    process: bool = False,
):
    """Read a GPT-2 GGUF (llama.cpp's, or one `save_gguf` wrote) into a `gpt2lab.GPT2`.

    Tensors may be f32, f16, bf16 or q8_0 (others, such as q4_0, are refused by name);
    they are dequantized to `dtype`: default float32; "auto" for the file's, bfloat16 for
    a bf16 file and otherwise float32, the narrowest dtype that holds f16 values and
    q8_0's `q * f16(d)` exactly. The tokenizer is gpt2lab's GPT-2 one, used when the
    file's vocabulary and merges are GPT-2's (or the file has none: `model.gguf_tokenizer`
    says which); a file with another vocabulary is refused.

    `quantize="int8"` gives gpt2lab's Int8Linear (per-output-row int8 and one scale, see
    gpt2lab.quantize) computing in `dtype` (default bfloat16). A q8_0 matrix is
    dequantized (exactly, in float32) and requantized per row: with `w'` the values read
    and `s_i = max_j |w'_ij| / 127`, each weight moves by at most `s_i / 2` (the added
    error; the scale is then kept in `dtype`, a gain error of at most 2**-9 relative in
    bfloat16, as for any int8 model). Against the original float weights, whose q8_0
    error is `d/2 + 127 |d - f16(d)|` with a block scale `d <= s_i (1 + 2**-11)`, the
    total stays below `1.07 s_i`: at worst double the `s_i / 2` of quantizing the
    float model per row directly.
    """
    from .checkpoint import parse_device, parse_dtype
    from .model import GPT2
    from .validate import check_memory

    if not isinstance(process, bool):
        raise GPT2LabError(f"process must be True or False, got {process!r}")
    if quantize is not None:
        from .quantize import QUANTIZE_MODES
        from .quantize import quantize as apply_quantization

        if quantize not in QUANTIZE_MODES:
            apply_quantization(None, quantize)  # the one-line error for an unknown mode
        compute = parse_dtype(dtype) or torch.bfloat16
        model = load_gguf(path, torch.float32, device=device, process=process)
        return apply_quantization(model, quantize, compute)

    device = parse_device(device)
    auto = isinstance(dtype, str) and dtype == "auto"
    want = None if auto else (parse_dtype(dtype) or torch.float32)
    path = Path(path).expanduser()
    file = open_gguf(path)
    cfg = read_config(file)
    note = check_tokenizer(file, cfg.d_vocab)
    names = tensor_names(cfg.n_layers)
    if auto:  # the type of the matrices that take the file's type (not position_embd)
        kinds = {file.type_name(n) for n in names.values() if n.endswith(MATRICES)}
        want = torch.bfloat16 if kinds == {"BF16"} else torch.float32

    with torch.device("meta"):
        model = GPT2(cfg)
    expected = {ours: tuple(v.shape) for ours, v in model.state_dict().items()}
    extra = [n for n in file.tensors if n not in names.values() and n != "output.weight"]
    if extra:
        raise GPT2LabError(f"{path} has tensor {extra[0]!r}, which is not part of a GPT-2 model")
    for ours, theirs in names.items():  # everything checked before any weight is read
        if theirs not in file.tensors:
            raise GPT2LabError(f"{path} lacks the tensor {theirs} (a {cfg.n_layers}-layer GPT-2)")
        if file.shape(theirs) != expected[ours]:
            got, want_dims = file.tensors[theirs][0], tuple(reversed(expected[ours]))
            raise GPT2LabError(
                f"{path}: tensor {theirs} has dims {list(got)}, expected {list(want_dims)} "
                "from the file's keys"
            )
        file.check_type(theirs)
    check_memory(
        f"loading {path} ({cfg.n_params:,} parameters, {want.itemsize} bytes each)",
        cfg.n_params * want.itemsize,
        device,
        hint="use a smaller model or dtype, or free some memory",
    )
    state = {
        ours: torch.from_numpy(file.read(theirs)).to(device=device, dtype=want)
        for ours, theirs in names.items()
    }
    if "output.weight" in file.tensors:
        out = file.read("output.weight")
        if out.shape != expected["wte.weight"] or not np.array_equal(
            out, file.read("token_embd.weight")
        ):
            raise GPT2LabError(
                f"{path} has an output matrix distinct from token_embd; gpt2lab's GPT-2 ties them"
            )
    model.load_state_dict(state, assign=True)
    model.gguf_tokenizer = note
    model.model_name = path.stem
    if process:
        from .interp.processing import process_weights

        process_weights(model)
    return model.eval()


def is_gguf(name_or_path: Any) -> bool:
    """Whether `gpt2lab.load` should read this as a GGUF: a name ending in .gguf, or an
    existing file that starts with GGUF's magic bytes."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return False
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        if path.is_file():
            with open(path, "rb") as f:
                return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
    return False
