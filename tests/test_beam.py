"""Beam search against transformers' `generate(num_beams=...)` on the same random weights.

Diverse (group) beam search is checked against a plain re-implementation below:
transformers 5 no longer ships it (it lives on the Hub, transformers-community/
group-beam-search, and needs a download plus trust_remote_code).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_model

import gpt2lab as gl
from gpt2lab import GPT2LabError
from gpt2lab.generation.beam import beam_search

EOS = 50256
MAX_NEW = 64


@pytest.fixture(scope="module")
def plain(small_ckpt, hf_small):
    return hf_small, gl.load(small_ckpt)


@pytest.fixture(scope="module")
def eos_pair(tmp_path_factory):
    """A model that often predicts EOS, so hypotheses finish at many different steps:
    the final LayerNorm's bias points along EOS's (tied) embedding."""
    hf = hf_model(seed=0)
    with torch.no_grad():
        w = hf.transformer.wte.weight[EOS]
        hf.transformer.ln_f.bias.copy_(4.0 * w / w.norm())
    path = tmp_path_factory.mktemp("hf_eos")
    hf.save_pretrained(path)
    return hf, gl.load(path)


def prompts(lengths=(5, 12, 9), seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded prompts of different lengths and their attention mask."""
    width = max(lengths)
    ids = torch.randint(
        0, 50000, (len(lengths), width), generator=torch.Generator().manual_seed(seed)
    )
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        ids[row, : width - n] = EOS
    return ids, mask


def hf_beams(hf, ids, mask, **kw) -> list[list[tuple[list[int], float]]]:
    """transformers' hypotheses per prompt: (new tokens, EOS included if it ended on one; score)."""
    out = hf.generate(
        ids, attention_mask=mask, do_sample=False, pad_token_id=EOS,
        output_scores=True, return_dict_in_generate=True, **kw,
    )  # fmt: skip
    T, R = ids.shape[1], kw.get("num_return_sequences", 1)
    n_new = (out.beam_indices != -1).sum(1)  # tokens each hypothesis generated
    hyps = []
    for i, n in enumerate(n_new.tolist()):
        assert (out.sequences[i, T + n :] == EOS).all()  # only padding after the hypothesis
        hyps.append((out.sequences[i, T : T + n].tolist(), float(out.sequences_scores[i])))
    return [hyps[i : i + R] for i in range(0, len(hyps), R)]


def assert_same(ours, theirs):
    assert [[ids for ids, _ in row] for row in ours] == [[ids for ids, _ in row] for row in theirs]
    diff = max(
        abs(a - b)
        for r1, r2 in zip(ours, theirs, strict=True)
        for (_, a), (_, b) in zip(r1, r2, strict=True)
    )
    assert diff < 1e-4, diff


GRID = [(lp, es, r) for lp in (1.0, 0.6) for es in (True, False) for r in (1, 2)]


@pytest.mark.parametrize("which", ["plain", "eos_pair"])
@pytest.mark.parametrize("length_penalty,early_stopping,num_return_sequences", GRID)
def test_matches_transformers(request, which, length_penalty, early_stopping, num_return_sequences):
    hf, model = request.getfixturevalue(which)
    ids, mask = prompts()
    kw = dict(
        num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping,
        num_return_sequences=num_return_sequences, max_new_tokens=MAX_NEW, eos_token_id=EOS,
    )  # fmt: skip
    theirs = hf_beams(hf, ids, mask, **kw)
    ours = beam_search(model, ids, mask, **kw)
    assert_same(ours, theirs)
    if which == "eos_pair":  # the case is only worth something if hypotheses end on EOS
        assert any(ids[-1] == EOS and len(ids) < MAX_NEW for row in ours for ids, _ in row)


@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_early_stopping_never(eos_pair, length_penalty):
    hf, model = eos_pair
    ids, mask = prompts()
    kw = dict(
        num_beams=4, length_penalty=length_penalty, early_stopping="never",
        num_return_sequences=2, max_new_tokens=MAX_NEW, eos_token_id=EOS,
    )  # fmt: skip
    assert_same(beam_search(model, ids, mask, **kw), hf_beams(hf, ids, mask, **kw))


def test_several_eos_ids_and_a_logits_processor(eos_pair):
    """Two EOS ids widen the candidate pool to 3 * num_beams; the processor sees each beam's
    ids (prompt padding included) and works on log-probabilities, as in transformers."""
    from transformers import RepetitionPenaltyLogitsProcessor

    hf, model = eos_pair
    ids, mask = prompts()
    kw = dict(num_beams=4, num_return_sequences=2, max_new_tokens=32, eos_token_id=[EOS, 16601])
    theirs = hf_beams(hf, ids, mask, repetition_penalty=1.5, **kw)
    # transformers' own processor, built as generate() builds it (left padding ignored)
    padding = (mask.repeat_interleave(4, dim=0) != 0).int().argmax(dim=1)
    processor = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=padding)
    assert_same(beam_search(model, ids, mask, logits_processor=processor, **kw), theirs)


def test_eos_ids_from_any_iterable(eos_pair):
    """eos_token_id as a set, tuple, array or tensor ends hypotheses as the list does (the
    pad token is the smallest id of a set: sets are read sorted)."""
    _, model = eos_pair
    ids, mask = prompts()
    kw = dict(num_beams=4, num_return_sequences=2, max_new_tokens=16)
    expect = beam_search(model, ids, mask, eos_token_id=[16601, EOS], **kw)
    for eos in ({EOS, 16601}, (16601, EOS), np.array([16601, EOS]), torch.tensor([16601, EOS])):
        assert beam_search(model, ids, mask, eos_token_id=eos, **kw) == expect
    none = beam_search(model, ids, mask, eos_token_id=None, **kw)
    for empty in ([], (), set(), np.array([], dtype=np.int64)):
        assert beam_search(model, ids, mask, eos_token_id=empty, **kw) == none


# ---- diverse beam search: the algorithm written out plainly, without a KV cache -----


def group_beam_reference(
    hf, ids, mask, *, num_beams, num_beam_groups, diversity_penalty, max_new_tokens,
    length_penalty, early_stopping, num_return_sequences, eos=EOS, pad=EOS,
):  # fmt: skip
    """Diverse beam search (Vijayakumar et al.) with transformers 4's bookkeeping.

    Per prompt, beams form groups of `size`; within a step the groups choose in turn and
    a group's log-probs lose `diversity_penalty` per earlier choice of the same token
    this step. Each group is a small beam search: the 2 * size best (beam, token) pairs,
    EOS ones in the top `size` become finished hypotheses (sum / new_len ** lp), the
    rest run on. A (prompt, group) is done once its `size` finished hypotheses cannot be
    beaten; a done group "chooses" the pad token. Every step re-runs the whole sequences.
    """
    B, T = ids.shape
    G, size = num_beam_groups, num_beams // num_beam_groups
    # beams[b][g]: (tokens incl. prompt, summed log-prob); only a group's first beam is live
    beams = [
        [[(ids[b].tolist(), 0.0 if i == 0 else -1e9) for i in range(size)] for _ in range(G)]
        for b in range(B)
    ]
    finished = [[[] for _ in range(G)] for _ in range(B)]  # (score, new tokens)
    done = [[False] * G for _ in range(B)]

    def add(hyps, new_ids, total, n_new):
        hyps.append((total / n_new**length_penalty, new_ids))
        if len(hyps) > size:  # drop the worst (the first of equal ones)
            hyps.pop(min(range(len(hyps)), key=lambda i: hyps[i][0]))

    def is_done(hyps, best_total, n_new):
        if len(hyps) < size:
            return False
        if early_stopping is True:
            return True
        if early_stopping == "never" and length_penalty > 0:
            n_new = max_new_tokens
        return min(s for s, _ in hyps) >= best_total / n_new**length_penalty

    for step in range(max_new_tokens):
        cur = T + step
        seqs = torch.tensor([beam[0] for b in range(B) for g in range(G) for beam in beams[b][g]])
        new = torch.ones(B * num_beams, step, dtype=mask.dtype)
        full_mask = torch.cat([mask.repeat_interleave(num_beams, 0), new], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = hf(seqs, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        logprobs = torch.log_softmax(logits.float(), -1).view(B, G, size, -1)
        V = logprobs.shape[-1]
        chosen = [[] for _ in range(B)]  # tokens chosen at this step, per prompt
        for g in range(G):
            for b in range(B):
                if done[b][g]:
                    beams[b][g] = [(toks + [pad], 0.0) for toks, _ in beams[b][g]]
                    chosen[b] += [pad] * size
                    continue
                penalty = torch.bincount(torch.tensor(chosen[b], dtype=torch.long), minlength=V)
                sums = torch.tensor([s for _, s in beams[b][g]], dtype=torch.float32)
                total = ((logprobs[b, g] - diversity_penalty * penalty) + sums[:, None]).view(-1)
                top_totals, top = torch.topk(total, 2 * size)
                running = []
                for rank, (s, index) in enumerate(
                    zip(top_totals.tolist(), top.tolist(), strict=True)
                ):
                    beam, token = divmod(index, V)
                    toks = beams[b][g][beam][0]
                    if token == eos:
                        if rank < size:
                            add(finished[b][g], toks[T:] + [token], s, cur + 1 - T)
                    else:
                        running.append((toks + [token], s))
                    if len(running) == size:
                        break
                beams[b][g] = running
                chosen[b] += [toks[-1] for toks, _ in running]
                done[b][g] = is_done(finished[b][g], top_totals.max().item(), cur + 1 - T)
        if all(all(row) for row in done):
            break
    out = []
    for b in range(B):
        for g in range(G):
            if not done[b][g]:
                for toks, s in beams[b][g]:
                    add(finished[b][g], toks[T:], s, len(toks) - T)
        ranked = sorted((h for g in range(G) for h in finished[b][g]), key=lambda h: h[0])
        out.append([(toks, s) for s, toks in reversed(ranked[-num_return_sequences:])])
    return out


@pytest.mark.parametrize(
    "num_beam_groups,early_stopping,length_penalty",
    [(2, False, 1.0), (2, True, 0.6), (4, "never", 1.0)],
)
def test_group_beam_search_matches_reference(
    eos_pair, num_beam_groups, early_stopping, length_penalty
):
    hf, model = eos_pair
    ids, mask = prompts()
    kw = dict(
        num_beams=4, num_beam_groups=num_beam_groups, diversity_penalty=1.0,
        max_new_tokens=24, length_penalty=length_penalty, early_stopping=early_stopping,
        num_return_sequences=2,
    )  # fmt: skip
    ours = beam_search(model, ids, mask, eos_token_id=EOS, **kw)
    assert_same(ours, group_beam_reference(hf, ids, mask, **kw))
    plain_kw = {k: v for k, v in kw.items() if k not in ("num_beam_groups", "diversity_penalty")}
    assert ours != beam_search(model, ids, mask, eos_token_id=EOS, **plain_kw)  # diversity acts


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2.5), "num_beams must be an integer >= 1"),
        (dict(num_beams=4, num_return_sequences=5), "cannot exceed num_beams"),
        (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "divisible"),
        (dict(num_beams=4, num_beam_groups=2), "diversity_penalty > 0"),
        (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
        (dict(num_beams=2, max_new_tokens=200), "exceeds the context"),
        (dict(num_beams=2, eos_token_id={1.5}), "eos_token_id"),
        (dict(num_beams=2, eos_token_id=np.array([[EOS]])), "eos_token_id"),
        (dict(num_beams=2, eos_token_id=[EOS + 1]), "eos_token_id"),
        (dict(num_beams=10**6), "beam search with 1000000 beams x 3 prompts"),
    ],
)
def test_bad_arguments(plain, options, message):
    _, model = plain
    ids, mask = prompts()
    with pytest.raises(GPT2LabError, match=message):
        beam_search(model, ids, mask, **{"max_new_tokens": 4, **options})
