"""Contrastive search against a plain re-implementation on transformers' model.

transformers 5 no longer ships contrastive search (it moved to the Hub as
transformers-community/contrastive-search, which needs a download and
trust_remote_code), so the reference below re-does transformers 4.x's
`_contrastive_search` in the most direct way: no KV cache, every step recomputes the
whole sequence and every candidate with `GPT2LMHeadModel` on the same weights, one
prompt at a time, and scores candidates with the formula written out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model
from transformers import RepetitionPenaltyLogitsProcessor

import gpt2lab as gl
from gpt2lab import GPT2LabError
from gpt2lab.generation.contrastive import contrastive_search

EOS = 50256
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there", "Hello"]


@pytest.fixture(scope="module")
def pair(small_ckpt, hf_small):
    return hf_small, gl.load(small_ckpt)


@pytest.fixture(scope="module")
def eos_pair(tmp_path_factory):
    """A model that often predicts EOS (ln_f's bias points along EOS's embedding)."""
    hf = hf_model(seed=0)
    with torch.no_grad():
        w = hf.transformer.wte.weight[EOS]
        hf.transformer.ln_f.bias.copy_(4.0 * w / w.norm())
    path = tmp_path_factory.mktemp("hf_eos_contrastive")
    hf.save_pretrained(path)
    return hf, gl.load(path)


@torch.no_grad()
def reference(hf, prompt, alpha, k, max_new, processor=None, eos=None) -> list[int]:
    """transformers 4.x contrastive search for one prompt, by full recomputation."""
    ids = list(prompt)
    for _ in range(max_new):
        hidden = hf.transformer(torch.tensor([ids])).last_hidden_state[0]  # after ln_f
        logits = hf.lm_head(hidden[-1:])  # [1, vocab]
        if processor is not None:
            logits = processor(torch.tensor([ids]), logits)
        probs, cands = logits.softmax(-1)[0].topk(k)
        rows = torch.tensor([ids + [c] for c in cands.tolist()])
        cand_hidden = hf.transformer(rows).last_hidden_state[:, -1]  # [k, d]
        sim = F.cosine_similarity(cand_hidden[:, None], hidden[None], dim=-1)  # [k, S]
        score = (1 - alpha) * probs - alpha * sim.max(-1).values
        ids.append(int(cands[int(score.argmax())]))
        if ids[-1] == eos:
            break
    return ids[len(prompt) :]


@pytest.mark.parametrize("alpha,k", [(0.6, 4), (0.3, 8)])
def test_batch_of_text_prompts_matches_reference(pair, alpha, k):
    hf, model = pair
    result = model.generate(
        PROMPTS, penalty_alpha=alpha, top_k=k, max_new_tokens=40, stop_at_eot=False,
        return_result=True,
    )  # fmt: skip
    for prompt, got in zip(PROMPTS, result.tokens, strict=True):
        want = reference(hf, model.tokenizer.encode(prompt), alpha, k, 40)
        assert got == want
    assert result.finish_reasons == ["length"] * 3


def test_contrastive_search_padded_ids(pair):
    """The low-level function on a left-padded id batch (padding kept out of the penalty)."""
    hf, model = pair
    lengths = (5, 12, 9)
    ids = torch.randint(0, 50000, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, 12 - n :] = 1
        ids[row, : 12 - n] = EOS
    got = contrastive_search(
        model, ids, mask, penalty_alpha=0.5, top_k=5, max_new_tokens=48, eos_token_id=None
    )
    for row, n in enumerate(lengths):
        assert got[row] == reference(hf, ids[row, 12 - n :].tolist(), 0.5, 5, 48)


def test_with_repetition_penalty(pair):
    hf, model = pair
    prompt = "A B C A B C A B"
    got = model.generate(
        prompt, penalty_alpha=0.4, top_k=6, repetition_penalty=1.5, max_new_tokens=32,
        stop_at_eot=False, return_result=True,
    ).tokens[0]  # fmt: skip
    proc = RepetitionPenaltyLogitsProcessor(1.5)
    assert got == reference(hf, model.tokenizer.encode(prompt), 0.4, 6, 32, processor=proc)


def test_rows_that_end_on_eos(eos_pair):
    hf, model = eos_pair
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    tokens, mask = gl.model.left_pad(ids, EOS)
    got = contrastive_search(model, tokens, mask, penalty_alpha=0.6, top_k=4, max_new_tokens=40)
    want = [reference(hf, p, 0.6, 4, 40, eos=EOS) for p in ids]
    assert got == want
    assert [w[-1] == EOS for w in want] == [True, False, True]  # rows end at different steps
    result = model.generate(
        PROMPTS, penalty_alpha=0.6, top_k=4, max_new_tokens=40, return_result=True
    )
    for row, w in zip(result.tokens, want, strict=True):
        assert row == [t for t in w if t != EOS]
    assert result.finish_reasons == ["stop" if w[-1] == EOS else "length" for w in want]


def test_eos_ids_from_any_iterable(eos_pair):
    """eos_token_id as a set, tuple, array or tensor (or none at all) acts as the list."""
    _, model = eos_pair
    tokens, mask = gl.model.left_pad([model.tokenizer.encode(p) for p in PROMPTS], EOS)
    kw = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=40)
    expect = contrastive_search(model, tokens, mask, eos_token_id=[EOS], **kw)
    assert any(row[-1] == EOS for row in expect)
    for eos in (EOS, {EOS}, (EOS,), np.array([EOS]), torch.tensor([EOS]), range(EOS, EOS + 1)):
        assert contrastive_search(model, tokens, mask, eos_token_id=eos, **kw) == expect
    none = contrastive_search(model, tokens, mask, eos_token_id=None, **kw)
    assert all(len(row) == 40 for row in none)
    for empty in ([], set(), np.array([], dtype=np.int64)):
        assert contrastive_search(model, tokens, mask, eos_token_id=empty, **kw) == none
    for bad in ({1.5}, [EOS + 1], "x"):
        with pytest.raises(GPT2LabError, match="eos_token_id"):
            contrastive_search(model, tokens, mask, eos_token_id=bad, **kw)


def test_stream_matches_generate(pair):
    _, model = pair
    opts = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=24, stop_at_eot=False)
    text = model.generate("It was a dark and stormy night", **opts)
    assert "".join(model.stream("It was a dark and stormy night", **opts)) == text


@pytest.mark.parametrize(
    "opts",
    [
        dict(penalty_alpha=1.5, top_k=4),
        dict(penalty_alpha=-0.1, top_k=4),
        dict(penalty_alpha="high", top_k=4),
        dict(penalty_alpha=0.6),
        dict(penalty_alpha=0.6, top_k=1),
        dict(penalty_alpha=0.6, top_k=4, do_sample=True),
        dict(penalty_alpha=0.6, top_k=4, top_p=0.9),
        dict(penalty_alpha=0.6, top_k=4, temperature=0.7),
        dict(penalty_alpha=0.6, top_k=4, num_beams=2),
    ],
)
def test_bad_options(pair, opts):
    _, model = pair
    with pytest.raises(GPT2LabError):
        model.generate("Hello", max_new_tokens=4, **opts)
