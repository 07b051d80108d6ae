"""The native decoding step (kernels/step.py + step.cpp): one token of one sequence through
every block in one call. It must give what the eager blocks give (float32 to rounding,
bf16 and int8 to their own rounding), transformers' greedy tokens in float32, and step
aside wherever something could tell the difference (hooks, padding, batches, autograd)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import hf_model

import gpt2lab
from gpt2lab import kernels
from gpt2lab.kernels import choose, native
from gpt2lab.kernels import step as kstep
from gpt2lab.kernels.choose import Chooser
from gpt2lab.quantize import quantize

KIND_FLAGS = {"f32": "f32", "bf16": "bf16", "int8": "int8"}


def _needs(kind: str) -> None:
    if not native.cpu_supports(kind) or native.step_class(kind) is None:
        pytest.skip(f"no native {kind} kernels on this CPU")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints from transformers of several shapes: d_head 16 / 32 / 64, both GELUs,
    attention scaled by the inverse layer index (GPT-2's option, Mistral-style)."""
    shapes = {
        "small": dict(),
        "wide": dict(n_embd=256, n_head=4, n_layer=3, vocab_size=1000),
        "erf": dict(n_embd=128, n_head=4, n_layer=2, activation_function="gelu", vocab_size=1000),
        "inv": dict(
            n_embd=128, n_head=2, n_layer=3, scale_attn_by_inverse_layer_idx=True, vocab_size=1000
        ),  # fmt: skip
    }
    out = {}
    for name, over in shapes.items():
        path = tmp_path_factory.mktemp(f"step_{name}")
        hf = hf_model(seed=1, **over)
        hf.save_pretrained(path)
        out[name] = (path, hf)
    return out


def _model(path, kind: str) -> gpt2lab.GPT2:
    m = gpt2lab.load(str(path)).eval()
    if kind == "bf16":
        return m.to(torch.bfloat16)
    if kind == "int8":
        return quantize(m, "int8")
    return m


def _decode(model, prompt, steps: int, mode: str, feed: torch.Tensor | None = None):
    """Steps one token at a time with the step forced to `mode`: greedy, or the tokens
    `feed` when given (so that both modes see the same inputs); the logits of each
    step, the tokens fed, and the cache."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    with torch.no_grad():
        logits = model(prompt, cache=cache)[:, -1:]
        out, toks = [], []
        for i in range(steps):
            tok = (
                logits[:, -1].float().argmax(-1, keepdim=True)
                if feed is None
                else feed[:, i : i + 1]
            )
            assert tok.shape == (prompt.shape[0], 1)
            toks.append(tok)
            with kernels.force("step", mode):
                logits = model(tok, cache=cache)
            out.append(logits.float())
    return torch.cat(out, 1), torch.cat(toks, 1), cache


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("shape", ["small", "wide", "erf", "inv"])
def test_the_native_step_is_the_eager_step(ckpts, kind, shape):
    """float32: the eager logits but for the order of sums (and the same greedy tokens).
    bf16 / int8: rounded at the same points as the eager step, but a sum in another
    order can land one rounding on the other side, and random weights amplify that
    through the layers; so each is held to the float32 model: the native step must be
    about as close to it as the eager step is."""
    _needs(kind)
    model = _model(ckpts[shape][0], kind)
    prompt = torch.randint(0, model.cfg.d_vocab, (1, 9), generator=torch.Generator().manual_seed(3))
    eager, eager_toks, eager_cache = _decode(model, prompt, 12, "eager")
    fast, _, fast_cache = _decode(model, prompt, 12, "native", feed=eager_toks)
    runner = fast_cache.__dict__["_native_step"][1]
    assert runner is not None and runner.kind == kind  # the native step did run
    scale = eager.abs().max().item()
    if kind == "f32":
        assert (eager - fast).abs().max().item() <= 1e-5 * scale
        assert torch.equal(_decode(model, prompt, 12, "native")[1], eager_toks)
        n = prompt.shape[1] + 11  # the keys and values it wrote are the eager ones
        for a, b in [(eager_cache.k, fast_cache.k), (eager_cache.v, fast_cache.v)]:
            a, b = a[:, :, :, :n], b[:, :, :, :n]
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
        return
    ref = _decode(_model(ckpts[shape][0], "f32"), prompt, 12, "eager", feed=eager_toks)[0]
    err_eager = (eager - ref).abs().max().item()
    err_fast = (fast - ref).abs().max().item()
    print(f"{kind} {shape}: |eager - f32| {err_eager:.4f}, |native - f32| {err_fast:.4f}")
    assert err_fast <= 1.5 * err_eager + 2**-8 * scale


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [2, 5])
def test_a_batch_without_padding_steps_as_each_row_alone(ckpts, kind, rows):
    """Rows of a batch are independent: each row's native logits are its eager logits
    (float32: to the order of sums; bf16 / int8: as close to float32 as eager is)."""
    _needs(kind)
    model = _model(ckpts["wide"][0], kind)
    prompt = torch.randint(0, 1000, (rows, 6), generator=torch.Generator().manual_seed(rows))
    feed = torch.randint(0, 1000, (rows, 8), generator=torch.Generator().manual_seed(9))
    eager, _, _ = _decode(model, prompt, 8, "eager", feed=feed)
    fast, _, cache = _decode(model, prompt, 8, "native", feed=feed)
    assert cache.__dict__["_native_step"][1] is not None
    scale = eager.abs().max().item()
    if kind == "f32":
        assert (eager - fast).abs().max().item() <= 1e-5 * scale
        return
    ref = _decode(_model(ckpts["wide"][0], "f32"), prompt, 8, "eager", feed=feed)[0]
    assert (fast - ref).abs().max().item() <= 1.5 * (eager - ref).abs().max().item() + 2**-8 * scale


def test_float32_greedy_tokens_through_the_native_step_are_transformers(ckpts):
    _needs("f32")
    path, hf = ckpts["wide"]
    model = _model(path, "f32")
    prompt = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(5))
    with kernels.force("step", "native"):
        ours = model.generate(prompt, max_new_tokens=20, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.as_tensor(ours).reshape(1, -1)[:, -20:], theirs[:, -20:])


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8"])
def test_results_do_not_depend_on_the_thread_count(ckpts, kind):
    """Threads split output columns and heads, never a sum: bit-identical results."""
    _needs(kind)
    model = _model(ckpts["wide"][0], kind)
    prompt = torch.arange(1, 10)[None]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _decode(model, prompt, 6, "native")[0]
        torch.set_num_threads(2)
        two = _decode(model, prompt, 6, "native")[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_threads_decoding_their_own_caches_get_what_each_gets_alone(ckpts):
    """The server's case: one model, one cache per request, steps from many threads."""
    _needs("f32")
    model = _model(ckpts["wide"][0], "f32")
    prompts = [torch.tensor([[i + 1, 2 * i + 3, 7]]) for i in range(4)]
    alone = [_decode(model, p, 8, "native")[0] for p in prompts]
    got: list = [None] * 4

    def work(i):
        got[i] = _decode(model, prompts[i], 8, "native")[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, got, strict=True):
        assert torch.equal(a, b)


def _plan(model, cache, B=1, T=1, key_mask=None, stop_at_layer=None, return_type="logits"):
    with kernels.force("step", "native"):
        return kstep.plan(model, cache, B, T, key_mask, stop_at_layer, return_type)


def test_the_step_applies_only_where_nothing_could_tell(ckpts):
    _needs("f32")
    path = ckpts["small"][0]
    model = _model(path, "f32")
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        assert _plan(model, cache) is not None
        assert _plan(model, None) is None  # no cache
        assert _plan(model, cache, T=2) is None  # a prompt, not a step
        assert _plan(model, model.new_cache(2, 8), B=2) is not None  # a batch without padding
        assert _plan(model, model.new_cache(17, 8), B=17) is None  # past the kernels' rows
        assert _plan(model, cache, key_mask=torch.ones(1, 3, dtype=torch.bool)) is None  # padding
        assert _plan(model, cache, stop_at_layer=1) is None
        for other_result in (None, "loss", "both"):
            assert _plan(model, cache, return_type=other_result) is None
        odd = model.new_cache(1, 8)  # cache tensors replaced by something it cannot read
        odd.k = odd.k.transpose(3, 4).contiguous().transpose(3, 4)
        assert _plan(model, odd) is None
        with kernels.force("step", "eager"):
            assert kstep.plan(model, cache, 1, 1, None, None, "logits") is None
        # modules that are not the model's own: a replaced linear layer, an LN-free model
        other = _model(path, "f32")
        other.blocks[1].mlp.c_fc = torch.nn.Linear(64, 256)
        assert _plan(other, other.new_cache(1, 8)) is None
        lnfree = _model(path, "f32")
        lnfree.blocks[0].ln1.fixed_scale = 1.0
        assert _plan(lnfree, lnfree.new_cache(1, 8)) is None
        relu = gpt2lab.GPT2(
            gpt2lab.GPT2Config(
                d_model=64, n_heads=4, n_layers=1, d_vocab=50, n_ctx=16, act_fn="relu"
            )
        ).eval()
        assert _plan(relu, relu.new_cache(1, 8)) is None
    assert _plan(model, cache) is None  # autograd on


def test_the_environment_forces_the_eager_step(ckpts, monkeypatch):
    _needs("f32")
    model = _model(ckpts["small"][0], "f32")
    monkeypatch.setenv("GPT2LAB_KERNELS", "step=eager")
    with torch.no_grad():
        assert kstep.plan(model, model.new_cache(1, 8), 1, 1, None, None, "logits") is None


def test_a_hooked_model_runs_every_block_eagerly(ckpts):
    """A hook on any block must fire on every step (the native step would skip it)."""
    _needs("f32")
    model = _model(ckpts["small"][0], "f32")
    seen = []
    model.add_hook("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape) or x)
    try:
        with kernels.force("step", "native"):
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    finally:
        model.reset_hooks()
    assert len(seen) == 5  # the prompt, then four single-token steps


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steering_steps_every_token_eagerly(ckpts, positions):
    """Steering hooks only write, so the fused kernels stay on; but the native step has
    no hook points: a steered generation must be the eager one, and differ from plain."""
    _needs("f32")
    from gpt2lab.steering import SteeringVector

    model = _model(ckpts["wide"][0], "f32")
    direction = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 4
    v = SteeringVector({"blocks.1.hook_resid_post": direction})
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = {}
    for mode in ("native", "eager"):
        with kernels.force("step", mode), model.steer(v, 3.0, positions=positions):
            out[mode] = model.generate(prompt, max_new_tokens=10, do_sample=False)
    with kernels.force("step", "native"):
        plain = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(torch.as_tensor(out["native"]), torch.as_tensor(out["eager"]))
    assert not torch.equal(torch.as_tensor(out["native"]), torch.as_tensor(plain))


def test_whether_it_runs_is_decided_by_timing_both(ckpts, tmp_path, monkeypatch):
    """The case is the chooser's: both candidates timed, the faster kept (not asserted:
    which is faster is the machine's business), and the model then follows the choice."""
    _needs("f32")
    monkeypatch.setattr(choose, "_chooser", Chooser(tmp_path / "k.json"))
    model = _model(ckpts["wide"][0], "f32")
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2]]), cache=cache)
        model(torch.tensor([[3]]), cache=cache)
    key = ("step", "f32", 1, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp)
    choice = choose.chooser().choices[key]
    assert set(choice.seconds) == {"eager", "native"}
    assert choice.name == min(choice.seconds, key=choice.seconds.get)
    with torch.no_grad():
        runs = kstep.plan(model, cache, 1, 1, None, None, "logits") is not None
    assert runs == (choice.name == "native")


def test_the_last_position_of_the_cache_is_usable(ckpts):
    _needs("f32")
    model = _model(ckpts["small"][0], "f32")
    n = model.cfg.n_ctx
    prompt = torch.randint(0, 100, (1, n - 1), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, n)
    with torch.no_grad():
        model(prompt, cache=cache)
        with kernels.force("step", "native"):
            fast = model(torch.tensor([[5]]), cache=cache)
        full = model(torch.cat([prompt, torch.tensor([[5]])], 1))[:, -1:]
        assert cache.length == n
        with pytest.raises(gpt2lab.GPT2LabError, match="longer than the model's context"):
            model(torch.tensor([[5]]), cache=cache)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def _processed_steps(model, prompt, mode: str, edit: float = 3.0) -> torch.Tensor:
    """Three steps at explicit positions (one for the batch, then one per row), with an
    in-place edit of W_U before the third; their logits."""
    cache = model.new_cache(2, 9)
    with torch.no_grad(), kernels.force("step", mode):
        model(prompt, cache=cache)
        a = model(torch.tensor([[7], [8]]), cache=cache, position_ids=torch.tensor([[40]]))
        b = model(torch.tensor([[9], [1]]), cache=cache, position_ids=torch.tensor([[3], [50]]))
        model.unembed.weight[:, 5] += edit
        c = model(torch.tensor([[2], [6]]), cache=cache)
        model.unembed.weight[:, 5] -= edit
    assert mode == "eager" or cache.__dict__["_native_step"][1] is not None
    return torch.cat([a, b, c], 1).float()


@pytest.mark.parametrize("kind", ["f32", "int8"])
def test_processed_weights_explicit_positions_and_edits_of_the_unembedding(ckpts, kind):
    """The step computes the embeddings and the unembedding too: after weight processing
    (an untied unembedding with a bias, folded LayerNorms), at explicit position ids,
    and after an in-place edit of W_U in the middle of decoding (an int8 model's copy is
    remade), it gives the eager logits (int8: as close to float32 as eager is)."""
    _needs(kind)
    ref_model = _model(ckpts["wide"][0], "f32").process_weights()
    assert ref_model.unembed.bias is not None  # (processing untied the unembedding)
    model = quantize(copy.deepcopy(ref_model), "int8") if kind == "int8" else ref_model
    prompt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(4))
    eager = _processed_steps(model, prompt, "eager")
    fast = _processed_steps(model, prompt, "native")
    scale = eager.abs().max().item()
    unedited = _processed_steps(model, prompt, "native", edit=0.0)
    assert (fast[:, 2] - unedited[:, 2]).abs().max().item() > 0.05 * scale  # the edit is seen
    if kind == "f32":
        assert (eager - fast).abs().max().item() <= 1e-5 * scale
    else:
        ref = _processed_steps(ref_model, prompt, "eager")
        err_eager, err_fast = (eager - ref).abs().max().item(), (fast - ref).abs().max().item()
        assert err_fast <= 1.5 * err_eager + 2**-8 * scale


def test_hooks_added_or_removed_between_steps_are_seen(ckpts):
    """Whether a model has persistent hooks is remembered until any hook changes: a hook
    added between two steps fires at the next one (the native step steps aside), one
    removed no longer does, and a deep copy keeps its hooks and its own answer."""
    _needs("f32")
    model = _model(ckpts["small"][0], "f32")
    seen = []
    cache = model.new_cache(1, 8)
    with torch.no_grad(), kernels.force("step", "native"):
        model(torch.tensor([[1, 2]]), cache=cache)
        model(torch.tensor([[3]]), cache=cache)
        model.add_hook("blocks.0.hook_resid_post", lambda x, hook: seen.append(1))
        model(torch.tensor([[4]]), cache=cache)
        twin = copy.deepcopy(model)
        twin(torch.tensor([[1]]), cache=twin.new_cache(1, 4))
        model.reset_hooks()
        model(torch.tensor([[5]]), cache=cache)
        twin(torch.tensor([[1]]), cache=twin.new_cache(1, 4))
        model.blocks[1].hook_attn_out.persistent = (lambda x, hook: seen.append(2),)
        model(torch.tensor([[6]]), cache=cache)
    assert seen == [1, 1, 1, 2]
