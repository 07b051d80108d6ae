"""Checkpoint I/O: parity with transformers in both directions, every supported file layout,
the HF hub cache, dtypes, bad input, and the config translation."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gpt2lab
from gpt2lab import GPT2Config, GPT2LabError
from gpt2lab.checkpoint import hub_cache_dir

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


# ---- helpers / shared fixtures ---------------------------------------------------------
@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 50257, (2, 24), generator=gen)


@pytest.fixture(scope="module")
def hf_logits(hf_small, tokens):
    with torch.no_grad():
        return hf_small(tokens).logits


@pytest.fixture(scope="module")
def ours(small_ckpt):
    return gpt2lab.load(small_ckpt)


def logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def rewrite_safetensors(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint, passing its tensors dict through `edit` on the way."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def load_error(path, **kwargs) -> str:
    with pytest.raises(GPT2LabError) as excinfo:
        gpt2lab.load(path, **kwargs)
    return str(excinfo.value)


def test_our_logits_match_transformers(ours, tokens, hf_logits):
    # The baseline every other parity test relies on; the logits must be non-trivial.
    assert hf_logits.std() > 0.1
    assert max_diff(logits_of(ours, tokens), hf_logits) < 1e-4


# ---- 1. our save -> transformers ------------------------------------------------------
def test_save_loads_in_transformers_with_same_logits(ours, tokens, hf_logits, tmp_path):
    ours.save(tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert set(info["missing_keys"]) - {"lm_head.weight"} == set()
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    hf.eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert max_diff(theirs, logits_of(ours, tokens)) < 1e-5
    assert max_diff(theirs, hf_logits) < 1e-4
    # and back again: our reload of our own file is bit-exact
    again = gpt2lab.load(tmp_path)
    for (n1, p1), (n2, p2) in zip(
        ours.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_save_bf16_keeps_dtype_in_file(ours, tokens, tmp_path):
    model = copy.deepcopy(ours).to(torch.bfloat16)
    assert ours.dtype == torch.float32
    model.save(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    back = gpt2lab.load(tmp_path, dtype="auto")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    for p1, p2 in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(p1, p2)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(hf.transformer.wte.weight, model.wte.weight)
    assert torch.equal(hf.transformer.h[1].mlp.c_fc.weight, model.blocks[1].mlp.c_fc.weight.T)


# ---- 2. transformers' save -> our load ------------------------------------------------
def hf_state_dict_for_bin(hf, *, prefix: bool, legacy_buffers: bool) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    n_pos, n_layer = hf.config.n_positions, hf.config.n_layer
    if legacy_buffers:  # what transformers < 4.31 wrote into every GPT-2 .bin
        for i in range(n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(
                torch.ones(n_pos, n_pos, dtype=torch.bool)
            ).view(1, 1, n_pos, n_pos)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not prefix:  # the original openai-community/gpt2 .bin has no "transformer." prefix
        sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    return sd


def test_load_safetensors_from_transformers(small_ckpt, tokens, hf_logits):
    assert (small_ckpt / "model.safetensors").is_file()
    model = gpt2lab.load(small_ckpt)
    assert model.dtype == torch.float32
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


@pytest.mark.parametrize(
    "prefix,legacy_buffers,zipfile",
    [(True, True, True), (False, True, True), (True, False, True), (False, True, False)],
    ids=["prefix-legacy", "noprefix-legacy", "prefix-clean", "noprefix-legacy-oldformat"],
)
def test_load_pytorch_model_bin(
    hf_small, small_ckpt, tokens, hf_logits, tmp_path, prefix, legacy_buffers, zipfile
):
    sd = hf_state_dict_for_bin(hf_small, prefix=prefix, legacy_buffers=legacy_buffers)
    assert any(k.startswith("transformer.") for k in sd) == prefix
    assert any(k.endswith(".attn.bias") for k in sd) == legacy_buffers
    shutil.copy(small_ckpt / "config.json", tmp_path / "config.json")
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    model = gpt2lab.load(tmp_path)
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


def test_load_sharded_safetensors(hf_small, tokens, hf_logits, tmp_path):
    hf_small.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    model = gpt2lab.load(tmp_path)
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


def test_load_sharded_bin(hf_small, small_ckpt, tokens, hf_logits, tmp_path):
    sd = hf_state_dict_for_bin(hf_small, prefix=True, legacy_buffers=True)
    names = list(sd)
    parts = [names[: len(names) // 3], names[len(names) // 3 : 2 * len(names) // 3]]
    parts.append(names[2 * len(names) // 3 :])
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    shutil.copy(small_ckpt / "config.json", tmp_path / "config.json")
    model = gpt2lab.load(tmp_path)
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


def test_sharded_index_naming_a_missing_shard(hf_small, tmp_path):
    hf_small.save_pretrained(tmp_path, max_shard_size="200KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    msg = load_error(tmp_path)
    assert victim.name in msg and "missing" in msg


# ---- 3. the HF hub cache ---------------------------------------------------------------
def make_hub_repo(cache: Path, repo_id: str, src: Path, *, blobs: bool) -> Path:
    """Lay out `src` as huggingface_hub does: refs/main -> snapshots/<hash>/ (symlinks to
    blobs/ when `blobs`, plain files otherwise)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    for name in ("config.json", "model.safetensors"):
        if blobs:
            (repo / "blobs").mkdir(exist_ok=True)
            blob = repo / "blobs" / f"blob-{name}"
            shutil.copy(src / name, blob)
            (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
        else:
            shutil.copy(src / name, snapshot / name)
    return snapshot


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return home


@pytest.mark.parametrize("blobs", [False, True], ids=["files", "blob-symlinks"])
def test_load_preset_from_hf_home_cache(offline_env, small_ckpt, tokens, hf_logits, blobs):
    make_hub_repo(offline_env / "hub", "openai-community/gpt2", small_ckpt, blobs=blobs)
    assert hub_cache_dir() == offline_env / "hub"
    model = gpt2lab.load("gpt2")
    assert model.cfg.n_layers == 2  # the small model from the cache, not real gpt2
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


def test_load_preset_from_hf_hub_cache(offline_env, monkeypatch, small_ckpt, tokens, hf_logits):
    cache = offline_env.parent / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # a decoy under HF_HOME that must not be used: different weights
    decoy = offline_env.parent / "decoy"
    hf_model(seed=7).save_pretrained(decoy)
    make_hub_repo(offline_env / "hub", "openai-community/gpt2", decoy, blobs=False)
    make_hub_repo(cache, "openai-community/gpt2", small_ckpt, blobs=False)
    assert hub_cache_dir() == cache
    model = gpt2lab.load("gpt2")
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


@pytest.mark.parametrize("var", ["HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"])
def test_load_preset_from_other_cache_locations(
    offline_env, monkeypatch, small_ckpt, tokens, hf_logits, var
):
    # what huggingface_hub also honours: the legacy cache variable, and XDG without HF_HOME
    monkeypatch.delenv("HF_HOME")
    root = offline_env.parent / "other"
    monkeypatch.setenv(var, str(root))
    cache = root / "huggingface" / "hub" if var == "XDG_CACHE_HOME" else root
    make_hub_repo(cache, "openai-community/gpt2", small_ckpt, blobs=False)
    assert hub_cache_dir() == cache
    model = gpt2lab.load("gpt2")
    assert max_diff(logits_of(model, tokens), hf_logits) < 1e-4


def test_preset_missing_offline_says_what_to_fetch(offline_env, small_ckpt):
    # another preset is cached; the one asked for is not
    make_hub_repo(offline_env / "hub", "openai-community/gpt2", small_ckpt, blobs=False)
    msg = load_error("gpt2-medium")
    assert "gpt2-medium" in msg
    assert "config.json" in msg and "model.safetensors" in msg
    assert str(offline_env / "hub") in msg


# ---- 4. dtype -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bfloat16", "bf16"])
def test_load_bf16(small_ckpt, ours, tokens, hf_logits, name):
    model = gpt2lab.load(small_ckpt, dtype=name)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (n, p), q in zip(model.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16)), n
    logits = logits_of(model, tokens)
    assert max_diff(logits, hf_logits) < 0.1 * hf_logits.abs().max().item()


def test_load_float16_and_auto(small_ckpt):
    assert gpt2lab.load(small_ckpt, dtype="float16").dtype == torch.float16
    assert gpt2lab.load(small_ckpt, dtype=torch.float16).dtype == torch.float16
    assert gpt2lab.load(small_ckpt, dtype="auto").dtype == torch.float32  # as stored


@pytest.mark.parametrize("bad", ["nonsense", "float8", "int8"])
def test_bad_dtype(small_ckpt, bad):
    msg = load_error(small_ckpt, dtype=bad)
    assert bad in msg and "dtype" in msg


# ---- devices --------------------------------------------------------------------------
def test_every_device_type_torch_knows_is_accepted_where_present(monkeypatch):
    """Only what torch.device() rejects is an unknown device: xpu (or any other backend)
    loads where this machine has it; here, where none is, it is faked."""
    from gpt2lab import checkpoint

    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint, "_probe", lambda device: None)
    assert checkpoint.parse_device("xpu") == torch.device("xpu")
    assert checkpoint.parse_device("xpu:1") == torch.device("xpu", 1)
    assert checkpoint.parse_device(torch.device("xpu")) == torch.device("xpu")
    assert checkpoint.parse_device("hpu") == torch.device("hpu")
    assert checkpoint.parse_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checkpoint.parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(GPT2LabError, match="cuda:2 was requested but there are 2 CUDA GPUs"):
        checkpoint.parse_device("cuda:2")


@pytest.mark.skipif(torch.xpu.is_available(), reason="this machine has an XPU")
@pytest.mark.parametrize(
    "device, words",
    [
        ("tpu:9", "unknown device 'tpu:9'"),
        ("nonsense", "unknown device"),
        ("", "unknown device"),
        (1.5, "unknown device"),
        ("meta", "holds no weights"),
        ("xpu", "no Intel GPU (XPU) is available"),
        ("xla", "device xla was requested but this PyTorch cannot use it"),
        ("hpu", "device hpu was requested but this PyTorch cannot use it"),
        ("lazy", "device lazy was requested but this PyTorch cannot use it"),
    ],
)
def test_devices_that_cannot_be_used_are_clear_errors(small_ckpt, device, words):
    msg = load_error(small_ckpt, device=device)
    assert words in msg and "\n" not in msg


# ---- 5. bad input -----------------------------------------------------------------------
def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert "nope" in msg and "does not exist" in msg


def test_directory_without_config(small_ckpt, tmp_path):
    shutil.copy(small_ckpt / "model.safetensors", tmp_path / "model.safetensors")
    msg = load_error(tmp_path)
    assert "config.json" in msg and str(tmp_path) in msg


def test_directory_without_weights(small_ckpt, tmp_path):
    shutil.copy(small_ckpt / "config.json", tmp_path / "config.json")
    msg = load_error(tmp_path)
    assert "no weights" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(small_ckpt, tmp_path, keep):
    path = copy_ckpt(small_ckpt, tmp_path) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    msg = load_error(tmp_path)
    assert "truncated" in msg and "model.safetensors" in msg


@pytest.mark.parametrize(
    "content",
    [
        (16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64,
        (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc" + b"\0" * 64,
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16,  # some other file's bytes
    ],
    ids=["bad-json", "bad-utf8", "png"],
)
def test_garbage_safetensors_header(small_ckpt, tmp_path, content):
    path = copy_ckpt(small_ckpt, tmp_path) / "model.safetensors"
    path.write_bytes(content)
    msg = load_error(tmp_path)
    assert "model.safetensors" in msg
    assert "corrupt" in msg


def test_tensor_of_wrong_shape(small_ckpt, tmp_path):
    name = "transformer.h.0.mlp.c_fc.weight"

    def edit(t):
        assert tuple(t[name].shape) == (64, 256)
        t[name] = torch.zeros(64, 128)

    rewrite_safetensors(small_ckpt, tmp_path, edit)
    msg = load_error(tmp_path)
    assert name in msg
    assert "(64, 128)" in msg and "(64, 256)" in msg
    assert msg.index("(64, 128)") < msg.index("(64, 256)")  # "has ..., expected ..."


def test_missing_tensor(small_ckpt, tmp_path):
    rewrite_safetensors(small_ckpt, tmp_path, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    msg = load_error(tmp_path)
    assert "missing" in msg
    assert "h.1.ln_2.bias" in msg or "blocks.1.ln2.bias" in msg


def test_unknown_extra_tensor(small_ckpt, tmp_path):
    rewrite_safetensors(small_ckpt, tmp_path, lambda t: t.update({"score.weight": torch.ones(2)}))
    msg = load_error(tmp_path)
    assert "score.weight" in msg


def test_tensor_for_a_layer_the_config_lacks(small_ckpt, tmp_path):
    rewrite_safetensors(small_ckpt, tmp_path, lambda t: t.update({"transformer.h.5.ln_1.bias": torch.ones(64)}))  # fmt: skip
    msg = load_error(tmp_path)
    assert "transformer.h.5.ln_1.bias" in msg and "2 layers" in msg


def test_config_of_another_architecture(small_ckpt, tmp_path):
    copy_ckpt(small_ckpt, tmp_path)
    edit_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    msg = load_error(tmp_path)
    assert "llama" in msg and "model_type" in msg


def test_unsupported_activation(small_ckpt, tmp_path):
    copy_ckpt(small_ckpt, tmp_path)
    edit_config(tmp_path, activation_function="tanh")
    msg = load_error(tmp_path)
    assert "'tanh'" in msg and "not supported" in msg


def test_config_json_not_json(small_ckpt, tmp_path):
    copy_ckpt(small_ckpt, tmp_path)
    (tmp_path / "config.json").write_text("{'n_layer': 2,")
    msg = load_error(tmp_path)
    assert "config.json" in msg and "JSON" in msg


class RunsCode:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_bin_that_would_run_code_is_refused(small_ckpt, hf_small, tmp_path, writer):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(small_ckpt / "config.json", ckpt / "config.json")
    marker = tmp_path / "PWNED"
    state = {k: v for k, v in hf_small.state_dict().items()}
    state["transformer.wte.weight"] = RunsCode(marker)
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        if writer == "pickle":
            pickle.dump(state, f, protocol=2)
        else:
            torch.save(state, f)
    msg = load_error(ckpt)
    assert "pytorch_model.bin" in msg and "refusing" in msg
    assert not marker.exists()
    # the payload is live: unpickling it without weights_only really runs the command
    live = tmp_path / "LIVE"
    pickle.loads(pickle.dumps(RunsCode(live)))
    assert live.exists()


def test_bin_that_is_not_a_state_dict(small_ckpt, tmp_path):
    shutil.copy(small_ckpt / "config.json", tmp_path / "config.json")
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    assert "state dict" in load_error(tmp_path)


def test_truncated_bin(hf_small, small_ckpt, tmp_path):
    shutil.copy(small_ckpt / "config.json", tmp_path / "config.json")
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf_small.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = load_error(tmp_path)
    assert "pytorch_model.bin" in msg and ("truncated" in msg or "corrupt" in msg)


# ---- 6. config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"scale_attn_by_inverse_layer_idx": True},
        {"scale_attn_weights": False},
        {"activation_function": "relu"},
        {"activation_function": "gelu"},
        {"reorder_and_upcast_attn": True},
        {"n_inner": 96, "layer_norm_epsilon": 1e-3},
        {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_config_options_keep_parity(tmp_path, tokens, overrides):
    hf = hf_model(seed=3, **overrides)
    for key, value in overrides.items():
        assert getattr(hf.config, key) == value
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = hf(tokens).logits
    model = gpt2lab.load(tmp_path)
    assert max_diff(logits_of(model, tokens), theirs) < 1e-4
    if overrides != {"reorder_and_upcast_attn": True}:  # that one only changes precision
        # the option matters for this model: the same weights without it give other logits
        plain = hf_model(seed=3, **{k: v for k, v in overrides.items() if k == "n_inner"})
        with torch.no_grad():
            assert max_diff(plain(tokens).logits, theirs) > 1e-3


PRESET_DIMS = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


def hf_param_count(n_layer: int, n_embd: int, n_head: int) -> int:
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        )
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, so counted once below
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", list(PRESET_DIMS))
def test_presets(name):
    cfg = GPT2Config.preset(name)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == PRESET_DIMS[name]
    assert cfg.n_ctx == 1024 and cfg.d_vocab == 50257
    assert cfg.d_mlp == 4 * cfg.d_model and cfg.act_fn == "gelu_new"
    assert cfg.n_params == hf_param_count(*PRESET_DIMS[name])


def test_known_parameter_counts():
    # the published sizes, independently of transformers
    assert GPT2Config.preset("gpt2").n_params == 124_439_808
    assert GPT2Config.preset("gpt2-xl").n_params == 1_557_611_200


def test_unknown_preset():
    with pytest.raises(GPT2LabError, match="gpt3"):
        GPT2Config.preset("gpt3")


@pytest.mark.parametrize(
    "cfg",
    [
        GPT2Config.preset("gpt2"),
        GPT2Config.preset("gpt2-xl"),
        GPT2Config(
            n_layers=3,
            d_model=96,
            n_heads=6,
            n_ctx=77,
            d_vocab=1000,
            d_mlp=200,
            act_fn="relu",
            layer_norm_eps=1e-6,
            scale_attn_weights=False,
            scale_attn_by_inverse_layer_idx=True,
            ln_free=True,
        ),
    ],
    ids=["gpt2", "gpt2-xl", "custom"],
)
def test_to_hf_from_hf_round_trip(cfg):
    hf = cfg.to_hf()
    back = GPT2Config.from_hf(json.loads(json.dumps(hf)))
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    # transformers reads the same sizes from it
    theirs = transformers.GPT2Config.from_dict(hf)
    assert (theirs.n_layer, theirs.n_embd, theirs.n_head) == (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
    )
    assert (theirs.n_positions, theirs.vocab_size) == (cfg.n_ctx, cfg.d_vocab)
    assert (theirs.n_inner or 4 * theirs.n_embd) == cfg.d_mlp
    assert theirs.activation_function == cfg.act_fn
    assert theirs.scale_attn_weights == cfg.scale_attn_weights
    assert theirs.scale_attn_by_inverse_layer_idx == cfg.scale_attn_by_inverse_layer_idx


def test_from_hf_of_transformers_config():
    theirs = transformers.GPT2Config(
        n_layer=3, n_embd=48, n_head=3, n_positions=64, vocab_size=500, n_inner=100
    )
    cfg = GPT2Config.from_hf(theirs.to_dict())
    sizes = dict(n_layers=3, d_model=48, n_heads=3, n_ctx=64, d_vocab=500, d_mlp=100)
    assert {k: getattr(cfg, k) for k in sizes} == sizes


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"n_embd": 65}, "divisible"),
        ({"n_layer": "two"}, "n_layers"),
        ({"n_layer": 0}, "n_layers"),
        ({"n_layer": True}, "n_layers"),
        ({"n_layer": 2.0}, "n_layers"),
        ({"n_layer": 200_000}, "n_layers"),
        ({"n_embd": 8192, "n_head": 64, "n_layer": 1000}, "parameters"),
        ({"layer_norm_epsilon": float("nan")}, "layer_norm_eps"),
        ({"layer_norm_epsilon": -1e-5}, "layer_norm_eps"),
        ({"layer_norm_epsilon": float("inf")}, "layer_norm_eps"),
        ({"layer_norm_epsilon": "1e-5"}, "layer_norm_eps"),
        ({"scale_attn_weights": "false"}, "scale_attn_weights"),
        ({"scale_attn_by_inverse_layer_idx": 1}, "scale_attn_by_inverse_layer_idx"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
        ({"add_cross_attention": "false"}, "add_cross_attention"),
        ({"n_inner": 0}, "n_inner"),
    ],
)
def test_from_hf_refuses(changes, words):
    hf = {**GPT2Config.preset("tiny").to_hf(), **changes}
    with pytest.raises(GPT2LabError, match=words):
        GPT2Config.from_hf(hf)
