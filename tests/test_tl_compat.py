"""gpt2lab.tl: a TransformerLens notebook's one-line import change. HookedTransformer
.from_pretrained, utils and patching against transformer-lens 3.9's own from_pretrained,
utils and patching, both loading the same random GPT-2 from a tests-made Hugging Face
cache (offline)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import gpt2lab as gl
from gpt2lab import tl
from gpt2lab.errors import GPT2LabError

TL = pytest.importorskip("transformer_lens", reason="transformer-lens 3.x is the reference")

DATA = Path(gl.__file__).parent / "data"
CLEAN = "John met Mary. John thanked"  # 7 tokens with BOS: patching sweeps stay short
CORRUPTED = "John met Mary. Mary thanked"
SEEDS = {"openai-community/gpt2": 0, "openai-community/gpt2-medium": 1, "distilbert/distilgpt2": 2}


def _save(hub: Path, repo: str, seed: int) -> Path:
    """A small random GPT-2 in the Hub cache's layout (config.json with n_ctx, which
    TransformerLens reads, as the real gpt2 config has)."""
    from conftest import hf_model

    snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "tests"
    hf_model(seed=seed).save_pretrained(snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("tests")
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with gpt2, gpt2-medium and distilgpt2 (under their Hub ids, and gpt2 also
    as "gpt2", the name TransformerLens asks transformers for), offline."""
    home = tmp_path_factory.mktemp("tl_hf_home")
    hub = home / "hub"
    for repo, seed in SEEDS.items():
        _save(hub, repo, seed)
    _save(hub, "gpt2", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield hub


def tl_from_pretrained(hub, tokenizer, no_processing=False, **kw):
    """transformer-lens' own from_pretrained("gpt2"), reading the tests' cache."""
    from transformer_lens import HookedTransformer

    load = HookedTransformer.from_pretrained_no_processing if no_processing else (
        HookedTransformer.from_pretrained
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(
            "gpt2", tokenizer=tokenizer, device="cpu", cache_dir=str(hub), local_files_only=True,
            **kw,
        ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def pair(hub, hf_tokenizer):
    ours = tl.HookedTransformer.from_pretrained("gpt2-small", device="cpu")
    return ours, tl_from_pretrained(hub, hf_tokenizer)


def same(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a.float() - b.float()).abs().max().item() < tol


# ---- from_pretrained -----------------------------------------------------------------
def test_from_pretrained_matches_transformer_lens(pair):
    ours, ref = pair
    assert isinstance(ours, gl.GPT2) and isinstance(ours, tl.HookedTransformer)
    assert not isinstance(ref, tl.HookedTransformer)
    assert ours.cfg.default_prepend_bos is True and ours.default_padding_side == "right"
    assert ours.cfg.model_name == ref.cfg.model_name == "gpt2"
    assert ours.processing == dict.fromkeys(
        ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), True
    )
    texts = ["The quick brown fox", "jumps over the lazy dog, twice"]
    assert torch.equal(ours.to_tokens(texts[1]), ref.to_tokens(texts[1]))  # BOS by default
    assert torch.equal(ours.to_tokens(texts), ref.to_tokens(texts))  # right padding
    tokens = ref.to_tokens(texts[1])
    with torch.no_grad():
        same(
            ours(texts[1]), ref(texts[1])
        )  # processed logits (centred unembed), not just log-probs
        _, ours_cache = ours.run_with_cache(tokens)
        _, ref_cache = ref.run_with_cache(tokens)
    for name in ("blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"):
        same(ours_cache[name], ref_cache[name])
    same(ours.W_U, ref.W_U, 1e-5)
    same(ours.b_U, ref.b_U, 1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        dict(fold_ln=False),
        dict(center_unembed=False, fold_value_biases=False),
        dict(fold_ln=False, center_writing_weights=False, center_unembed=False),
    ],
    ids=["no_fold_ln", "no_center_unembed", "only_value_biases"],
)
def test_processing_flags_match_transformer_lens(hub, hf_tokenizer, flags, capsys):
    ours = tl.HookedTransformer.from_pretrained("gpt2", device="cpu", **flags)
    ref = tl_from_pretrained(hub, hf_tokenizer, **flags)
    assert "Loaded pretrained model gpt2 into HookedTransformer" in capsys.readouterr().out
    tokens = ref.to_tokens("Flags change the weights, not the log-probs")
    with torch.no_grad():
        same(ours(tokens), ref(tokens))


def test_from_pretrained_no_processing(hub, hf_tokenizer):
    ours = tl.HookedTransformer.from_pretrained_no_processing("gpt2", device="cpu")
    ref = tl_from_pretrained(hub, hf_tokenizer, no_processing=True)
    assert getattr(ours, "processing", None) is None
    plain = gl.load("gpt2")
    tokens = ref.to_tokens("Unprocessed weights give the checkpoint's own logits")
    with torch.no_grad():
        same(ours(tokens), ref(tokens))
        same(ours(tokens), plain(tokens), 1e-6)


def test_names_and_aliases(hub):
    """Every TransformerLens name of the GPT-2 family (and the Hub ids) loads that model."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    family = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
    theirs = {alias: name for alias, name in make_model_alias_map().items() if name in family}
    ours = {alias: name for alias, name in tl.ALIASES.items() if "/" not in alias}
    assert ours == theirs

    def first_weight(name):
        model = tl.HookedTransformer.from_pretrained_no_processing(name, device="cpu")
        return model.wte.weight[:3, :3]

    expected = {
        repo: gl.load(repo).wte.weight[:3, :3] for repo in SEEDS
    }  # the three snapshots differ
    for name, repo in [
        ("GPT2-Small", "openai-community/gpt2"),
        ("openai-community/gpt2", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
        ("openai-community/gpt2-medium", "openai-community/gpt2-medium"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("gpt2-xs", "distilbert/distilgpt2"),
        ("distilbert/distilgpt2", "distilbert/distilgpt2"),
    ]:
        assert torch.equal(first_weight(name), expected[repo]), name
    model = tl.HookedTransformer.from_pretrained("distil-gpt2", device="cpu")
    assert model.cfg.model_name == "distilgpt2"


def test_local_folder_hf_model_dtype_and_tokenizer(small_ckpt, hf_small, hf_tokenizer):
    folder = tl.HookedTransformer.from_pretrained(str(small_ckpt), device="cpu")
    assert folder.processing is not None and folder.cfg.default_prepend_bos is True
    expected = gl.load(small_ckpt, process=True)
    from_hf = tl.HookedTransformer.from_pretrained("gpt2", hf_model=hf_small, device="cpu")
    tokens = torch.tensor([[50256, 464, 2068, 7586]])
    with torch.no_grad():
        same(folder(tokens), expected(tokens), 1e-6)
        same(from_hf(tokens), expected(tokens), 1e-6)
    half = tl.HookedTransformer.from_pretrained(
        str(small_ckpt), device="cpu", torch_dtype=torch.bfloat16, tokenizer=hf_tokenizer
    )
    assert half.dtype == torch.bfloat16
    assert tl.HookedTransformer.from_pretrained(str(small_ckpt), dtype="bf16").dtype == (
        torch.bfloat16
    )
    left = tl.HookedTransformer.from_pretrained(
        str(small_ckpt), default_prepend_bos=False, default_padding_side="left"
    )
    assert left.to_tokens("Hi")[0, 0].item() != 50256 and left.default_padding_side == "left"


def test_reexports():
    from gpt2lab.interp import ActivationCache, FactoredMatrix

    assert tl.ActivationCache is ActivationCache and tl.FactoredMatrix is FactoredMatrix
    assert tl.utils.get_act_name is gl.interp.get_act_name


@pytest.mark.parametrize(
    "name, kwargs, says",
    [
        ("pythia-70m", {}, "model_name 'pythia-70m'"),
        ("stanford-gpt2-small-a", {}, "model_name"),
        ("gpt2", {"n_devices": 2}, "n_devices=2"),
        ("gpt2", {"move_to_device": False}, "move_to_device=False"),
        ("gpt2", {"refactor_factored_attn_matrices": True}, "refactor_factored_attn_matrices"),
        ("gpt2", {"checkpoint_index": 3}, "checkpoint_index"),
        ("gpt2", {"checkpoint_value": 1000}, "checkpoint_value"),
        ("gpt2", {"first_n_layers": 1}, "first_n_layers"),
        ("gpt2", {"n_ctx": 64}, "n_ctx"),
        ("gpt2", {"cache_dir": "/tmp", "revision": "main"}, "cache_dir, revision"),
        ("gpt2", {"load_in_8bit": True}, "load_in_8bit"),
        ("gpt2", {"fold_ln": "yes"}, "fold_ln"),
        ("gpt2", {"hf_model": torch.nn.Linear(2, 2)}, "hf_model"),
        ("gpt2", {"tokenizer": object()}, "tokenizer"),
        ("gpt2", {"dtype": "int4"}, "dtype"),
        ("gpt2", {"default_padding_side": "middle"}, "default_padding_side"),
        ("gpt2", {"default_prepend_bos": "yes"}, "default_prepend_bos"),
        (42, {}, "model_name"),
    ],
)
def test_bad_arguments(hub, name, kwargs, says):
    with pytest.raises(GPT2LabError) as e:
        tl.HookedTransformer.from_pretrained(name, device="cpu", **kwargs)
    message = str(e.value)
    assert says in message and "\n" not in message, message


def test_tokenizer_of_another_model_is_refused(hub):
    class Other:  # a character-level tokenizer
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def __len__(self):
            return 256

    with pytest.raises(GPT2LabError, match="tokenizer= must be GPT-2's tokenizer"):
        tl.HookedTransformer.from_pretrained("gpt2", device="cpu", tokenizer=Other())


def test_constructor_is_refused():
    with pytest.raises(GPT2LabError, match="from_pretrained"):
        tl.HookedTransformer(gl.GPT2Config())


# ---- utils ---------------------------------------------------------------------------
def test_get_act_name_table():
    from transformer_lens.utilities import get_act_name as theirs

    ours = tl.utils.get_act_name
    names = [
        "embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
        "q", "k", "v", "z", "result", "pattern", "attn", "attn_scores", "attn_logits",
        "query", "key", "value", "pre", "post", "mlp_pre", "mlp_post",
    ]  # fmt: skip
    cases = [(n,) for n in names] + [(n, 3) for n in names] + [(n, "3") for n in names]
    cases += [
        ("scale",), ("normalized",), ("scale", 4, "ln1"), ("normalized", 2, "ln2"),
        ("scale", 1, "ln2"), ("k", 6, "a"), ("resid_pre", 1, "b"), ("resid_pre", 1, "block"),
        ("post", 2, "m"), ("k6",), ("pre5",), ("z0",), ("v11",), ("scale4ln1",), ("scale0ln2",),
        ("q3a",), ("pattern7",), ("attn2",), ("hook_embed",), ("blocks.0.hook_resid_pre",),
        ("blocks.3.attn.hook_pattern",), ("ln_final.hook_scale",),
    ]  # fmt: skip
    for case in cases:
        assert ours(*case) == theirs(*case), case
    # documented differences: TransformerLens returns names no GPT-2 has
    assert theirs("resid_pre5") == "hook_resid_pre5"
    assert ours("resid_pre5") == "blocks.5.hook_resid_pre"


def test_small_utils():
    import numpy as np
    from transformer_lens import utilities as theirs

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    u = tl.utils
    for kw in ({}, {"per_token": True}, {"attention_mask": mask}):
        same(u.lm_cross_entropy_loss(logits, tokens, **kw),
             theirs.lm_cross_entropy_loss(logits, tokens, **kw), 1e-6)  # fmt: skip
    assert torch.equal(
        u.lm_accuracy(logits, tokens, True), theirs.lm_accuracy(logits, tokens, True)
    )
    same(u.lm_accuracy(logits, tokens), theirs.lm_accuracy(logits, tokens), 1e-7)
    assert u.remove_batch_dim(logits[:1]).shape == (5, 11) and u.remove_batch_dim(logits) is logits
    for x in (torch.ones(2, dtype=torch.bfloat16), [1, 2], 3.0, np.zeros(2)):
        assert np.array_equal(u.to_numpy(x), theirs.to_numpy(x))
    assert u.get_device() == theirs.get_device()
    with pytest.raises(GPT2LabError, match="gpt2lab prepare"):
        u.tokenize_and_concatenate(["text"], None)


def _printed(capsys, fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args, **kwargs)
    return capsys.readouterr().out


def _figures(out: str):
    """(rank, prob %) of each answer line, the top-k token lines, and the ranks line."""
    answers = re.findall(r"Rank: (\d+)\s+Logit: +(-?[\d.]+) Prob: +([\d.]+)% Token: \|(.*)\|", out)
    top = re.findall(r"Top \d+th token\. Logit: +(-?[\d.]+) Prob: +([\d.]+)% Token: \|(.*)\|", out)
    ranks = out.split("Ranks of the answer tokens:")[1].removeprefix("[/b]")
    ranks = re.sub(r"\s+", " ", ranks).replace("( ", "(").strip()  # rich wraps long lines
    return answers, top, ranks


@pytest.mark.parametrize(
    "answer, kw",
    [
        ("Mary", {}),
        (" the store", {"top_k": 3}),
        (["Mary", "John", "them"], {}),
        ("Mary", {"prepend_bos": False}),
    ],
)
def test_test_prompt_matches_transformer_lens(pair, capsys, answer, kw):
    from transformer_lens.utilities import test_prompt as theirs

    ours, ref = pair
    mine = _printed(capsys, tl.utils.test_prompt, CLEAN, answer, ours, **kw)
    their = _printed(capsys, theirs, CLEAN, answer, ref, **kw)
    assert _figures(mine) == _figures(their)
    assert mine.splitlines()[0] == their.splitlines()[0]  # Tokenized prompt: [...]
    quiet = _printed(capsys, tl.utils.test_prompt, CLEAN, answer, ours, print_details=False, **kw)
    assert quiet.startswith("Ranks of the answer tokens:") and len(quiet.splitlines()) == 1


# ---- patching ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patch_setup(pair, one_thread):
    ours, ref = pair
    clean, corrupted = ref.to_tokens(CLEAN), ref.to_tokens(CORRUPTED)
    assert clean.shape == corrupted.shape
    mary, john = ref.to_single_token(" Mary"), ref.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    with torch.no_grad():
        _, ours_cache = ours.run_with_cache(clean)
        _, ref_cache = ref.run_with_cache(clean)
    return (ours, clean, corrupted, ours_cache, metric), (ref, ref_cache)


NAMES = [
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
]


@pytest.mark.parametrize("name", NAMES)
def test_patching_matches_transformer_lens(patch_setup, name):
    import transformer_lens.patching as theirs

    (ours, clean, corrupted, ours_cache, metric), (ref, ref_cache) = patch_setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = getattr(theirs, name)(ref, corrupted, ref_cache, metric)
    got = getattr(tl.patching, name)(ours, corrupted, ours_cache, metric)
    n_layers, n_heads, n_pos = ours.cfg.n_layers, ours.cfg.n_heads, clean.shape[1]
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    assert {n_layers, n_heads, n_pos} >= set(got.shape[-2:])
    assert got.abs().max() > 0.01  # the patches do something
    same(got, expected)


def test_patching_batch(patch_setup):
    (ours, _, corrupted, ours_cache, metric), (ref, ref_cache) = patch_setup
    one = tl.patching.get_act_patch_attn_head_out_by_pos(ours, corrupted, ours_cache, metric)
    batched = tl.patching.get_act_patch_attn_head_out_by_pos(
        ours, corrupted, ours_cache, metric, batch=7
    )
    same(batched, one, 1e-5)


def test_generic_activation_patch(patch_setup):
    import pandas as pd
    import transformer_lens.patching as theirs

    (ours, _, corrupted, ours_cache, metric), (ref, ref_cache) = patch_setup
    index_df = pd.DataFrame([[0, 3, 1], [1, 5, 2], [1, 0, 0]], columns=["layer", "pos", "head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generic_activation_patch(
            ref, corrupted, ref_cache, metric, theirs.layer_pos_head_vector_patch_setter,
            "v", index_df=index_df,
        )  # fmt: skip
        expected_grid, expected_df = theirs.generic_activation_patch(
            ref, corrupted, ref_cache, metric, theirs.layer_head_pattern_patch_setter,
            "attn", index_axis_names=["layer", "head_index"], return_index_df=True,
        )  # fmt: skip
    got = tl.patching.generic_activation_patch(
        ours, corrupted, ours_cache, metric, tl.patching.layer_pos_head_vector_patch_setter,
        "v", index_df=index_df,
    )  # fmt: skip
    got_grid, got_df = tl.patching.generic_activation_patch(
        ours, corrupted, ours_cache, metric, tl.patching.layer_head_pattern_patch_setter,
        "attn", index_axis_names=["layer", "head_index"], return_index_df=True,
    )  # fmt: skip
    same(got, expected)
    same(got_grid, expected_grid)
    assert got_df.equals(expected_df)


def test_patching_bad_inputs(patch_setup):
    (ours, clean, corrupted, ours_cache, metric), _ = patch_setup
    p = tl.patching
    with pytest.raises(GPT2LabError, match="same shape"):
        p.get_act_patch_resid_pre(ours, corrupted[:, :-1], ours_cache, metric)
    _, partial = ours.run_with_cache(clean, names_filter=lambda n: "resid_pre" in n)
    with pytest.raises(GPT2LabError, match="clean_cache has no 'blocks.0.hook_attn_out'"):
        p.get_act_patch_attn_out(ours, corrupted, partial, metric)
    with pytest.raises(GPT2LabError, match="scalar"):
        p.get_act_patch_resid_pre(ours, corrupted, ours_cache, lambda logits: logits[0, -1])
    with pytest.raises(GPT2LabError, match="batch"):
        p.get_act_patch_resid_pre(ours, corrupted, ours_cache, metric, batch=0)
    with pytest.raises(GPT2LabError, match="corrupted_tokens"):
        p.get_act_patch_resid_pre(ours, [1, 2, 3], ours_cache, metric)
