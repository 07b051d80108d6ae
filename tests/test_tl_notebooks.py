"""TransformerLens' Main_Demo and Exploratory_Analysis_Demo, cell by cell, with only the
import line changed.

Each cell below is written once against a namespace `ns` holding what a notebook imports
(`HookedTransformer`, `utils`, `patching`, `FactoredMatrix`, `ActivationCache`) and the
model it loads (`ns.model = HookedTransformer.from_pretrained("gpt2-small")`). It runs
twice: with `ns` from `transformer_lens` 3.9 and from `gpt2lab.tl`, both loading the same
random GPT-2 from a tests-made Hugging Face cache (offline), and everything it returns
(tensors, labels, strings, numbers) must agree: tensors within 1e-4 (1e-5 for the
pattern, loss and weight checks, as TransformerLens' own tests use), the rest exactly.
These are our own versions of what the notebooks do, not their text.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from gpt2lab.errors import GPT2LabError

TL = pytest.importorskip("transformer_lens", reason="transformer-lens 3.x is the reference")

# IOI prompts as in Exploratory_Analysis_Demo: each sentence twice, the subject swapped,
# so that corrupting a prompt is swapping it with its neighbour
SENTENCES = [
    "When{} and{} went to the shops,{} gave the bag to",
    "After{} and{} went to the park,{} gave a ball to",
]
NAMES = [(" John", " Mary"), (" Tom", " James")]


def _prompts():
    prompts, answers = [], []
    for sentence, (a, b) in zip(SENTENCES, NAMES, strict=True):
        for subject, other in ((a, b), (b, a)):
            prompts.append(sentence.format(a, b, subject))
            answers.append((other, subject))  # (correct, incorrect)
    return prompts, answers


PROMPTS, ANSWERS = _prompts()


# ---- the two namespaces ------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME holding one random GPT-2 as "gpt2" and "openai-community/gpt2", offline."""
    from test_tl_compat import _save

    home = tmp_path_factory.mktemp("notebooks_hf_home")
    for repo in ("openai-community/gpt2", "gpt2"):
        _save(home / "hub", repo, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home / "hub"


@pytest.fixture(scope="module")
def theirs(hub, hf_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        from transformer_lens import (
            ActivationCache,
            FactoredMatrix,
            HookedTransformer,
            patching,
            utils,
        )

        model = HookedTransformer.from_pretrained(
            "gpt2-small", tokenizer=hf_tokenizer, device="cpu", cache_dir=str(hub),
            local_files_only=True,
        )  # fmt: skip
    return SimpleNamespace(
        HookedTransformer=HookedTransformer, utils=utils, patching=patching,
        FactoredMatrix=FactoredMatrix, ActivationCache=ActivationCache, model=model, name="TL",
    )  # fmt: skip


@pytest.fixture(scope="module")
def ours(hub):
    from gpt2lab.tl import ActivationCache, FactoredMatrix, HookedTransformer, patching, utils

    model = HookedTransformer.from_pretrained("gpt2-small", device="cpu")
    return SimpleNamespace(
        HookedTransformer=HookedTransformer, utils=utils, patching=patching,
        FactoredMatrix=FactoredMatrix, ActivationCache=ActivationCache, model=model,
        name="gpt2lab",
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(autouse=True)
def _no_hooks_left(theirs, ours):
    yield
    for ns in (theirs, ours):
        ns.model.reset_hooks(including_permanent=True)


def run_both(cell, theirs, ours, tol=1e-4, **kwargs):
    """Run `cell(ns)` on both namespaces and compare what it returns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cell(theirs, **kwargs)
    got = cell(ours, **kwargs)
    compare(got, expected, tol, "result")
    return got, expected


def compare(got, expected, tol, where):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), (where, type(got))
        assert got.shape == expected.shape, (where, got.shape, expected.shape)
        if expected.dtype in (torch.bool, torch.int64, torch.int32):
            assert torch.equal(got.cpu(), expected.cpu()), where
        else:
            got, expected = got.cpu().double(), expected.cpu().double()
            assert torch.equal(got.isinf(), expected.isinf()), where  # masked scores
            finite = expected.isfinite()
            diff = (got[finite] - expected[finite]).abs().max().item()
            assert diff < tol, (where, diff)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for k in expected:
            compare(got[k], expected[k], tol, f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), (where, got, expected)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            compare(g, e, tol, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert abs(got - expected) < tol, (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


def printed(fn, *args, **kwargs) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    return out.getvalue()


# ---- Main_Demo ---------------------------------------------------------------------------
def cell_tokenization(ns):
    model = ns.model
    text = "Hello world, this is TransformerLens"
    names = ["When John and Mary went", "Claire"]
    return dict(
        tokens=model.to_tokens(text),
        no_bos=model.to_tokens(text, prepend_bos=False),
        padded=model.to_tokens(names),  # right padding, BOS first
        padded_left=model.to_tokens(names, padding_side="left"),
        str_tokens=model.to_str_tokens(text),
        str_tokens_no_bos=model.to_str_tokens(text, prepend_bos=False),
        str_of_tokens=model.to_str_tokens(model.to_tokens(text)),
        single=model.to_single_token(" Mary"),
        string=model.to_string(model.to_tokens(text)),
        first_mary=model.get_token_position(" Mary", "John and Mary met Mary"),
        last_mary=model.get_token_position(" Mary", "John and Mary met Mary", mode="last"),
        bos_id=model.tokenizer.bos_token_id,
        pad_id=model.tokenizer.pad_token_id,
        n_layers=model.cfg.n_layers,
        d_head=model.cfg.d_head,
    )


def test_tokenization(theirs, ours):
    run_both(cell_tokenization, theirs, ours)


def cell_prepend_bos_gotcha(ns):
    model = ns.model
    logits_bos = model("Claire and Mary went", prepend_bos=True)
    logits_no_bos = model("Claire and Mary went", prepend_bos=False)
    return logits_bos[0, 1:], logits_no_bos[0]  # the same tokens, another first position


def test_prepend_bos_changes_the_logits(theirs, ours):
    (got_bos, got_no), _ = run_both(cell_prepend_bos_gotcha, theirs, ours)
    assert (got_bos - got_no).abs().max() > 1e-3


def cell_loss(ns):
    model = ns.model
    text = "The first thing you need to figure out is *how* things are tokenized."
    tokens = model.to_tokens(text)
    loss, per_token = model(text, return_type="loss"), model(text, return_type="loss",
                                                            loss_per_token=True)  # fmt: skip
    logits, both_loss = model(text, return_type="both")
    return dict(
        loss=loss, per_token=per_token, both_loss=both_loss, logits=logits,
        loss_fn=model.loss_fn(logits, tokens, per_token=True),
        none=model(text, return_type=None),
    )  # fmt: skip


def test_loss(theirs, ours):
    got, _ = run_both(cell_loss, theirs, ours, tol=1e-5)
    assert got["none"] is None


def cell_cache(ns):
    """run_with_cache(remove_batch_dim=True), the cache's key forms, and the layer-0
    pattern recomputed from q and k (Main_Demo's "caching all activations")."""
    model, utils = ns.model, ns.utils
    tokens = model.to_tokens("Natural language processing tasks, such as question answering")
    logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    pattern = cache["pattern", 0, "attn"]
    q, k = cache["q", 0], cache["k", 0]
    seq_len = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) / model.cfg.d_head**0.5
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    recomputed = scores.masked_fill(mask, -1e9).softmax(-1)
    torch.testing.assert_close(recomputed, pattern)
    assert torch.equal(cache["blocks.0.attn.hook_pattern"], pattern)
    assert torch.equal(cache[utils.get_act_name("pattern", 0)], pattern)
    assert torch.equal(cache["attn", 0], pattern)
    return dict(
        logits=logits, pattern=pattern, scores=cache["attn_scores", 0], z=cache["z", 1],
        resid=cache["resid_post", -1], scale=cache["scale", 1, "ln2"],
        post=cache[utils.get_act_name("post", 1)], keys=len(cache),
    )  # fmt: skip


def test_cache(theirs, ours):
    run_both(cell_cache, theirs, ours, tol=1e-5)


def cell_pattern_from_a_short_run(ns):
    """Main_Demo: the pattern of a full run_with_cache equals that of a names_filter +
    stop_at_layer run."""
    model = ns.model
    tokens = model.to_tokens("The pattern of one layer, cached alone")
    _, full = model.run_with_cache(tokens)
    _, short = model.run_with_cache(
        tokens, names_filter=["blocks.0.attn.hook_pattern"], stop_at_layer=1
    )
    assert torch.equal(full["pattern", 0], short["pattern", 0]), ns.name
    return short["pattern", 0], list(short.keys())


def test_pattern_from_a_short_run_is_equal(theirs, ours):
    run_both(cell_pattern_from_a_short_run, theirs, ours, tol=1e-5)


def cell_head_ablation(ns):
    """Main_Demo: zero one head's values; the loss before and after."""
    model, utils = ns.model, ns.utils
    tokens = model.to_tokens("Ablating a head changes the loss of the model on this text.")
    layer_to_ablate, head_index_to_ablate = 0, 2

    def head_ablation_hook(value, hook):
        value[:, :, head_index_to_ablate, :] = 0.0
        return value

    original_loss = model(tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(
        tokens, return_type="loss",
        fwd_hooks=[(utils.get_act_name("v", layer_to_ablate), head_ablation_hook)],
    )  # fmt: skip

    # every head in a set, across layers: one hook on every hook_z, reading hook.layer()
    heads = {0: [1], 1: [0, 3]}

    def ablate_heads(z, hook):
        z[:, :, heads[hook.layer()]] = 0.0
        return z

    both_layers = model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(lambda name: name.endswith("hook_z"), ablate_heads)]
    )
    return original_loss, ablated_loss, both_layers


def test_head_ablation(theirs, ours):
    (original, ablated, both_layers), _ = run_both(cell_head_ablation, theirs, ours, tol=1e-5)
    assert abs(original - ablated) > 1e-3 and abs(original - both_layers) > 1e-3


def cell_induction(ns):
    """Main_Demo: a repeated random sequence; per-token loss on each half and induction
    scores from the patterns (a hook on every hook_pattern, via names_filter)."""
    model = ns.model
    seq_len, batch_size = 30, 4
    generator = torch.Generator().manual_seed(0)
    random_tokens = torch.randint(1000, 10000, (batch_size, seq_len), generator=generator)
    bos_tokens = torch.ones(batch_size, 1).long() * model.tokenizer.bos_token_id
    repeated_tokens = torch.cat([bos_tokens, random_tokens, random_tokens], dim=1)

    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    loss_by_position = correct_log_probs.mean(0)
    first_half, second_half = loss_by_position[:seq_len].mean(), loss_by_position[seq_len:].mean()

    induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads))

    def induction_score_hook(pattern, hook):
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_score_store[hook.layer(), :] = induction_stripe.mean((0, 2))

    def pattern_hook_names_filter(name):
        return name.endswith("pattern")

    out = model.run_with_hooks(
        repeated_tokens, return_type=None,
        fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)],
    )  # fmt: skip
    assert out is None
    _, cache = model.run_with_cache(repeated_tokens, names_filter=pattern_hook_names_filter)
    from_cache = torch.stack(
        [
            cache["pattern", layer].diagonal(dim1=-2, dim2=-1, offset=1 - seq_len).mean((0, 2))
            for layer in range(model.cfg.n_layers)
        ]
    )
    return dict(
        loss_by_position=loss_by_position, first_half=first_half, second_half=second_half,
        scores=induction_score_store, from_cache=from_cache, cached=sorted(cache.keys()),
    )  # fmt: skip


def test_induction(theirs, ours):
    got, _ = run_both(cell_induction, theirs, ours)
    assert torch.equal(got["scores"], got["from_cache"])


def cell_factored_matrix(ns):
    """Main_Demo's FactoredMatrix section: a small product, then model.OV / model.QK, the
    OV copying scores from eigenvalues and the full OV circuit W_E @ OV @ W_U."""
    model, FactoredMatrix = ns.model, ns.FactoredMatrix
    generator = torch.Generator().manual_seed(1)
    A, B = torch.randn(5, 2, generator=generator), torch.randn(2, 5, generator=generator)
    AB = FactoredMatrix(A, B)
    small = dict(
        norm=AB.norm(), AB=AB.AB, BA=AB.BA, S=AB.S, T=AB.T.AB, shape=tuple(AB.shape),
        eig=AB.eigenvalues.abs().sort().values, rdim=AB.rdim, ldim=AB.ldim, mdim=AB.mdim,
    )  # fmt: skip
    OV, QK = model.OV, model.QK
    eigenvalues = OV.eigenvalues
    copying_score = eigenvalues.sum(dim=-1).real / eigenvalues.abs().sum(dim=-1)
    full_OV_circuit = model.embed.W_E @ OV @ model.unembed.W_U
    indices = torch.randint(1000, 10000, (50,), generator=generator)
    sample = full_OV_circuit[:, :, indices][:, :, :, indices].AB
    return dict(
        small=small,
        ov_norm=OV.norm(), qk_norm=QK.norm(), qk_corner=QK[1, 2].get_corner(5),
        ov_shape=tuple(OV.shape), copying=copying_score,
        eig_abs=eigenvalues.abs().sort(-1).values,
        corner=full_OV_circuit[1, 0].get_corner(4), full_shape=tuple(full_OV_circuit.shape),
        top1=(sample.argmax(dim=-2) == torch.arange(50)).float().mean(-1),
        W_Q=model.blocks[0].attn.W_Q, W_E=model.W_E[:100], W_U=model.W_U[:, :100],
    )  # fmt: skip


def test_factored_matrix(theirs, ours):
    run_both(cell_factored_matrix, theirs, ours)


def cell_generate(ns):
    """Main_Demo's generation, greedy, with TransformerLens' arguments: text in, text out
    (the prompt included), and tokens in, tokens out. return_type is spelled out: without
    it gpt2lab returns only the continuation (see test_generate_default_return)."""
    model = ns.model
    prompt = "The capital of France is"
    text = model.generate(prompt, max_new_tokens=8, temperature=0, verbose=False,
                          return_type="input")  # fmt: skip
    as_str = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False,
                            return_type="str")  # fmt: skip
    tokens = model.to_tokens(prompt)
    as_tokens = model.generate(tokens, max_new_tokens=8, do_sample=False, verbose=False,
                               stop_at_eos=False, use_past_kv_cache=True, return_type="input")  # fmt: skip
    batch = model.generate(["Once upon a time", "The quick brown fox jumped"], max_new_tokens=5,
                           do_sample=False, verbose=False, return_type="tokens")  # fmt: skip
    batch_text = model.generate(["Once upon a time", "The quick brown fox jumped"],
                                max_new_tokens=5, temperature=0, verbose=False,
                                return_type="str")  # fmt: skip
    return text, as_str, as_tokens, batch, batch_text


def test_generate(theirs, ours):
    (text, as_str, tokens, batch, batch_text), _ = run_both(cell_generate, theirs, ours)
    assert text.startswith("The capital of France is") and text == as_str
    assert tokens.shape == (1, 6 + 8) and batch.shape[0] == 2 and len(batch_text) == 2


def test_generate_default_return(theirs, ours):
    """A model from gpt2lab.tl's loaders generates with TransformerLens' defaults (10 new
    tokens, sampled, the prompt returned with its continuation); gpt2lab.load's model
    keeps gpt2lab's (greedy, the continuation only)."""
    from gpt2lab.generation import generate

    prompt = "The capital of France is"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = theirs.model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    assert ours.model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False) == full
    # sampled by default: what gpt2lab draws with do_sample=True and the same seed
    sampled = ours.model.generate(prompt, seed=3)
    assert sampled == prompt + generate(ours.model, prompt, do_sample=True, seed=3,
                                        max_new_tokens=10)  # fmt: skip
    assert sampled != prompt + generate(ours.model, prompt, max_new_tokens=10)  # not greedy
    continuation = generate(ours.model, prompt, max_new_tokens=8)  # gpt2lab's defaults
    assert full == prompt + continuation


def test_generate_stops_rows_as_transformer_lens_does(theirs, ours):
    """A row that ends on <|endoftext|> is filled with it (tokens) and decodes without it."""
    prompts = ["Once upon a time", "The quick brown fox jumped"]
    out = {}
    for ns in (theirs, ours):
        model, steps = ns.model, []
        eot_direction = model.W_U[:, model.tokenizer.eos_token_id]

        def end_first_row_at_second_token(x, hook, steps=steps, direction=eot_direction):
            if len(steps) == 1:  # one call for the prompt, then one per new token
                x[0, -1] = 100 * direction
            steps.append(x.shape[1])
            return x

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_hook("ln_final.hook_normalized", end_first_row_at_second_token)
            out[ns.name] = []
            for kind in ("tokens", "str"):
                steps.clear()
                out[ns.name].append(model.generate(
                    prompts, max_new_tokens=4, do_sample=False, verbose=False, return_type=kind
                ))  # fmt: skip
            model.reset_hooks()
    compare(out["gpt2lab"], out["TL"], 0, "generate")
    tokens, texts = out["gpt2lab"]
    eot = ours.model.tokenizer.eot_token
    assert tokens[0, -3:].tolist() == [eot] * 3 and eot not in tokens[1, -4:].tolist()
    assert texts[0] == ours.model.to_string(tokens[0, :-3]).replace("<|endoftext|>", "")


def test_generate_refuses_what_it_cannot_match(ours):
    model = ours.model
    for kwargs, says in [
        (dict(return_type="embeds"), "return_type='embeds' is not supported"),
        (dict(return_type="text"), "return_type must be one of input, str, tokens"),
        (dict(stop_at_eos=True, stop_at_eot=False), "stop_at_eos"),
        (dict(return_type="str", return_result=True), "return_result"),
        (dict(verbose="yes"), "verbose"),
    ]:
        with pytest.raises(GPT2LabError) as info:
            model.generate("Hi", max_new_tokens=2, **kwargs)
        assert says in str(info.value) and "\n" not in str(info.value), info.value


def _ranks(out: str) -> str:
    ranks = out.split("Ranks of the answer tokens:")[1].removeprefix("[/b]")
    return re.sub(r"\s+", " ", ranks).replace("( ", "(").strip()


def cell_test_prompt(ns):
    model, utils = ns.model, ns.utils
    out = printed(utils.test_prompt, PROMPTS[0], ANSWERS[0][0].strip(), model, prepend_bos=True)
    several = printed(utils.test_prompt, PROMPTS[0], ["Mary", "John"], model)
    lines = re.findall(r"Rank: (\d+)\s+Logit: +(-?[\d.]+) Prob: +([\d.]+)%", out)
    return _ranks(out), _ranks(several), lines


def test_test_prompt(theirs, ours):
    run_both(cell_test_prompt, theirs, ours)


# ---- Exploratory_Analysis_Demo -----------------------------------------------------------
def _ioi(ns):
    model = ns.model
    answer_tokens = torch.tensor(
        [[model.to_single_token(a) for a in pair] for pair in ANSWERS], device=model.cfg.device
    )
    tokens = model.to_tokens(PROMPTS, prepend_bos=True)
    return model, tokens, answer_tokens


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    return answer_logit_diff if per_prompt else answer_logit_diff.mean()


def cell_logit_attribution(ns):
    """Direct logit attribution: the final residual through ln_final onto the logit-diff
    direction, then by accumulated residual, by layer and by head."""
    model, tokens, answer_tokens = _ioi(ns)
    original_logits, cache = model.run_with_cache(tokens)
    per_prompt = logits_to_ave_logit_diff(original_logits, answer_tokens, per_prompt=True)

    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[:, -1, :]
    scaled = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    average_logit_diff = (scaled * logit_diff_directions).sum(-1).mean()

    def residual_stack_to_logit_diff(residual_stack, cache):
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return (scaled_residual_stack * logit_diff_directions).sum(-1).mean(-1)

    accumulated, acc_labels = cache.accumulated_resid(
        layer=-1, incl_mid=True, pos_slice=-1, return_labels=True
    )
    per_layer, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_head, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head, cache).reshape(
        model.cfg.n_layers, model.cfg.n_heads
    )
    return dict(
        per_prompt=per_prompt, directions=answer_residual_directions,
        average_logit_diff=average_logit_diff,
        by_position=residual_stack_to_logit_diff(accumulated, cache), acc_labels=acc_labels,
        by_layer=residual_stack_to_logit_diff(per_layer, cache), layer_labels=layer_labels,
        by_head=per_head_logit_diffs, head_labels=head_labels,
    )  # fmt: skip


def test_logit_attribution(theirs, ours):
    got, _ = run_both(cell_logit_attribution, theirs, ours)
    torch.testing.assert_close(got["average_logit_diff"], got["per_prompt"].mean())


def _corrupted(tokens):
    """Each prompt swapped with its neighbour: same names, the other subject."""
    return tokens[[(i + 1) if i % 2 == 0 else (i - 1) for i in range(len(tokens))]]


def cell_activation_patching(ns):
    """Patch the clean resid_pre into the corrupted run, layer by position, with a
    normalised logit-diff metric: by hand with hooks, then with patching's functions."""
    model, utils, patching = ns.model, ns.utils, ns.patching
    model, clean_tokens, answer_tokens = _ioi(ns)
    corrupted_tokens = _corrupted(clean_tokens)
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits, _ = model.run_with_cache(corrupted_tokens)
    clean_baseline = logits_to_ave_logit_diff(clean_logits, answer_tokens).item()
    corrupted_baseline = logits_to_ave_logit_diff(corrupted_logits, answer_tokens).item()

    def ioi_metric(logits, answer_tokens=answer_tokens):
        return (logits_to_ave_logit_diff(logits, answer_tokens) - corrupted_baseline) / (
            clean_baseline - corrupted_baseline
        )

    def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
        corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
        return corrupted_residual_component

    n_layers, n_pos = model.cfg.n_layers, clean_tokens.shape[1]
    by_hand = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        for position in range(n_pos):
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=clean_cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens,
                fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)],
                return_type="logits",
            )
            by_hand[layer, position] = ioi_metric(patched_logits)

    resid_pre = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
    head_out = patching.get_act_patch_attn_head_out_all_pos(
        model, corrupted_tokens, clean_cache, ioi_metric
    )
    return dict(
        baselines=(clean_baseline, corrupted_baseline), by_hand=by_hand, resid_pre=resid_pre,
        head_out=head_out,
    )  # fmt: skip


def test_activation_patching(theirs, ours):
    got, _ = run_both(cell_activation_patching, theirs, ours)
    clean, corrupted = got["baselines"]
    assert abs(clean - corrupted) > 0.1  # a metric worth normalising
    torch.testing.assert_close(got["by_hand"], got["resid_pre"], atol=1e-5, rtol=0)
    # BOS is the same token in both runs: patching it changes nothing, in every layer
    assert got["resid_pre"][:, 0].abs().max() < 1e-5
    assert got["resid_pre"].abs().max() > 0.1


def cell_in_place_hooks_with_gradients(ns):
    """Hooks that write into q, k and v in place (Main_Demo's ablation style) keep
    autograd working: the loss's gradient reaches the embedding."""
    model = ns.model
    tokens = model.to_tokens("Gradients flow through an ablated head")

    def zero_head(x, hook):
        x[:, :, hook.layer() + 1] = 0.0
        return x

    loss = model.run_with_hooks(
        tokens, return_type="loss",
        fwd_hooks=[(lambda name: name.split(".")[-1] in ("hook_q", "hook_k", "hook_v"), zero_head)],
    )  # fmt: skip
    model.zero_grad(set_to_none=True)
    loss.backward()
    grad = model.embed.W_E.grad[tokens[0]].clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grad


def test_in_place_hooks_with_gradients(theirs, ours):
    run_both(cell_in_place_hooks_with_gradients, theirs, ours, tol=1e-5)
