"""The IOI task: the generator against an independent tokenizer (transformers'
GPT2Tokenizer over the shipped BPE files) and the paper's templates, the logit
difference against transformers' logits, and per-template mean ablation against a
hand-made transformer-lens run, on the 2-layer random checkpoint of conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tl_reference import hooked_transformer

import gpt2lab
from gpt2lab.errors import GPT2LabError
from gpt2lab.interp.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    ioi_dataset,
    ioi_score,
    mean_ablation_hooks,
    run_ioi,
)

DATA = Path(gpt2lab.__file__).parent / "data"


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(
        vocab=str(DATA / "encoder.json"), merges=str(DATA / "vocab.bpe"), add_prefix_space=False
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(small_ckpt):
    return gpt2lab.load(small_ckpt)


def expected_text(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    """The template filled by plain string replacement, the answer (final ' [A]') cut."""
    body = template[: -len(" [A]")].replace("[A]", io).replace("[PLACE]", place)
    return body.replace("[OBJECT]", obj).replace("[B]", s1, 1).replace("[B]", s2, 1)


def unpadded(ds, i: int) -> list[int]:
    return ds.tokens[i, -int(ds.lengths[i]) :].tolist()


# ---- templates and vocabulary --------------------------------------------------------
def test_templates_are_the_papers_15_in_both_orders():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    assert BABA_TEMPLATES[0] == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert ABBA_TEMPLATES[0] == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    for baba, abba in zip(BABA_TEMPLATES, ABBA_TEMPLATES, strict=True):
        assert baba.count("[A]") == 2 and baba.count("[B]") == 2 and baba.endswith(" to [A]")
        assert baba.index("[B]") < baba.index("[A]")  # subject first
        assert abba.index("[A]") < abba.index("[B]")  # indirect object first
        assert abba.replace("[A]", "#").replace("[B]", "#") == baba.replace("[A]", "#").replace(
            "[B]", "#"
        )


def test_names_places_and_objects_are_single_tokens(hf_tok):
    assert len(set(NAMES)) == len(NAMES) >= 99
    for word in NAMES + PLACES + OBJECTS:
        assert len(hf_tok.encode(" " + word)) == 1, word


# ---- the generator -------------------------------------------------------------------
def test_positions_decode_to_the_intended_words(hf_tok):
    ds = ioi_dataset(60, seed=0)
    assert len(ds) == 60 and ds.tokens.shape[0] == 60
    assert ds.attention_mask is not None  # templates of different lengths: left-padded
    for i in range(len(ds)):
        row = ds.tokens[i].tolist()

        def word(pos, row=row, i=i):
            return hf_tok.decode([row[int(pos[i])]])

        assert word(ds.io_pos) == " " + ds.io[i]
        assert word(ds.s1_pos) == " " + ds.s1[i]
        assert word(ds.s2_pos) == " " + ds.s1[i] and ds.s2[i] == ds.s1[i]
        assert word(ds.end_pos) == " to" and int(ds.end_pos[i]) == ds.tokens.shape[1] - 1
        assert ds.s1_pos[i] < ds.s2_pos[i] and ds.io_pos[i] < ds.s2_pos[i]
        assert ds.io[i] != ds.s1[i]
        text = expected_text(
            ds.template_of(i), ds.io[i], ds.s1[i], ds.s1[i], ds.places[i], ds.objects[i]
        )
        assert ds.prompts[i] == text
        assert unpadded(ds, i) == hf_tok.encode(text)  # the ids an independent BPE gives
        assert int(ds.attention_mask[i].sum()) == int(ds.lengths[i])
        assert ds.io_tokens[i] == hf_tok.encode(" " + ds.io[i])[0]
        assert ds.s_tokens[i] == hf_tok.encode(" " + ds.s1[i])[0]
    assert len({ds.template_of(i) for i in range(len(ds))}) > 15  # both orders drawn


def test_kinds_put_the_subject_or_the_io_first():
    baba, abba = ioi_dataset(20, kind="BABA", seed=1), ioi_dataset(20, kind="ABBA", seed=1)
    assert bool((baba.s1_pos < baba.io_pos).all()) and bool((abba.io_pos < abba.s1_pos).all())
    assert set(baba.templates) == set(BABA_TEMPLATES)
    assert set(abba.templates) == set(ABBA_TEMPLATES)


def test_bos_is_prepended_on_request(hf_tok):
    ds = ioi_dataset(4, seed=2, prepend_bos=True)
    for i in range(4):
        assert unpadded(ds, i) == [50256] + hf_tok.encode(ds.prompts[i])
        assert hf_tok.decode([int(ds.tokens[i, ds.io_pos[i]])]) == " " + ds.io[i]


def test_abc_set_differs_exactly_at_the_name_positions(hf_tok):
    ds = ioi_dataset(40, seed=3)
    abc = ds.abc()
    assert abc.tokens.shape == ds.tokens.shape
    assert torch.equal(abc.attention_mask, ds.attention_mask)
    names_at = torch.zeros_like(ds.tokens, dtype=torch.bool)
    rows = torch.arange(len(ds))
    for pos in (ds.io_pos, ds.s1_pos, ds.s2_pos):
        names_at[rows, pos] = True
    assert torch.equal(abc.tokens != ds.tokens, names_at)
    for i in range(len(ds)):
        x, y, z = abc.io[i], abc.s1[i], abc.s2[i]
        assert len({x, y, z, ds.io[i], ds.s1[i]}) == 5  # three new, unrelated names
        assert abc.prompts[i] == expected_text(
            ds.template_of(i), x, y, z, ds.places[i], ds.objects[i]
        )
        assert unpadded(abc, i) == hf_tok.encode(abc.prompts[i])


def test_generation_is_seeded():
    a, b, c = ioi_dataset(30, seed=7), ioi_dataset(30, seed=7), ioi_dataset(30, seed=8)
    assert a.prompts == b.prompts and torch.equal(a.tokens, b.tokens)
    assert a.prompts != c.prompts
    assert a.abc(seed=1).prompts == b.abc(seed=1).prompts
    assert a.abc(seed=1).prompts != a.abc(seed=2).prompts


def test_generator_errors():
    with pytest.raises(GPT2LabError, match="one GPT-2 token after a space; not: Bartholomew"):
        ioi_dataset(5, names=["Mary", "John", "Tom", "Anna", "Bartholomew"], seed=0)
    with pytest.raises(GPT2LabError, match="n_prompts must be at least 1"):
        ioi_dataset(0)
    with pytest.raises(GPT2LabError, match="kind must be"):
        ioi_dataset(5, kind="ABC")
    with pytest.raises(GPT2LabError, match="templates are indices in 0..14"):
        ioi_dataset(5, templates=[15])
    with pytest.raises(GPT2LabError, match="at least 5 different names"):
        ioi_dataset(5, names=["Mary", "John"])


# ---- metric and ablation -------------------------------------------------------------
def test_logit_diff_matches_transformers_prompt_by_prompt(model, hf_small):
    ds = ioi_dataset(6, seed=4)
    assert ds.attention_mask is not None
    ours = ds.logit_diff(run_ioi(model, ds), per_prompt=True)
    expected = []
    with torch.no_grad():
        for i in range(len(ds)):  # each prompt alone: no padding in the reference
            last = hf_small(torch.tensor([unpadded(ds, i)])).logits[0, -1]
            expected.append(float(last[ds.io_tokens[i]] - last[ds.s_tokens[i]]))
    expected = torch.tensor(expected)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    score = ioi_score(model, ds)
    assert score["logit_diff"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert score["io_preferred"] == pytest.approx(float((expected > 0).float().mean()))


def test_mean_ablation_of_a_layer_matches_transformer_lens(model):
    """All heads of layer 0 replaced by their per-template, per-position mean over the
    ABC prompts; the reference runs each template's prompts unpadded through
    transformer-lens with hook_z overwritten by hand."""
    tl = hooked_transformer(model)
    ds = ioi_dataset(10, templates=[0, 3], seed=5)  # 4 templates of two lengths
    abc = ds.abc()
    heads = [f"0.{h}" for h in range(4)] + ["1.2"]
    ours = ds.logit_diff(run_ioi(model, ds, mean_ablation_hooks(model, ds, heads, abc)), True)
    clean = ds.logit_diff(run_ioi(model, ds), per_prompt=True)

    expected = torch.zeros(len(ds))
    templates = {ds.template_of(i) for i in range(len(ds))}
    assert len({int(ds.lengths[i]) for i in range(len(ds))}) == 2
    for template in templates:
        rows = [i for i in range(len(ds)) if ds.template_of(i) == template]
        ref_rows = [i for i in range(len(abc)) if abc.template_of(i) == template]
        n = int(ds.lengths[rows[0]])
        with torch.no_grad():
            _, cache = tl.run_with_cache(abc.tokens[ref_rows, -n:])
            means = {layer: cache["z", layer].mean(0) for layer in (0, 1)}  # [pos, head, d]

            def ablate(z, hook, means=means):
                layer = int(hook.name.split(".")[1])
                z = z.clone()
                for h in range(4) if layer == 0 else [2]:
                    z[:, :, h] = means[layer][:, h]
                return z

            logits = tl.run_with_hooks(
                ds.tokens[rows, -n:], fwd_hooks=[(lambda name: name.endswith("hook_z"), ablate)]
            )
        last = logits[:, -1]
        r = torch.arange(len(rows))
        expected[rows] = last[r, ds.io_tokens[rows]] - last[r, ds.s_tokens[rows]]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - clean).abs().max() > 1e-2  # the ablation does change the outputs


def test_mean_ablation_errors(model):
    ds = ioi_dataset(4, templates=[0], seed=6)
    with pytest.raises(GPT2LabError, match="head 2.0 is not in this model"):
        mean_ablation_hooks(model, ds, ["2.0"])
    other = ioi_dataset(4, templates=[1], seed=6)
    with pytest.raises(GPT2LabError, match="reference set has no prompt of template"):
        mean_ablation_hooks(model, ds, ["0.1"], reference=other)
    hooks = mean_ablation_hooks(model, ds, ["0.1"])
    with pytest.raises(GPT2LabError, match="for the dataset's 4 prompts"):
        run_ioi(model, ioi_dataset(3, seed=6), hooks)
