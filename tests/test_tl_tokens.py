"""TransformerLens' tokenization conventions on the model, against transformer-lens 3.9.

The same random weights go into gpt2lab and into `HookedTransformer` (with an HF GPT-2
tokenizer built from the shipped BPE files); BOS and padding options, the tokenizer
helpers (`to_str_tokens`, `to_single_token`, `to_string`, `get_token_position`,
`tokens_to_residual_directions`) and `generate(prepend_bos=...)` must give what
TransformerLens gives. Also: `gpt2lab.inputs` itself, and bad arguments as one-line
`GPT2LabError`s.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import gpt2lab as gl
from gpt2lab import inputs
from gpt2lab.errors import GPT2LabError

DATA = Path(gl.__file__).parent / "data"
TEXTS = ["When Mary and John went", "Hi", "The cat sat on the mat, and the cat slept"]
EOT = 50256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(small_ckpt):
    return gl.load(small_ckpt)


def _reference(model, tokenizer_dir, **kw):
    from tl_reference import hooked_transformer
    from transformers import AutoTokenizer

    ref = hooked_transformer(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.set_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))
    return ref


@pytest.fixture(scope="module")
def ref(model, hf_tokenizer_dir):
    """TransformerLens on the same weights; cfg.default_prepend_bos=False (gpt2lab's
    default), tokenizer padding "right" (TransformerLens')."""
    return _reference(model, hf_tokenizer_dir)


def tl_mask(ref, tokens, prepend_bos, side):
    from transformer_lens import utils

    return utils.get_attention_mask(ref.tokenizer, tokens, prepend_bos, side)


# ---- to_tokens, padding, forward ---------------------------------------------------------
@pytest.mark.parametrize("bos", [False, True])
def test_to_tokens_of_one_text_with_and_without_bos(model, ref, bos):
    ours = model.to_tokens(TEXTS[0], prepend_bos=bos)
    assert torch.equal(ours, ref.to_tokens(TEXTS[0], prepend_bos=bos))
    assert (ours[0, 0].item() == EOT) == bos
    assert model.to_str_tokens(TEXTS[0], prepend_bos=bos) == ref.to_str_tokens(
        TEXTS[0], prepend_bos=bos
    )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("bos", [False, True])
def test_padded_batch_tokens_mask_and_logits_match(model, ref, bos, side):
    tokens, mask = model.to_tokens(TEXTS, prepend_bos=bos, padding_side=side, return_mask=True)
    ref_tokens = ref.to_tokens(TEXTS, prepend_bos=bos, padding_side=side)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(mask, tl_mask(ref, ref_tokens, bos, side))
    real = mask.bool()
    with torch.no_grad():
        expected = ref(TEXTS, prepend_bos=bos, padding_side=side)
        for logits in (
            model(TEXTS, prepend_bos=bos, padding_side=side),  # text in
            model(tokens, attention_mask=mask),  # the same as ids and mask
            model.run_with_hooks(TEXTS, prepend_bos=bos, padding_side=side),
            model.run_with_cache(TEXTS, prepend_bos=bos, padding_side=side)[0],
        ):
            assert logits.shape == expected.shape
            torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_no_real_position(model, ref, side):
    """Each row of a padded batch equals that text alone: the mask hides the padding and
    positions count real tokens (0..n-1 in every row, whatever the side)."""
    _, mask = model.to_tokens(TEXTS, padding_side=side, return_mask=True)
    with torch.no_grad():
        batch = model(TEXTS, padding_side=side)
        _, cache = model.run_with_cache(TEXTS, padding_side=side, names_filter="hook_pos_embed")
        _, ref_cache = ref.run_with_cache(TEXTS, padding_side=side, names_filter="hook_pos_embed")
        for i, text in enumerate(TEXTS):
            alone = model(text)[0]
            row = batch[i][mask[i].bool()]
            torch.testing.assert_close(row, alone, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(
        cache["hook_pos_embed"][real], ref_cache["hook_pos_embed"][real], atol=1e-6, rtol=0
    )


def test_defaults_set_at_load_follow_transformer_lens(small_ckpt, hf_tokenizer_dir):
    tl_like = gl.load(small_ckpt, default_prepend_bos=True, default_padding_side="right")
    assert (tl_like.default_prepend_bos, tl_like.default_padding_side) == (True, "right")
    ref = _reference(tl_like, hf_tokenizer_dir)
    ref.cfg.default_prepend_bos = True  # TransformerLens' own defaults: BOS, right padding
    assert ref.tokenizer.padding_side == "right"
    assert torch.equal(tl_like.to_tokens(TEXTS), ref.to_tokens(TEXTS))
    assert tl_like.to_str_tokens(TEXTS[1]) == ref.to_str_tokens(TEXTS[1])
    assert tl_like.get_token_position(" cat", TEXTS[2]) == ref.get_token_position(" cat", TEXTS[2])
    tokens, mask = tl_like.to_tokens(TEXTS, return_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(
            tl_like(TEXTS)[mask.bool()], ref(TEXTS)[mask.bool()], atol=1e-4, rtol=0
        )
    # a call's own argument wins over the default
    assert tl_like.to_tokens(TEXTS[0], prepend_bos=False)[0, 0].item() != EOT
    plain = gl.load(small_ckpt)
    assert (plain.default_prepend_bos, plain.default_padding_side) == (False, "left")
    assert plain.to_tokens(TEXTS[0])[0, 0].item() != EOT


# ---- the tokenizer helpers ---------------------------------------------------------------
def test_to_str_tokens_of_text_lists_and_tensors(model, ref):
    ids = model.to_tokens(TEXTS[2])
    for x in (ids, ids[0], ids[0].numpy(), TEXTS[2], [TEXTS[0], TEXTS[1]], [ids[0], ids[0, :3]]):
        assert model.to_str_tokens(x) == ref.to_str_tokens(x)
    for bos in (False, True):
        assert model.to_str_tokens([TEXTS[0], TEXTS[1]], prepend_bos=bos) == ref.to_str_tokens(
            [TEXTS[0], TEXTS[1]], prepend_bos=bos
        )
    assert model.to_str_tokens(torch.tensor(995)) == ref.to_str_tokens(torch.tensor(995))
    # a list of ids is one sequence here (TransformerLens maps over the items and fails)
    assert model.to_str_tokens(ids[0].tolist()) == ref.to_str_tokens(ids[0])
    # a token ending mid-character reads as U+FFFD in both
    emoji = torch.tensor(model.tokenizer.encode("🤗"))
    assert model.to_str_tokens(emoji) == ref.to_str_tokens(emoji)


def test_to_single_token_and_to_string(model, ref):
    for word in (" Mary", "Hello", ",", " the"):
        assert model.to_single_token(word) == ref.to_single_token(word)
    ids = model.to_tokens(TEXTS, padding_side="right")
    for x in (ids, ids[0], ids[0].tolist(), ids.tolist(), ids[0].numpy(), torch.tensor(995)):
        assert model.to_string(x) == ref.to_string(x)
    assert model.to_string(ids[1]).endswith("<|endoftext|>")  # padding shows, as in TL


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("mode", ["first", "last"])
def test_get_token_position(model, ref, bos, mode):
    text = TEXTS[2]
    for token in (" cat", " the", model.to_single_token(" mat")):
        want = ref.get_token_position(token, text, mode=mode, prepend_bos=bos)
        assert model.get_token_position(token, text, mode=mode, prepend_bos=bos) == want
    ids = ref.to_tokens(text, prepend_bos=bos)
    for x in (ids, ids[0]):
        want = ref.get_token_position(" cat", x, mode=mode)
        assert model.get_token_position(" cat", x, mode=mode) == want
    assert model.get_token_position(" cat", text, mode, bos) == (1 if mode == "first" else 9) + bos


@pytest.mark.parametrize("processed", [False, True])
def test_tokens_to_residual_directions(model, small_ckpt, hf_tokenizer_dir, processed):
    ref = _reference(model, hf_tokenizer_dir, processed=processed)  # TL processes its copy
    model = gl.load(small_ckpt, process=True) if processed else model
    ids = model.to_tokens(TEXTS[:2])
    with torch.no_grad():
        for x in (" Mary", 995, torch.tensor(995), torch.tensor([995]), ids[0], ids):
            ours, theirs = (
                model.tokens_to_residual_directions(x),
                ref.tokens_to_residual_directions(x),
            )
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bos", [False, True])
def test_generate_with_prepend_bos_matches_transformer_lens(model, ref, bos):
    def tl_new_tokens(prompt):
        out = ref.generate(
            prompt, max_new_tokens=6, do_sample=False, prepend_bos=bos, return_type="tokens",
            stop_at_eos=False, verbose=False,
        )  # fmt: skip
        return out[:, ref.to_tokens(prompt, prepend_bos=bos, padding_side="left").shape[1] :]

    with torch.no_grad():
        single = model.generate(TEXTS[0], max_new_tokens=6, prepend_bos=bos, stop_at_eot=False,
                                return_result=True).tokens  # fmt: skip
        assert single == tl_new_tokens(TEXTS[0]).tolist()
        batch = model.generate(TEXTS, max_new_tokens=6, prepend_bos=bos, stop_at_eot=False,
                               return_result=True, padding_side="right").tokens  # fmt: skip
        assert batch == tl_new_tokens(TEXTS).tolist()  # batches are left-padded in both
        text = model.generate(TEXTS[0], max_new_tokens=6, prepend_bos=bos, stop_at_eot=False)
        assert text == model.to_string(single[0])
        streamed = "".join(
            model.stream(TEXTS[0], max_new_tokens=6, prepend_bos=bos, stop_at_eot=False)
        )
        assert streamed == text


# ---- gpt2lab.inputs ----------------------------------------------------------------------
def test_inputs_batch_of_every_prompt_form(model):
    tok = model.tokenizer
    a, b = tok.encode(TEXTS[0]), tok.encode(TEXTS[1])
    batch = inputs.to_batch(tok, TEXTS[:2], prepend_bos=True, padding_side="right")
    assert batch.is_text and not batch.single and batch.padding_side == "right"
    assert batch.tokens[1, : len(b) + 1].tolist() == [EOT, *b]
    assert batch.lengths.tolist() == [len(a) + 1, len(b) + 1]
    assert batch.mask[1].tolist() == [1] * (len(b) + 1) + [0] * (len(a) - len(b))
    left = inputs.to_batch(tok, TEXTS[:2])
    assert left.tokens[1, -len(b) :].tolist() == b and left.mask[1, 0].item() == 0
    one = inputs.to_batch(tok, TEXTS[0])
    assert one.single and one.mask is None and one.tokens[0].tolist() == a
    ids = inputs.to_batch(tok, a, prepend_bos=True)  # BOS goes on text only ...
    assert ids.single and not ids.is_text and ids.tokens[0].tolist() == a
    ids = inputs.to_batch(tok, a, prepend_bos=True, bos_on_ids=True)  # ... unless asked
    assert ids.tokens[0].tolist() == [EOT, *a]
    t = torch.tensor([a, a])
    mask = torch.ones_like(t)
    tensor = inputs.to_batch(tok, t, attention_mask=mask)
    assert not tensor.single and tensor.mask is mask and torch.equal(tensor.tokens, t)
    assert inputs.to_batch(tok, t[0]).single
    assert inputs.to_batch(tok, "").tokens.tolist() == [[EOT]]  # a row has one token at least
    assert [inputs.prompt_kind(x) for x in ("", ["a"], [1], t, [], [True], 3, t[:0])] == [
        "text", "texts", "ids", "tensor", None, None, None, None,
    ]  # fmt: skip


def test_single_token_id_and_its_hint(model):
    tok = model.tokenizer
    assert inputs.single_token_id(tok, " Mary") == tok.encode(" Mary")[0]
    assert inputs.single_token_id(tok, 7) == 7
    assert inputs.single_token_id(tok, torch.tensor(7)) == 7
    with pytest.raises(GPT2LabError, match=r"did you mean ' Megan', with a leading space\?"):
        inputs.single_token_id(tok, "Megan")
    with pytest.raises(GPT2LabError, match="^answer ' Mary Ann' is 2 tokens, not one; give a"):
        inputs.single_token_id(tok, " Mary Ann", what="answer")
    with pytest.raises(
        GPT2LabError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"
    ):
        inputs.single_token_id(tok, 50257)
    with pytest.raises(GPT2LabError, match="must be a token string or id"):
        inputs.single_token_id(tok, True)


# ---- bad arguments -----------------------------------------------------------------------
BAD = [
    (lambda m: m.to_tokens("hi", padding_side="middle"), "padding_side must be 'left' or 'right', got 'middle'"),
    (lambda m: m.to_tokens("hi", prepend_bos="yes"), "prepend_bos must be True or False, got 'yes'"),
    (lambda m: m.to_tokens("hi", prepend_bos=1), "prepend_bos must be True or False, got 1"),
    (lambda m: m.to_tokens([1, 2]), "text must be a string or a non-empty list of strings"),
    (lambda m: m.to_tokens("hi", truncate="no"), "truncate must be True or False"),
    (lambda m: m("hi", padding_side="middle"), "padding_side must be 'left' or 'right'"),
    (lambda m: m(torch.tensor([[1, 2]]), prepend_bos="yes"), "prepend_bos must be True or False"),
    (lambda m: m.run_with_cache(["a", "bc"], padding_side=None, prepend_bos="yes"), "prepend_bos must be"),
    (lambda m: m.run_with_hooks("hi", padding_side="up"), "padding_side must be 'left' or 'right'"),
    (lambda m: m.generate("hi", prepend_bos="yes"), "prepend_bos must be True or False"),
    (lambda m: m.generate("hi", padding_side="middle"), "padding_side must be 'left' or 'right'"),
    (lambda m: list(m.stream("hi", prepend_bos=2)), "prepend_bos must be True or False"),
    (lambda m: m.to_str_tokens("hi", prepend_bos="yes"), "prepend_bos must be True or False"),
    (lambda m: m.to_str_tokens(torch.zeros(2, 3, dtype=torch.long)), "one sequence of tokens"),
    (lambda m: m.to_str_tokens(torch.zeros(3)), "integer token ids"),
    (lambda m: m.to_str_tokens(3.5), "integer token ids"),
    (lambda m: m.to_str_tokens(torch.tensor([50257])), "50257 is outside the vocabulary"),
    (lambda m: m.to_single_token("Megan"), "did you mean ' Megan'"),
    (lambda m: m.to_single_token(" Mary Ann"), "' Mary Ann' is 2 tokens, not one"),
    (lambda m: m.to_single_token(5), "to_single_token takes a string"),
    (lambda m: m.to_string(torch.zeros(1, 2, 3, dtype=torch.long)), "[pos] or [batch, pos]"),
    (lambda m: m.to_string(torch.zeros(3)), "integer token ids"),
    (lambda m: m.to_string([[1, 2], [3]]), "to_string takes token ids"),
    (lambda m: m.to_string([-1]), "token id -1 is outside the vocabulary"),
    (lambda m: m.get_token_position(" cat", TEXTS[2], mode="middle"), "mode must be 'first' or 'last', got 'middle'"),
    (lambda m: m.get_token_position(" dog", TEXTS[2]), "' dog' (id 3290) does not occur in the prompt"),
    (lambda m: m.get_token_position(" cat", TEXTS[2], prepend_bos="yes"), "prepend_bos must be"),
    (lambda m: m.get_token_position(" cat", torch.zeros(2, 3, dtype=torch.long)), "one sequence"),
    (lambda m: m.tokens_to_residual_directions(" hello world"), "2 tokens, not one"),
    (lambda m: m.tokens_to_residual_directions(60000), "60000 is outside the vocabulary"),
    (lambda m: m.tokens_to_residual_directions(torch.tensor([1.0, 2.0])), "integer token ids"),
    (lambda m: m.tokens_to_residual_directions(torch.tensor([1, 60000])), "60000 is outside"),
    (lambda m: setattr(m, "default_padding_side", "middle"), "default_padding_side must be 'left' or 'right'"),
    (lambda m: setattr(m, "default_prepend_bos", "yes"), "default_prepend_bos must be True or False"),
]  # fmt: skip


@pytest.mark.parametrize("call, words", BAD, ids=[w[:40] for _, w in BAD])
def test_bad_arguments_are_one_line_errors(model, call, words):
    with pytest.raises(GPT2LabError) as info:
        call(model)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert (model.default_prepend_bos, model.default_padding_side) == (False, "left")


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"default_prepend_bos": "yes"}, "default_prepend_bos must be True or False, got 'yes'"),
        ({"default_padding_side": "middle"}, "default_padding_side must be 'left' or 'right'"),
        ({"default_padding_side": None}, "default_padding_side must be 'left' or 'right'"),
    ],
)
def test_bad_load_defaults(small_ckpt, kw, words):
    with pytest.raises(GPT2LabError, match=words):
        gl.load(small_ckpt, **kw)
