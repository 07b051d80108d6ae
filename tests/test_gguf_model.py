"""GPT-2 models as llama.cpp GGUF files (gpt2lab.gguf_io), checked against the `gguf`
package's reader and quantizer, llama.cpp's loader table, transformers, numpy math and,
when a llama.cpp build is found, llama.cpp itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2lab
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.gguf_io import open_gguf, save_gguf

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]

# llama.cpp's GPT-2 loader (src/models/gpt2.cpp, llama_model_gpt2::load_arch_tensors),
# dims in ggml's order (innermost first), copied from its create_tensor calls.
LLAMA_CPP_TOP = {
    "token_embd.weight": ("n_embd", "n_vocab"),
    "position_embd.weight": ("n_embd", "n_ctx_train"),
    "output_norm.weight": ("n_embd",),
    "output_norm.bias": ("n_embd",),
}
LLAMA_CPP_LAYER = {
    "attn_norm.weight": ("n_embd",),
    "attn_norm.bias": ("n_embd",),
    "attn_qkv.weight": ("n_embd", "3*n_embd"),
    "attn_qkv.bias": ("3*n_embd",),
    "attn_output.weight": ("n_embd", "n_embd"),
    "attn_output.bias": ("n_embd",),
    "ffn_norm.weight": ("n_embd",),
    "ffn_norm.bias": ("n_embd",),
    "ffn_down.weight": ("n_ff", "n_embd"),
    "ffn_down.bias": ("n_embd",),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_up.bias": ("n_ff",),
}
# where each GGUF tensor comes from in HF's GPT-2 (convert_hf_to_gguf's tensor map),
# with the transpose the converter applies to Conv1D weights
HF_SOURCE = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}  # fmt: skip
# llama.h's llama_ftype values
FILE_TYPE = {"f32": 0, "bf16": 32, "q8_0": 7}
FILE_QTYPE = {"f32": GT.F32, "bf16": GT.BF16, "q8_0": GT.Q8_0}


def llama_cpp_table(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    sizes = {"n_embd": cfg.d_model, "3*n_embd": 3 * cfg.d_model, "n_ff": cfg.d_mlp,
             "n_vocab": cfg.d_vocab, "n_ctx_train": cfg.n_ctx}  # fmt: skip
    table = {k: tuple(sizes[d] for d in v) for k, v in LLAMA_CPP_TOP.items()}
    for i in range(cfg.n_layers):
        table |= {f"blk.{i}.{k}": tuple(sizes[d] for d in v) for k, v in LLAMA_CPP_LAYER.items()}
    return table


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random-weights GPT-2 made by transformers (2 layers, d_model 64), its folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=50257, initializer_range=0.2
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorm and bias parameters away from their 1 / 0 init
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    """The transformers model through gpt2lab into GGUF files of each dtype."""
    _, path = hf_model
    model = gpt2lab.load(path)
    out = tmp_path_factory.mktemp("gguf")
    return model, {dt: save_gguf(model, out / f"tiny-{dt}.gguf", dt) for dt in FILE_TYPE}


@pytest.fixture(scope="module")
def readers(files):
    """gguf.GGUFReader on each file (2-3 s each: read once)."""
    return {dt: gguf.GGUFReader(str(path)) for dt, path in files[1].items()}


def hf_weights(hf, cfg):
    """{gguf name: float32 numpy array in llama.cpp's layout}, from transformers' tensors."""
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    out = {}
    for name in llama_cpp_table(cfg):
        if name.startswith("blk."):
            _, i, part, kind = name.split(".")
            w = sd[f"transformer.h.{i}.{HF_SOURCE[part]}.{kind}"]
            out[name] = w.T if w.ndim == 2 else w  # Conv1D [in, out] -> [out, in]
        else:
            out[name] = sd[HF_SOURCE[name]]
    return out


# ---- the files, read by the gguf package ---------------------------------------------------
@pytest.mark.parametrize("dtype", list(FILE_TYPE))
def test_layout_is_what_llama_cpp_loads(files, readers, dtype):
    model, paths = files
    cfg = model.cfg
    reader = readers[dtype]
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == 32
    assert field(reader, "gpt2.embedding_length") == 64
    assert field(reader, "gpt2.feed_forward_length") == 256
    assert field(reader, "gpt2.block_count") == 2
    assert field(reader, "gpt2.attention.head_count") == 4
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == np.float32(1e-5)
    assert field(reader, "general.file_type") == FILE_TYPE[dtype]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[262] == "Ġthe"
    assert field(reader, "tokenizer.ggml.token_type")[50256] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.merges")[:2] == ["Ġ t", "Ġ a"]
    assert len(field(reader, "tokenizer.ggml.merges")) == 50000
    assert field(reader, "tokenizer.ggml.bos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    got = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert got == llama_cpp_table(cfg)
    for t in reader.tensors:  # the converter's rule: 1-D and position_embd stay float32
        keep_f32 = len(t.shape) == 1 or t.name == "position_embd.weight"
        assert t.tensor_type == (GT.F32 if keep_f32 else FILE_QTYPE[dtype]), t.name


def test_f32_is_bit_exact(hf_model, files, readers):
    hf, _ = hf_model
    model, paths = files
    want = hf_weights(hf, model.cfg)
    reader = readers["f32"]
    for t in reader.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), want[t.name], err_msg=t.name)
    back = gpt2lab.load(paths["f32"])
    for name, w in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], w), name
    tokens = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    assert "GPT-2's" in back.gguf_tokenizer


def test_logits_match_transformers(hf_model, files):
    hf, _ = hf_model
    _, paths = files
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    back = gpt2lab.load(str(paths["f32"]))
    with torch.no_grad():
        want = hf(tokens).logits
        got = back(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_bf16_is_the_rounded_weights(hf_model, files, readers):
    hf, _ = hf_model
    model, paths = files
    want = hf_weights(hf, model.cfg)
    reader = readers["bf16"]
    for t in reader.tensors:
        w = torch.from_numpy(want[t.name].copy())
        if t.tensor_type == GT.BF16:
            stored = np.asarray(t.data).view(np.int16).reshape(w.shape)
            np.testing.assert_array_equal(stored, w.to(torch.bfloat16).view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(np.asarray(t.data), want[t.name])
    back = gpt2lab.load(paths["bf16"], dtype="auto")
    assert back.wte.weight.dtype == torch.bfloat16
    assert torch.equal(back.wte.weight, model.wte.weight.to(torch.bfloat16))
    exact = gpt2lab.load(paths["bf16"])  # float32, every value the file's exactly
    c_fc = model.blocks[1].mlp.c_fc.weight
    assert torch.equal(exact.blocks[1].mlp.c_fc.weight, c_fc.to(torch.bfloat16).float())
    assert torch.equal(exact.wpe.weight, model.wpe.weight)  # kept in float32


def q8_0_bound(w: np.ndarray) -> np.ndarray:
    """Per weight, how far q8_0 may move it: blocks of 32 along a row, scale d = max|w|/127
    rounded to float16; round(w/d) * f16(d) is within d/2 + 127 |d - f16(d)| of w."""
    blocks = w.astype(np.float64).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float64)
    bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * d  # + float32 arithmetic slack
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


def test_q8_0_within_its_bound(hf_model, files, readers):
    hf, _ = hf_model
    model, paths = files
    want = hf_weights(hf, model.cfg)
    reader = readers["q8_0"]
    back = gpt2lab.load(paths["q8_0"])
    ours = {v: k for k, v in gpt2lab.gguf_io.tensor_names(model.cfg.n_layers).items()}
    n_checked = 0
    for t in reader.tensors:
        got = back.state_dict()[ours[t.name]].numpy()
        if t.tensor_type != GT.Q8_0:
            np.testing.assert_array_equal(got, want[t.name])
            continue
        w = want[t.name]
        err = np.abs(got.astype(np.float64) - w)
        assert (err <= q8_0_bound(w)).all(), t.name
        # the stored scales are f16(max|w| / 127) of each block of 32
        raw = np.asarray(t.data).reshape(-1, 34)
        amax = np.abs(w.reshape(-1, 32)).max(axis=1)
        np.testing.assert_array_equal(raw[:, :2].copy().view(np.float16)[:, 0],
                                      (amax / np.float32(127)).astype(np.float16))  # fmt: skip
        n_checked += 1
    assert n_checked == 1 + 4 * model.cfg.n_layers


def test_q8_0_into_int8(hf_model, files):
    """q8_0 -> Int8Linear: per row, within s_i / 2 of the q8_0 values (the added error),
    and within 1.07 s_i of the original float weights (the docstring's bound)."""
    hf, _ = hf_model
    model, paths = files
    want = hf_weights(hf, model.cfg)
    q8 = gpt2lab.load(paths["q8_0"])  # the q8_0 values, exactly, in float32
    int8 = gpt2lab.load(paths["q8_0"], quantize="int8", dtype="float32")
    for i in range(model.cfg.n_layers):
        for ours, theirs in (("attn.c_attn", "attn_qkv"), ("mlp.c_proj", "ffn_down")):
            lin = int8.blocks[i].get_submodule(ours)
            assert type(lin).__name__ == "Int8Linear"
            w_q8 = q8.blocks[i].get_submodule(ours).weight.detach().double().numpy()
            s = np.abs(w_q8).max(axis=1, keepdims=True) / 127
            w_int8 = lin.q_weight.double().numpy() * lin.scales.double().numpy()[:, None]
            assert (np.abs(w_int8 - w_q8) <= s / 2 * (1 + 1e-6)).all()
            assert (np.abs(w_int8 - want[f"blk.{i}.{theirs}.weight"]) <= 1.07 * s).all()


def test_save_method_and_dispatch(files, tmp_path):
    model, _ = files
    path = tmp_path / "sub" / "m.gguf"  # missing folders are created
    model.save(path, format="gguf", dtype="bf16")
    assert open_gguf(path).fields["general.file_type"] == 32
    renamed = tmp_path / "model.bin"  # any name: the magic bytes decide
    shutil.copy(path, renamed)
    assert gpt2lab.load(renamed).cfg == model.cfg
    with pytest.raises(GPT2LabError, match="format must be"):
        model.save(tmp_path / "x", format="onnx")


# ---- bad input: one line each ---------------------------------------------------------
def hand_written(path: Path, model: GPT2, *, arch="gpt2", drop=(), types=None, reshape=None):
    """A GGUF written with the gguf package directly (no tokenizer keys), from the names
    and dims of llama.cpp's table, with the given faults."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    ours = {v: k for k, v in gpt2lab.gguf_io.tensor_names(cfg.n_layers).items()}
    sd = model.state_dict()
    for name in llama_cpp_table(cfg):
        if name in drop:
            continue
        data = sd[ours[name]].numpy()
        if reshape and name in reshape:
            data = data.reshape(reshape[name])
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hand_written_file_loads(files, tmp_path):
    model, _ = files
    back = gpt2lab.load(hand_written(tmp_path / "h.gguf", model))
    assert "file has none" in back.gguf_tokenizer
    assert torch.equal(back.blocks[0].attn.c_attn.weight, model.blocks[0].attn.c_attn.weight)


def _bad_cases(model, good, tmp):
    data = good.read_bytes()
    (tmp / "short.gguf").write_bytes(data[:3000])
    (tmp / "cut.gguf").write_bytes(data[: len(data) - 100])
    (tmp / "text.gguf").write_text("hello\n")
    (tmp / "empty.gguf").write_bytes(b"")
    return [
        (lambda: gpt2lab.load(tmp / "missing.gguf"), "does not exist"),
        (lambda: gpt2lab.load(tmp / "text.gguf"), "not a GGUF file"),
        (lambda: gpt2lab.load(tmp / "empty.gguf"), "not a GGUF file"),
        (lambda: gpt2lab.load(tmp / "short.gguf"), "truncated or corrupt"),
        (lambda: gpt2lab.load(tmp / "cut.gguf"), "truncated or corrupt.*ends at byte"),
        (lambda: gpt2lab.load(hand_written(tmp / "llama.gguf", model, arch="llama")),
         "'llama' model.*'gpt2' only"),
        (lambda: gpt2lab.load(hand_written(tmp / "q4.gguf", model,
                                           types={"blk.1.ffn_up.weight": GT.Q4_0})),
         "blk.1.ffn_up.weight is Q4_0, which gpt2lab does not read"),
        (lambda: gpt2lab.load(hand_written(tmp / "drop.gguf", model, drop={"blk.0.ffn_up.bias"})),
         "lacks the tensor blk.0.ffn_up.bias"),
        (lambda: gpt2lab.load(hand_written(tmp / "shape.gguf", model,
                                           reshape={"blk.0.attn_qkv.weight": (96, 128)})),
         r"blk.0.attn_qkv.weight has dims \[128, 96\], expected \[64, 192\]"),
        (lambda: save_gguf(model, tmp / "x.gguf", "q4_0"), "unknown GGUF dtype 'q4_0'"),
        (lambda: save_gguf(model, tmp), f"cannot write {tmp}"),  # a folder
        (lambda: gpt2lab.load(good, dtype="int4"), "unknown dtype 'int4'"),
        (lambda: gpt2lab.load(good, quantize="int4"), "unknown quantization 'int4'"),
        (lambda: save_gguf(gpt2lab.load(good, quantize="int8"), tmp / "y.gguf"),
         "from an int8 model"),
    ]  # fmt: skip


def test_bad_input_is_one_line(files, tmp_path):
    model, paths = files
    for call, message in _bad_cases(model, paths["f32"], tmp_path):
        with pytest.raises(GPT2LabError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.tmp"))


def test_convert_cli(files, tmp_path, capsys):
    from gpt2lab.cli import main

    _, paths = files
    out = tmp_path / "c.gguf"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(paths["f32"]), str(out), "--dtype", "q8_0"])
    assert e.value.code == 0
    assert open_gguf(out).fields["general.file_type"] == 7
    with pytest.raises(SystemExit) as e:
        main(["convert", str(out), str(tmp_path / "z.gguf"), "--dtype", "q4_0"])
    assert e.value.code == 1
    assert "unknown --dtype 'q4_0'" in capsys.readouterr().err


# ---- llama.cpp itself ------------------------------------------------------------------
def llama_cpp_bin(tool: str) -> Path | None:
    """A llama.cpp tool from $GPT2LAB_LLAMA_CPP (its build folder or bin/) or the build
    scripts/build_llama_cpp.sh makes (build/llama.cpp/bin)."""
    places = []
    if os.environ.get("GPT2LAB_LLAMA_CPP"):
        base = Path(os.environ["GPT2LAB_LLAMA_CPP"])
        places += [base, base / "bin"]
    places.append(ROOT / "build" / "llama.cpp" / "bin")
    for place in places:
        if (place / tool).is_file():
            return place / tool
    return None


def greedy(model: GPT2, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bundled", "transformers"])
def test_llama_cpp_greedy_matches(which, files, tmp_path):
    simple = llama_cpp_bin("llama-simple")
    if simple is None:
        pytest.skip("no llama.cpp build (scripts/build_llama_cpp.sh, or set GPT2LAB_LLAMA_CPP)")
    model = gpt2lab.load("bundled") if which == "bundled" else files[0]
    path = save_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = "The capital of France is"
    ids = model.tokenizer.encode(prompt)
    want = greedy(model, ids, 20)
    if model.tokenizer.eot_token in want:  # llama-simple stops at the end-of-text token
        want = want[: want.index(model.tokenizer.eot_token)]
    run = subprocess.run([str(simple), "-m", str(path), "-n", "20", prompt],
                         capture_output=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    expected = model.tokenizer.decode_bytes(ids + want)
    assert run.stdout.rstrip(b"\n") == expected
