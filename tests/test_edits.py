"""Value-vector edits and the per-layer MLP answer measurement (gpt2lab.interp.edits).

References: the edited row against numpy's orig + sum a_t W_U[:, t] in float64; the edited
forward pass against the unedited model with the same change written as a raw hook
(activation x delta added to hook_mlp_out); saved weights against transformers'
GPT2LMHeadModel loading them; undo against a bitwise copy of every weight; the
measurement against a numpy decomposition of the final logit (the residual stream's
parts through ln_final with the cached scale, plus the constant terms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpt2lab as gl
from gpt2lab import GPT2LabError
from gpt2lab.interp import edits as ed

PROMPT = "Question: which is the true answer?\nA. yes\nB. no\nAnswer:"


@pytest.fixture(scope="module")
def model():
    return gl.load("bundled")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# ---- edits -------------------------------------------------------------------------------
def test_edit_adds_the_unembedding_combination_and_undo_is_bit_identical(model):
    before = snapshot(model)
    A, B = model.to_single_token(" A"), model.to_single_token(" B")
    W_U = np_(model.W_U)
    edit = ed.edit_value_vector(model, 2, 7, {" A": -1.5, B: 2.25})
    want = np_(before["blocks.2.mlp.c_proj.weight"][:, 7]) - 1.5 * W_U[:, A] + 2.25 * W_U[:, B]
    got = np_(model.blocks[2].mlp.c_proj.weight[:, 7])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np_(model.W_out[2][7]), want, rtol=1e-6, atol=1e-7)
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed == ["blocks.2.mlp.c_proj.weight"]  # the tied embedding is untouched
    others = torch.ones(model.cfg.d_mlp, dtype=torch.bool)
    others[7] = False
    assert torch.equal(model.blocks[2].mlp.c_proj.weight[:, others], before[changed[0]][:, others])
    assert ed.value_edits(model) == [edit]
    edit.undo()
    assert_identical(model, before)
    assert ed.value_edits(model) == []


def test_undo_is_bit_identical_in_bfloat16():
    model = gl.load("bundled", dtype="bfloat16")
    before = snapshot(model)
    with ed.edit_value_vector(model, 0, 3, {" the": 0.3}):
        assert not torch.equal(
            model.blocks[0].mlp.c_proj.weight, before["blocks.0.mlp.c_proj.weight"]
        )
    assert_identical(model, before)


def test_edit_equals_the_same_change_written_as_a_hook(model):
    tokens = model.to_tokens(PROMPT)
    layer, neuron = 1, 11
    delta = 3.0 * model.W_U[:, model.to_single_token(" B")]
    post = {}

    def grab(x, hook):
        post["x"] = x[..., neuron].clone()

    def add(x, hook):
        return x + post["x"][..., None] * delta

    hooks = [(f"blocks.{layer}.mlp.hook_post", grab), (f"blocks.{layer}.hook_mlp_out", add)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        want = model(tokens)
    with torch.no_grad(), ed.edit_value_vector(model, layer, neuron, {" B": 3.0}):
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(tokens)
    assert (got - plain).abs().max() > 1e-2  # the edit did change the output


def test_edits_stack_and_undo_in_any_order_or_refuse(model):
    before = snapshot(model)
    a = ed.edit_value_vector(model, 0, 5, {" A": 1.0})
    b = ed.edit_value_vector(model, 3, 9, {" B": -1.0})
    a.undo()  # different neurons: any order
    b.undo()
    assert_identical(model, before)

    first = ed.edit_value_vector(model, 1, 2, {" A": 1.0})
    mid = snapshot(model)
    second = ed.edit_value_vector(model, 1, 2, {" B": 0.5})
    with pytest.raises(GPT2LabError, match="undo last-first"):
        first.undo()
    second.undo()
    assert_identical(model, mid)
    first.undo()
    assert_identical(model, before)
    with pytest.raises(GPT2LabError, match="already undone"):
        first.undo()

    with ed.edit_value_vector(model, 2, 2, {" A": 1.0}) as outer:  # nested scopes
        with ed.edit_value_vector(model, 2, 2, {" A": 1.0}):
            pass
        assert outer.active
    assert_identical(model, before)

    edit = ed.edit_value_vector(model, 2, 4, {" A": 1.0})
    with torch.no_grad():
        model.blocks[2].mlp.c_proj.weight[0, 4] += 1.0  # changed behind the edit's back
    with pytest.raises(GPT2LabError, match="changed after this edit"):
        edit.undo()
    with torch.no_grad():  # put the edited row back: now the undo may go ahead
        model.blocks[2].mlp.c_proj.weight[:, 4] = edit._edited
    edit.undo()
    assert_identical(model, before)


def test_saved_edit_loads_in_transformers(model, tmp_path):
    import transformers

    layer, neuron = 3, 100
    tokens = model.to_tokens(PROMPT)
    with ed.edit_value_vector(model, layer, neuron, {" A": -2.0, " B": 2.0}):
        model.save(tmp_path / "edited")
        with torch.no_grad():
            ours = model(tokens)
        row = model.blocks[layer].mlp.c_proj.weight[:, neuron].clone()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "edited").eval()
    assert torch.equal(hf.transformer.h[layer].mlp.c_proj.weight[neuron], row)
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    reloaded = gl.load(str(tmp_path / "edited"))
    assert torch.equal(reloaded.blocks[layer].mlp.c_proj.weight[:, neuron], row)


# ---- the measurement ---------------------------------------------------------------------
def decompose(model, prompt: str, answers: list[str]):
    """numpy: every residual part at the last position through ln_final (cached scale)."""
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    L = model.cfg.n_layers
    ids = [model.to_single_token(a) for a in answers]
    W_U, b_U = np_(model.W_U)[:, ids], np_(model.b_U)[ids]
    w_ln, b_ln = np_(model.ln_final.weight), np_(model.ln_final.bias)
    scale = float(cache["ln_final.hook_scale"][0, -1, 0])

    def read(x: torch.Tensor) -> np.ndarray:  # [d_model] -> [n_answers]
        v = np_(x[0, -1])
        return ((v - v.mean()) / scale * w_ln) @ W_U

    parts = [read(cache["hook_embed"]), read(cache["hook_pos_embed"])]
    parts += [read(cache[f"blocks.{i}.hook_attn_out"]) for i in range(L)]
    mlp = np.stack([read(cache[f"blocks.{i}.hook_mlp_out"]) for i in range(L)])
    total = sum(parts) + mlp.sum(0) + b_ln @ W_U + b_U
    return mlp, total, np_(logits[0, -1])[ids], cache


@pytest.mark.parametrize("processed", [False, True])
def test_measurement_equals_numpy_decomposition(model, processed):
    if processed:
        model = gl.load("bundled")
        model.process_weights()
    answers = [" A", " B", " C"]
    mlp, total, logits, cache = decompose(model, PROMPT, answers)
    np.testing.assert_allclose(total, logits, rtol=1e-4, atol=1e-4)  # the parts add up
    result = ed.mlp_answer_contributions(model, PROMPT, answers, k=5)
    assert result.answers == answers
    np.testing.assert_allclose(result.mlp.numpy(), mlp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.logits.numpy(), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.diff.numpy(), mlp[:, 0] - mlp[:, 1], rtol=1e-4, atol=1e-5)

    # neurons of one layer: ranked as numpy ranks them, and they add up to the layer
    layer, d_mlp = 2, model.cfg.d_mlp
    every = ed.mlp_answer_contributions(model, PROMPT, answers, layer=layer, k=d_mlp)
    post = np_(cache[f"blocks.{layer}.mlp.hook_post"][0, -1])
    W_out = np_(model.W_out[layer])
    score = np.abs(post) * np.linalg.norm(W_out, axis=1)
    assert [n.neuron for n in every.neurons[:20]] == np.argsort(-score, kind="stable")[:20].tolist()
    np.testing.assert_allclose([n.score for n in every.neurons], np.sort(score)[::-1], rtol=1e-5)
    summed = np.sum([n.contributions for n in every.neurons], axis=0)
    ids = [model.to_single_token(a) for a in answers]
    scale = float(cache["ln_final.hook_scale"][0, -1, 0])
    direction = np_(model.W_U)[:, ids].T * np_(model.ln_final.weight)
    direction = (direction - direction.mean(1, keepdims=True)) / scale
    bias_term = direction @ np_(model.b_out[layer])
    np.testing.assert_allclose(summed + bias_term, mlp[layer], rtol=1e-4, atol=1e-4)
    # all layers ranked together
    scores = np.concatenate(
        [
            np.abs(np_(cache[f"blocks.{i}.mlp.hook_post"][0, -1]))
            * np.linalg.norm(np_(model.W_out[i]), axis=1)
            for i in range(model.cfg.n_layers)
        ]
    )
    best = np.argsort(-scores, kind="stable")[:5]
    assert [(n.layer, n.neuron) for n in result.neurons] == [divmod(int(b), d_mlp) for b in best]


# ---- bad inputs --------------------------------------------------------------------------
BAD = [
    (lambda m: ed.edit_value_vector(m, 4, 0, {" A": 1.0}), "layer must be an integer in [0, 3]"),
    (
        lambda m: ed.edit_value_vector(m, 0, 1024, {" A": 1.0}),
        "neuron must be an integer in [0, 1023]",
    ),
    (lambda m: ed.edit_value_vector(m, 0, -1, {" A": 1.0}), "neuron must be an integer"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {}), "tokens must be a non-empty dict"),
    (lambda m: ed.edit_value_vector(m, 0, 0, [" A"]), "tokens must be a non-empty dict"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {" hello world": 1.0}), "is 2 tokens, not one"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {"kingdom": 1.0}), "did you mean ' kingdom'"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {50257: 1.0}), "outside the vocabulary"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {" A": float("nan")}), "must be a finite number"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {" A": "1"}), "must be a finite number"),
    (lambda m: ed.edit_value_vector(m, 0, 0, {" A": 1, 317: 2}), "is given twice"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, k=0), "k must be an integer >= 1"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, layer=9), "layer must be an integer"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, []), "answers must be a non-empty list"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, " A"), "answers must be a non-empty list"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, [" A", " A B"]), "answer ' A B' is 2"),
    (lambda m: ed.mlp_answer_contributions(m, [PROMPT, PROMPT]), "give one prompt"),
    (lambda m: ed.mlp_answer_contributions(m, torch.zeros(2, 3, dtype=torch.long)), "one prompt"),
    (lambda m: ed.mlp_answer_contributions(m, PROMPT, [" A"]).diff, "diff needs two answers"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_inputs_are_one_line_errors(model, call, message):
    before = snapshot(model)
    with pytest.raises(GPT2LabError) as info:
        call(model)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert_identical(model, before)  # nothing half-applied
    assert ed.value_edits(model) == []


def test_quantized_models_are_refused():
    model = gl.load("bundled", quantize="int8")
    with pytest.raises(GPT2LabError, match="unquantized model"):
        ed.edit_value_vector(model, 0, 0, {" A": 1.0})
    with pytest.raises(GPT2LabError, match="unquantized model"):
        ed.mlp_answer_contributions(model, PROMPT)
