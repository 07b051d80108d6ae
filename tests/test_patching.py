"""Activation patching against transformer-lens' `patching` module, path patching against
closed-form direct effects computed from transformer-lens caches, and the `gpt2lab patch`
command. All on 2-layer random checkpoints made by transformers (d_model 64, 4 heads);
the library tests use a 1000-token vocabulary so that their hundreds of forward passes
stay cheap, the CLI tests the full GPT-2 vocabulary (they tokenize text)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import hf_model
from tl_reference import hooked_transformer
from transformer_lens import patching as tlp

import gpt2lab
from gpt2lab.cli import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.interp.patching import (
    activation_patch,
    logit_diff,
    normalized_logit_diff,
)
from gpt2lab.interp.path_patching import path_patch, path_patch_heads

CLEAN = "Mary met John. John thanked"
CORRUPTED = "Mary met John. Mary thanked"
VOCAB = 1000


@pytest.fixture(scope="module")
def hf_tiny_vocab():
    return hf_model(seed=1, vocab_size=VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(hf_tiny_vocab, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vocab")
    hf_tiny_vocab.save_pretrained(path)
    return gpt2lab.load(path)


@pytest.fixture(scope="module")
def tl(model):
    return hooked_transformer(model)


@pytest.fixture(scope="module")
def pair(hf_tiny_vocab):
    """Two clean prompts of 5 tokens, corrupted at positions 1 and 3, and answer / wrong
    tokens chosen from the transformers model's own top predictions, so that the clean
    and corrupted logit differences are far apart."""
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, VOCAB, (2, 5), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, VOCAB, (2,), generator=g)
    corrupted[:, 3] = torch.randint(0, VOCAB, (2,), generator=g)
    with torch.no_grad():
        answer = hf_tiny_vocab(clean).logits[:, -1].argmax(-1)
        wrong = hf_tiny_vocab(corrupted).logits[:, -1].argmax(-1)
    return clean, corrupted, answer, wrong


@pytest.fixture(scope="module")
def metric(model, pair):
    clean, corrupted, answer, wrong = pair
    return normalized_logit_diff(model, clean, corrupted, answer, wrong)


@pytest.fixture(scope="module")
def tl_caches(tl, pair):
    clean, corrupted, _, _ = pair
    with torch.no_grad():
        return tl.run_with_cache(clean)[1], tl.run_with_cache(corrupted)[1]


# ---- the metric ---------------------------------------------------------------------
def test_normalised_metric_is_0_corrupted_1_clean(model, hf_tiny_vocab, pair, metric):
    clean, corrupted, answer, wrong = pair
    with torch.no_grad():
        clean_logits, corr_logits = hf_tiny_vocab(clean).logits, hf_tiny_vocab(corrupted).logits
    rows = torch.arange(2)

    def ld(logits):
        return (logits[rows, -1, answer] - logits[rows, -1, wrong]).mean().item()

    assert metric.clean == pytest.approx(ld(clean_logits), abs=1e-4)
    assert metric.corrupted == pytest.approx(ld(corr_logits), abs=1e-4)
    assert abs(metric.clean - metric.corrupted) > 1.0  # the test pair separates well
    assert float(metric(clean_logits)) == pytest.approx(1.0, abs=1e-4)
    assert float(metric(corr_logits)) == pytest.approx(0.0, abs=1e-4)
    assert float(logit_diff(clean_logits, answer, wrong)) == pytest.approx(metric.clean, abs=1e-4)


# ---- activation patching vs transformer-lens ----------------------------------------
CASES = {
    "resid_pre": ("resid_pre", None, tlp.get_act_patch_resid_pre),
    "resid_mid": ("resid_mid", None, tlp.get_act_patch_resid_mid),
    "attn_out": ("attn_out", None, tlp.get_act_patch_attn_out),
    "mlp_out": ("mlp_out", None, tlp.get_act_patch_mlp_out),
    "head_out_all_pos": ("z", False, tlp.get_act_patch_attn_head_out_all_pos),
    "head_out_by_pos": ("heads", True, tlp.get_act_patch_attn_head_out_by_pos),
    "q_all_pos": ("q", False, tlp.get_act_patch_attn_head_q_all_pos),
    "k_all_pos": ("k", False, tlp.get_act_patch_attn_head_k_all_pos),
    "v_all_pos": ("v", False, tlp.get_act_patch_attn_head_v_all_pos),
    "k_by_pos": ("k", True, tlp.get_act_patch_attn_head_k_by_pos),  # q, v by pos: same code
    "pattern_all_pos": ("pattern", False, tlp.get_act_patch_attn_head_pattern_all_pos),
    "pattern_by_pos": ("pattern", True, tlp.get_act_patch_attn_head_pattern_by_pos),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activation_patching_matches_transformer_lens(case, model, tl, pair, metric, tl_caches):
    what, by_pos, tl_fn = CASES[case]
    clean, corrupted, _, _ = pair
    batch = 8 if by_pos else 1  # batched patches must give the same numbers
    ours = activation_patch(
        model, clean, corrupted, metric, what=what, by_pos=by_pos, batch=batch, progress=False
    )
    with torch.no_grad():
        ref = tl_fn(tl, corrupted, tl_caches[0], metric)
    assert ours.values.shape == ref.shape
    assert len(ours.dims) == ref.dim()
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-4, rtol=0)
    assert ref.abs().max() > 0.05  # the patches do move the metric


def test_patching_all_of_resid_pre_at_layer_0_restores_the_clean_run(model, pair, metric):
    clean, corrupted, _, _ = pair
    whole = activation_patch(
        model, clean, corrupted, metric, what="resid_pre", by_pos=False, progress=False
    )
    assert whole.dims == ("layer",)
    assert whole.values[0].item() == 1.0  # the whole input is the clean one: exactly clean
    by_pos = activation_patch(model, clean, corrupted, metric, what="resid_pre", progress=False)
    # at layer 0 only the corrupted positions (1 and 3) carry a difference
    unchanged = [0, 2, 4]
    assert torch.equal(by_pos.values[0, unchanged], torch.zeros(3))


@pytest.mark.parametrize("what", ["resid_pre", "attn_out", "mlp_out", "z", "v", "pattern"])
def test_patching_corrupted_activations_into_the_corrupted_run_changes_nothing(
    what, model, pair, metric
):
    _, corrupted, _, _ = pair
    result = activation_patch(model, corrupted, corrupted, metric, what=what, progress=False)
    torch.testing.assert_close(result.values, torch.zeros_like(result.values), atol=1e-5, rtol=0)


def test_result_labels_and_table(model, pair, metric):
    clean, corrupted, _, _ = pair
    result = activation_patch(model, clean, corrupted, metric, what="attn_out", progress=False)
    assert result.dims == ("layer", "pos")
    decoded = [model.tokenizer.decode([t]) for t in clean[0].tolist()]
    assert result.labels["pos"] == [
        f"{p} {tok!r}" + ("*" if p in (1, 3) else "") for p, tok in enumerate(decoded)
    ]
    lines = result.to_text(digits=3).splitlines()
    rows = [line.split() for line in lines if line.startswith("L")]
    assert [r[0] for r in rows] == ["L0", "L1"]
    printed = torch.tensor([[float(x) for x in r[1:]] for r in rows])
    torch.testing.assert_close(printed, result.values, atol=6e-4, rtol=0)


# ---- user errors ---------------------------------------------------------------------
def test_patching_errors_are_gpt2lab_errors(model, pair, metric):
    clean, corrupted, answer, wrong = pair
    with pytest.raises(GPT2LabError, match="same number of tokens"):
        activation_patch(model, clean, corrupted[:, :4], metric, progress=False)
    with pytest.raises(GPT2LabError, match="same number of prompts"):
        activation_patch(model, clean, corrupted[:1], metric, progress=False)
    with pytest.raises(GPT2LabError, match="unknown activation 'mlp_in'"):
        activation_patch(model, clean, corrupted, metric, what="mlp_in", progress=False)
    with pytest.raises(GPT2LabError, match="must return a scalar"):
        activation_patch(model, clean, corrupted, lambda logits: logits[:, -1, 0], progress=False)
    with pytest.raises(GPT2LabError, match="4 tokens, not one"):
        normalized_logit_diff(model, clean, corrupted, " tok tok", wrong)
    with pytest.raises(GPT2LabError, match="outside the vocabulary"):
        normalized_logit_diff(model, clean, corrupted, " Megan", wrong)
    with pytest.raises(GPT2LabError, match="did you mean ' Megan', with a leading space"):
        normalized_logit_diff(model, clean, corrupted, "Megan", wrong)
    with pytest.raises(GPT2LabError, match="same logit difference"):
        normalized_logit_diff(model, clean, clean, answer, wrong)


# ---- path patching -------------------------------------------------------------------
def direct_effect_metric(tl, metric, clean_cache, corr_cache, layer, head):
    """Closed form of sender head -> final residual stream: add the head's output change
    (corrupted - clean, through W_O) to the clean final residual, then the final
    LayerNorm and the unembedding."""
    delta = (corr_cache["z", layer][:, :, head] - clean_cache["z", layer][:, :, head]) @ tl.W_O[
        layer, head
    ]
    resid = clean_cache["resid_post", tl.cfg.n_layers - 1] + delta
    return float(metric(tl.unembed(tl.ln_final(resid))))


def test_path_patching_heads_to_logits_equals_the_direct_effect(model, tl, pair, metric, tl_caches):
    clean, corrupted, _, _ = pair
    result = path_patch_heads(model, clean, corrupted, metric, "final", batch=3, progress=False)
    assert result.dims == ("layer", "head")
    with torch.no_grad():
        expected = torch.tensor(
            [
                [direct_effect_metric(tl, metric, *tl_caches, layer, head) for head in range(4)]
                for layer in range(2)
            ]
        )
    torch.testing.assert_close(result.values, expected, atol=1e-4, rtol=0)
    assert (expected - 1).abs().max() > 0.05


def test_path_patching_mlp_to_logits_equals_the_direct_effect(model, tl, pair, metric, tl_caches):
    clean, corrupted, _, _ = pair
    clean_cache, corr_cache = tl_caches
    with torch.no_grad():
        delta = corr_cache["mlp_out", 0] - clean_cache["mlp_out", 0]
        logits = tl.unembed(tl.ln_final(clean_cache["resid_post", 1] + delta))
    expected = float(metric(logits))
    assert path_patch(model, clean, corrupted, metric, "mlp0") == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_path_patching_to_a_head_input_equals_the_closed_form(
    which, model, tl, pair, metric, tl_caches
):
    """Sender 0.h -> receiver 1.2's query/key/value: the receiver's input is the clean
    residual plus the sender's output change, through ln1 and W_Q/W_K/W_V; then the clean
    run continues with only that input replaced."""
    clean, corrupted, _, _ = pair
    clean_cache, corr_cache = tl_caches
    result = path_patch_heads(model, clean, corrupted, metric, f"1.2.{which}", progress=False)
    W = {"q": tl.W_Q, "k": tl.W_K, "v": tl.W_V}[which][1, 2]
    b = {"q": tl.b_Q, "k": tl.b_K, "v": tl.b_V}[which][1, 2]
    for head in range(4):
        with torch.no_grad():
            delta = (corr_cache["z", 0][:, :, head] - clean_cache["z", 0][:, :, head]) @ tl.W_O[
                0, head
            ]
            x = tl.blocks[1].ln1(clean_cache["resid_pre", 1] + delta) @ W + b

            def patch(act, hook, x=x):
                act = act.clone()
                act[:, :, 2] = x
                return act

            logits = tl.run_with_hooks(clean, fwd_hooks=[(f"blocks.1.attn.hook_{which}", patch)])
        assert result.values[0, head].item() == pytest.approx(float(metric(logits)), abs=1e-4)
    # layer-1 heads have no path to a layer-1 receiver: the clean run, exactly
    assert torch.equal(result.values[1], torch.ones(4))


@pytest.mark.parametrize("freeze_mlps", [True, False])
def test_path_patching_every_component_gives_the_corrupted_run(model, pair, metric, freeze_mlps):
    clean, corrupted, _, _ = pair
    senders = ["embed", "mlp0", "mlp1"] + [f"{layer}.{h}" for layer in range(2) for h in range(4)]
    value = path_patch(model, clean, corrupted, metric, senders, freeze_mlps=freeze_mlps)
    assert value == pytest.approx(0.0, abs=1e-5)
    value = path_patch(model, clean, corrupted, metric, senders, ["1.0", "1.3.k", "mlp1", "final"])
    assert value == pytest.approx(0.0, abs=1e-5)


def test_path_patching_with_mlps_recomputed_matches_tl_hooks(model, tl, pair, metric, tl_caches):
    """freeze_mlps=False: heads frozen to clean except the sender (corrupted), MLPs free;
    with the logits as receiver this is one hooked transformer-lens run."""
    clean, corrupted, _, _ = pair
    clean_cache, corr_cache = tl_caches
    result = path_patch_heads(
        model, clean, corrupted, metric, "final", freeze_mlps=False, progress=False
    )
    for layer, head in [(0, 1), (0, 3), (1, 2)]:

        def freeze(z, hook, layer=layer, head=head):
            patched = clean_cache[hook.name].clone()
            if hook.name == f"blocks.{layer}.attn.hook_z":
                patched[:, :, head] = corr_cache[hook.name][:, :, head]
            return patched

        with torch.no_grad():
            logits = tl.run_with_hooks(clean, fwd_hooks=[(lambda n: n.endswith("hook_z"), freeze)])
        assert result.values[layer, head].item() == pytest.approx(float(metric(logits)), abs=1e-4)


def test_path_patching_errors(model, pair, metric):
    clean, corrupted, _, _ = pair
    with pytest.raises(GPT2LabError, match="unknown sender 'attn3'"):
        path_patch(model, clean, corrupted, metric, "attn3")
    with pytest.raises(GPT2LabError, match="layer 5 is not in 0..1"):
        path_patch(model, clean, corrupted, metric, "5.0")
    with pytest.raises(GPT2LabError, match="head 9 is not in 0..3"):
        path_patch(model, clean, corrupted, metric, "0.1", "1.9.q")
    with pytest.raises(GPT2LabError, match="embed cannot be a receiver"):
        path_patch(model, clean, corrupted, metric, "0.1", "embed")
    with pytest.raises(GPT2LabError, match="same number of tokens"):
        path_patch(model, clean, corrupted[:, :3], metric, "0.1")


# ---- the CLI ---------------------------------------------------------------------------
def run_main(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def table(output: str) -> torch.Tensor:
    rows = [line.split() for line in output.splitlines() if re.match(r"L\d+ ", line)]
    return torch.tensor([[float(x) for x in r[1:]] for r in rows])


@pytest.mark.parametrize(
    "what,tl_fn",
    [
        ("resid_pre", tlp.get_act_patch_resid_pre),
        ("heads", tlp.get_act_patch_attn_head_out_all_pos),
    ],
)
def test_cli_patch_prints_transformer_lens_numbers_and_writes_html(
    what, tl_fn, small_ckpt, tmp_path, capsys
):
    out_file = tmp_path / "patch.html"
    argv = ["patch", CLEAN, CORRUPTED, "--answer", " Mary", "--wrong", " John"]
    argv += ["--model", str(small_ckpt), "--what", what, "--out", str(out_file)]
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    model = gpt2lab.load(small_ckpt)
    tl = hooked_transformer(model)
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    metric = normalized_logit_diff(model, clean, corrupted, " Mary", " John")
    with torch.no_grad():
        ref = tl_fn(tl, corrupted, tl.run_with_cache(clean)[1], metric)
    torch.testing.assert_close(table(out), ref.float(), atol=6e-3, rtol=0)  # printed to 2 dp
    assert f"clean {metric.clean:.3f}" in out and f"corrupted {metric.corrupted:.3f}" in out
    assert f"wrote {out_file}" in out
    html = out_file.read_text()
    cells = [float(x) for x in re.findall(r"<td[^>]*>(-?\d+\.\d+)</td>", html)]
    torch.testing.assert_close(torch.tensor(cells), ref.float().flatten(), atol=6e-4, rtol=0)


def test_cli_patch_writes_a_png(small_ckpt, tmp_path, capsys):
    pytest.importorskip("matplotlib.image")
    import matplotlib.image

    out_file = tmp_path / "patch.png"
    argv = ["patch", CLEAN, CORRUPTED, "--answer", " Mary", "--wrong", " John"]
    rc, out, err = run_main([*argv, "--model", str(small_ckpt), "--out", str(out_file)], capsys)
    assert rc == 0, err
    image = matplotlib.image.imread(out_file)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0  # not a blank canvas


LONGER = "Mary met John. Mary then thanked"


@pytest.mark.parametrize(
    "corrupted,answer,extra,message",
    [
        (CORRUPTED, " Mary", ["--what", "neurons"], "unknown activation 'neurons'"),
        (CORRUPTED, " Mary Ann", [], "' Mary Ann' is 2 tokens, not one"),
        (CORRUPTED, " Mary", ["--out", "plot.pdf"], "must end in .png or .html"),
        (LONGER, " Mary", [], "same number of tokens (clean: 6, corrupted: 7)"),
    ],
)
def test_cli_patch_user_errors_are_one_line(corrupted, answer, extra, message, small_ckpt, capsys):
    argv = ["patch", CLEAN, corrupted, "--answer", answer, "--wrong", " John"]
    rc, out, err = run_main([*argv, "--model", str(small_ckpt), *extra], capsys)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gpt2lab: error: ") and message in err


def test_cli_png_without_matplotlib_is_a_one_line_error(small_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    argv = ["patch", CLEAN, CORRUPTED, "--answer", " Mary", "--wrong", " John", "--out", "x.png"]
    rc, out, err = run_main([*argv, "--model", str(small_ckpt)], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "needs matplotlib" in err
