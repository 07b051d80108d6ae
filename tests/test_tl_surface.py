"""The TransformerLens surface users type without thinking: return_type / loss_per_token /
loss_fn, model.cfg's TransformerLens fields, hook.layer() / hook.ctx, add_hook's dir /
is_permanent / level / prepend with reset_hooks, set_use_*, run_with_cache's
return_cache_object, cache.stack_activation / get_full_resid_decomposition, and the
per-block weight views: each against transformer-lens 3.9 on the same weights."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from tl_reference import hooked_transformer

import gpt2lab as gl
from gpt2lab.errors import GPT2LabError


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def same(a, b, tol: float = 1e-4) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < tol


@pytest.fixture(scope="module")
def pair(small_ckpt):
    ours = gl.load(small_ckpt)
    return ours, hooked_transformer(ours)


@pytest.fixture(scope="module")
def processed_pair(small_ckpt):
    original = gl.load(small_ckpt)
    return gl.load(small_ckpt, process=True), hooked_transformer(original, processed=True)


@pytest.fixture(autouse=True)
def no_hooks_left(pair):
    yield
    ours, ref = pair
    ours.reset_hooks(including_permanent=True)
    ref.reset_hooks(including_permanent=True)


# ---- return_type / loss_per_token / loss_fn ------------------------------------------------
def _call(model, how, x, **kw):
    if how == "forward":
        return model(x, **kw)
    if how == "run_with_hooks":
        return model.run_with_hooks(
            x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: None)], **kw
        )
    return model.run_with_cache(x, **kw)[0]


@pytest.mark.parametrize("how", ["forward", "run_with_hooks", "run_with_cache"])
@pytest.mark.parametrize("return_type", ["logits", "loss", "both", None])
@pytest.mark.parametrize("per_token", [False, True])
@torch.no_grad()
def test_return_type_and_loss_match_transformer_lens(pair, how, return_type, per_token):
    ours, ref = pair
    x = random_tokens(2, 9, seed=1)
    out = _call(ours, how, x, return_type=return_type, loss_per_token=per_token)
    ref_out = _call(ref, how, x, return_type=return_type, loss_per_token=per_token)
    if return_type is None:
        assert out is None and ref_out is None
    elif return_type == "both":
        assert out._fields == ("logits", "loss")
        same(out.logits, ref_out.logits)
        same(out.loss, ref_out.loss, 1e-5)
        assert out.loss.shape == ((2, 8) if per_token else ())
    else:
        same(out, ref_out, 1e-5 if return_type == "loss" else 1e-4)
    # the default is unchanged: logits
    if how == "forward":
        same(ours(x), ref(x))


@torch.no_grad()
def test_loss_fn_matches_transformer_lens_with_and_without_mask(pair):
    ours, ref = pair
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 50257, generator=gen)
    tokens = random_tokens(3, 6, seed=4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    for kw in (
        {},
        dict(per_token=True),
        dict(attention_mask=mask),
        dict(attention_mask=mask, per_token=True),
    ):
        same(ours.loss_fn(logits, tokens, **kw), ref.loss_fn(logits, tokens, **kw), 1e-5)
    # forward with a padding mask uses it for the loss, as TransformerLens' forward does
    x = random_tokens(3, 6, seed=5)
    logits, loss = ours(x, attention_mask=mask, return_type="both")
    same(loss, ours.loss_fn(logits, x, mask), 1e-6)
    # text input: the loss is over its own tokens (and padding mask)
    out = ours(["a b c d", "hello there"], return_type="both")
    toks, m = ours.to_tokens(["a b c d", "hello there"], return_mask=True)
    same(out.loss, ours.loss_fn(out.logits, toks, m), 1e-6)


def test_loss_has_gradients_and_incl_bwd_takes_it(pair):
    ours, ref = pair
    x = random_tokens(2, 7, seed=6)
    loss, cache = ours.run_with_cache(x, return_type="loss", incl_bwd=True)
    ref_loss, ref_cache = ref.run_with_cache(x, return_type="loss", incl_bwd=True)
    same(loss, ref_loss, 1e-5)
    same(cache["blocks.1.hook_resid_post_grad"], ref_cache["blocks.1.hook_resid_post_grad"], 1e-5)


# ---- cfg ------------------------------------------------------------------------------
FIELDS = ["n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
          "eps", "act_fn", "normalization_type", "positional_embedding_type", "attn_only",
          "original_architecture", "dtype", "use_attn_result", "use_split_qkv_input",
          "use_hook_mlp_in", "use_attn_in", "use_hook_tokens", "use_attn_scale", "gated_mlp",
          "parallel_attn_mlp", "final_rms", "n_key_value_heads", "attention_dir",
          "scale_attn_by_inverse_layer_idx"]  # fmt: skip


@pytest.mark.parametrize("processed", [False, True])
def test_cfg_fields_match_transformer_lens(pair, processed_pair, processed, small_ckpt):
    ours, ref = processed_pair if processed else pair
    for name in FIELDS:
        assert getattr(ours.cfg, name) == getattr(ref.cfg, name), name
    assert float(ours.cfg.attn_scale) == pytest.approx(float(ref.cfg.attn_scale))
    assert ours.cfg.device == torch.device(ref.cfg.device)
    assert ours.cfg.normalization_type == ("LNPre" if processed else "LN")
    assert ours.cfg.model_name == small_ckpt.name
    assert ours.cfg.tokenizer_name == "gpt2"
    assert ours.cfg.default_prepend_bos is False  # gpt2lab's default (TransformerLens: True)
    assert ours.cfg.default_padding_side == "left"


def test_cfg_follows_the_model_and_keeps_its_config_behaviour(small_ckpt, tmp_path):
    model = gl.load(small_ckpt)
    cfg = gl.GPT2Config.from_json_file(small_ckpt / "config.json")
    assert model.cfg == cfg and model.cfg.to_dict() == cfg.to_dict()
    assert model.cfg.to_hf() == cfg.to_hf()
    model.to(torch.float64)
    assert model.cfg.dtype == torch.float64
    model.float()
    assert model.cfg.dtype == torch.float32 and model.cfg.device == torch.device("cpu")
    assert cfg.dtype == torch.get_default_dtype()  # a config of no model: the defaults
    assert cfg.model_name == "custom" and gl.GPT2(cfg).cfg.model_name == "custom"
    # copies and pickles are bound to their own model
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other.half()
        assert other.cfg.dtype == torch.float16 and model.cfg.dtype == torch.float32
        assert other.unembed.W_U.data_ptr() == other.wte.weight.data_ptr()
    # reassigning the config re-binds it; the saved config.json does not change
    model.cfg = model.cfg.with_()
    assert model.cfg.dtype == torch.float32
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").read_text() == (
        small_ckpt / "config.json"
    ).read_text() or (gl.GPT2Config.from_json_file(tmp_path / "saved" / "config.json") == cfg)
    with pytest.raises(AttributeError):
        model.cfg.eps = 1.0


# ---- hook.layer(), hook.ctx ---------------------------------------------------------------
def test_hook_layer_matches_transformer_lens(pair):
    ours, ref = pair
    for name, hp in ours.hook_dict.items():
        if name.startswith("blocks."):
            assert hp.layer() == ref.hook_dict[name].layer(), name
        else:
            with pytest.raises(GPT2LabError, match="not inside a block"):
                hp.layer()


@torch.no_grad()
def test_hook_ctx_carries_state_across_hooks_and_passes(pair):
    x = random_tokens(2, 6, seed=7)
    outs = []
    for model in pair:

        def store(t, hook):
            hook.ctx["resid"] = t.clone()
            hook.ctx["n"] = hook.ctx.get("n", 0) + 1

        def use(t, hook, model=model):
            return t - 0.5 * model.hook_dict["blocks.0.hook_resid_pre"].ctx["resid"]

        hooks = [("blocks.0.hook_resid_pre", store), ("blocks.1.hook_resid_pre", use)]
        out = model.run_with_hooks(x, fwd_hooks=hooks)
        model.run_with_hooks(x, fwd_hooks=hooks)
        ctx = model.hook_dict["blocks.0.hook_resid_pre"].ctx
        assert ctx["n"] == 2  # kept across passes
        model.run_with_hooks(x, fwd_hooks=hooks, clear_contexts=True)
        assert model.hook_dict["blocks.0.hook_resid_pre"].ctx == {}
        model.run_with_hooks(x, fwd_hooks=hooks)
        model.reset_hooks()
        assert model.hook_dict["blocks.0.hook_resid_pre"].ctx == {}
        model.run_with_hooks(x, fwd_hooks=hooks)
        model.reset_hooks(clear_contexts=False)
        assert model.hook_dict["blocks.0.hook_resid_pre"].ctx["n"] == 1
        outs.append(out)
    same(outs[0], outs[1])
    assert (outs[0] - pair[0](x)).abs().max() > 1e-2  # the hooks did something


# ---- add_hook / reset_hooks -------------------------------------------------------------
def _order_after(model, x, setup):
    calls = []

    def rec(tag):
        def fn(t, hook):
            calls.append(tag)

        return fn

    setup(model, rec)
    with torch.no_grad():
        model(x)
    return calls


SCENARIOS = {
    "prepend": lambda m, r: (
        m.add_hook("blocks.0.hook_resid_pre", r("a")),
        m.add_hook("blocks.0.hook_resid_pre", r("b"), prepend=True),
        m.add_hook("blocks.0.hook_resid_pre", r("c")),
    ),
    "reset keeps permanent": lambda m, r: (
        m.add_hook("blocks.0.hook_resid_pre", r("perm"), is_permanent=True),
        m.add_hook("blocks.0.hook_resid_pre", r("temp")),
        m.reset_hooks(),
    ),
    "reset including permanent": lambda m, r: (
        m.add_hook("blocks.0.hook_resid_pre", r("perm"), is_permanent=True),
        m.add_hook("blocks.0.hook_resid_pre", r("temp")),
        m.reset_hooks(including_permanent=True),
    ),
    "reset by level": lambda m, r: (
        m.add_hook("blocks.0.hook_resid_pre", r("l1"), level=1),
        m.add_hook("blocks.0.hook_resid_pre", r("l2"), level=2),
        m.add_hook("blocks.0.hook_resid_pre", r("none")),
        m.reset_hooks(level=1),
    ),
    "reset fwd only": lambda m, r: (
        m.add_hook(lambda n: n.endswith("hook_mlp_out"), r("mlp")),
        m.reset_hooks(direction="bwd"),
        m.add_hook("hook_embed", r("embed"), prepend=True),
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_add_hook_and_reset_hooks_match_transformer_lens(pair, scenario):
    ours, ref = pair
    x = random_tokens(1, 4, seed=8)
    ours_calls = _order_after(ours, x, SCENARIOS[scenario])
    ref_calls = _order_after(ref, x, SCENARIOS[scenario])
    assert ours_calls == ref_calls
    assert ours_calls or scenario == "reset including permanent"


def test_backward_add_hook_matches_transformer_lens(pair):
    x = random_tokens(2, 6, seed=9)
    grads = []
    for model in pair:
        seen = {}
        model.add_hook(
            "blocks.1.hook_resid_post",
            lambda g, hook, seen=seen: seen.__setitem__("post", g.clone()),
            dir="bwd",
        )
        model.add_hook(
            "blocks.0.hook_mlp_out",
            lambda g, hook, seen=seen: seen.__setitem__("mlp", g.clone()),
            dir="bwd",
        )
        model.reset_hooks(direction="fwd")  # keeps backward hooks
        model(x, return_type="loss").backward()
        grads.append(seen)
        model.reset_hooks(direction="bwd")
        seen2 = {}
        model.add_hook(
            "blocks.1.hook_resid_post",
            lambda g, hook, seen2=seen2: seen2.__setitem__("x", 1),
            dir="fwd",
        )
        model(x, return_type="loss").backward()
        assert set(seen2) == {"x"}  # the backward hooks are gone
        model.zero_grad(set_to_none=True)
    assert set(grads[0]) == set(grads[1]) == {"post", "mlp"}
    for key in grads[0]:
        same(grads[0][key], grads[1][key], 1e-5)


def test_scoped_hooks_stay_thread_local_and_reset_inside_a_block(pair):
    ours, _ = pair
    x = random_tokens(1, 4, seed=10)
    calls = []
    with ours.hooks([("hook_embed", lambda t, hook: calls.append("scoped"))]):
        ours.add_hook("hook_embed", lambda t, hook: calls.append("added"), is_permanent=True)
        with torch.no_grad():
            ours(x)
        ours.reset_hooks()  # this block's hooks and non-permanent added ones
        with torch.no_grad():
            ours(x)
    assert calls == ["added", "scoped", "added"]


# ---- set_use_*, return_cache_object -------------------------------------------------------
@torch.no_grad()
def test_set_use_attn_result_and_hook_mlp_in_match_transformer_lens(small_ckpt):
    ours = gl.load(small_ckpt)
    ref = hooked_transformer(ours)
    x = random_tokens(2, 5, seed=11)
    with pytest.raises(GPT2LabError, match="no hook point named 'blocks.0.hook_mlp_in'"):
        ours.add_hook("blocks.0.hook_mlp_in", lambda t, hook: None)
    for model in (ours, ref):
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
    assert ours.cfg.use_attn_result and ours.cfg.use_hook_mlp_in
    _, cache = ours.run_with_cache(x)
    _, ref_cache = ref.run_with_cache(x)
    assert set(cache) == set(ref_cache)
    for name in ("blocks.1.attn.hook_result", "blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"):
        same(cache[name], ref_cache[name])
    # hook_mlp_in feeds the MLP: changing it changes the output, as in TransformerLens
    hooks = [("blocks.0.hook_mlp_in", lambda t, hook: t * 0.5)]
    same(ours.run_with_hooks(x, fwd_hooks=hooks), ref.run_with_hooks(x, fwd_hooks=hooks))
    for model in (ours, ref):
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
    _, cache = ours.run_with_cache(x)
    assert "blocks.0.hook_mlp_in" not in cache and "blocks.0.attn.hook_result" not in cache
    assert "blocks.0.hook_mlp_in" not in ours.hook_dict
    ours.set_use_split_qkv_input(False)  # already the state: accepted
    assert ours.state_dict().keys() == gl.load(small_ckpt).state_dict().keys()


@torch.no_grad()
def test_return_cache_object_false_gives_a_dict(pair):
    ours, ref = pair
    x = random_tokens(1, 5, seed=12)
    logits, store = ours.run_with_cache(x, return_cache_object=False)
    _, cache = ours.run_with_cache(x)
    _, ref_store = ref.run_with_cache(x, return_cache_object=False)
    assert type(store) is dict and type(ref_store) is dict
    assert store.keys() == cache.cache_dict.keys()
    assert all(torch.equal(store[k], cache[k]) for k in store)


# ---- stack_activation, get_full_resid_decomposition ------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["unprocessed", "processed"])
def caches(request, small_ckpt):
    original = gl.load(small_ckpt)
    ours = gl.load(small_ckpt, process=True) if request.param else original
    ref = hooked_transformer(original, processed=request.param, use_attn_result=True)
    x = random_tokens(3, 7, seed=13)
    with torch.no_grad():
        _, cache = ours.run_with_cache(x)
        _, ref_cache = ref.run_with_cache(x)
    return cache, ref_cache


@pytest.mark.parametrize(
    "args",
    [("resid_pre",), ("pattern",), ("resid_post", 1), ("scale", -1, "ln1"), ("scale", 2, "ln2"),
     ("z", None), ("mlp_out", 2)],
)  # fmt: skip
def test_stack_activation_matches_transformer_lens(caches, args):
    cache, ref = caches
    same(cache.stack_activation(*args), ref.stack_activation(*args), 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(return_labels=True),
        dict(layer=1, mlp_input=True, return_labels=True),
        dict(layer=2, expand_neurons=False, apply_ln=True, return_labels=True),
        dict(layer=1, mlp_input=True, expand_neurons=False, apply_ln=True, return_labels=True),
        dict(pos_slice=-1, apply_ln=True),
        dict(layer=0, pos_slice=(1, 5), return_labels=True),
        dict(layer=0, mlp_input=True, apply_ln=True, return_labels=True),
        dict(layer=-1, pos_slice=[0, 3], expand_neurons=False, return_labels=True),
        dict(apply_ln=True, project_output_onto="vector"),
        dict(layer=1, project_output_onto="matrix", return_labels=True),
    ],
)
def test_get_full_resid_decomposition_matches_transformer_lens(caches, kwargs):
    cache, ref = caches
    if isinstance(kwargs.get("project_output_onto"), str):
        shape = (64,) if kwargs["project_output_onto"] == "vector" else (64, 3)
        kwargs = {
            **kwargs,
            "project_output_onto": torch.randn(shape, generator=torch.Generator().manual_seed(0)),
        }
    ours, theirs = (
        cache.get_full_resid_decomposition(**kwargs),
        ref.get_full_resid_decomposition(**kwargs),
    )
    if kwargs.get("return_labels"):
        assert ours[1] == theirs[1]
        ours, theirs = ours[0], theirs[0]
    same(ours, theirs)


def test_full_resid_decomposition_sums_to_the_residual_stream(caches):
    cache, _ = caches
    for layer, mlp_input, name in [(None, False, ("resid_post", 1)), (1, True, ("resid_mid", 1)),
                                   (1, False, ("resid_pre", 1)), (0, True, ("resid_mid", 0))]:  # fmt: skip
        for expand in (True, False):
            stack = cache.get_full_resid_decomposition(layer, mlp_input, expand_neurons=expand)
            same(stack.sum(0), cache[name])


# ---- per-block weight views -----------------------------------------------------------
VIEWS = [("attn", n) for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")]
VIEWS += [("mlp", n) for n in ("W_in", "b_in", "W_out", "b_out")]


@pytest.mark.parametrize("processed", [False, True])
def test_weight_views_match_transformer_lens(pair, processed_pair, processed):
    ours, ref = processed_pair if processed else pair
    for i in range(ours.cfg.n_layers):
        for module, name in VIEWS:
            mine = getattr(getattr(ours.blocks[i], module), name)
            same(mine, getattr(getattr(ref.blocks[i], module), name), 1e-5)
            stacked = getattr(ours, name)[i]  # the model-level stacks agree
            assert torch.equal(mine.detach(), stacked)
        if not processed:  # TransformerLens' LNPre has no weights
            for ln in ("ln1", "ln2"):
                for name in ("w", "b"):
                    same(
                        getattr(getattr(ours.blocks[i], ln), name),
                        getattr(getattr(ref.blocks[i], ln), name),
                        1e-6,
                    )
    if not processed:
        same(ours.ln_final.w, ref.ln_final.w, 1e-6)
        same(ours.ln_final.b, ref.ln_final.b, 1e-6)
    same(ours.embed.W_E, ref.embed.W_E, 1e-6)
    same(ours.pos_embed.W_pos, ref.pos_embed.W_pos, 1e-6)
    same(ours.unembed.W_U, ref.unembed.W_U, 1e-5)
    same(ours.unembed.b_U, ref.unembed.b_U, 1e-5)


def test_weight_views_share_storage_and_refuse_reassignment(small_ckpt):
    model = gl.load(small_ckpt)
    attn, mlp = model.blocks[1].attn, model.blocks[0].mlp
    with torch.no_grad():
        attn.W_K[2, 5, 3] = 7.0
        attn.b_V[1, 0] = -3.0
        attn.W_O[3, 1, 4] = 2.5
        mlp.W_out[10, 20] = 1.5
        model.embed.W_E[11, 0] = 4.0
        model.ln_final.w[0] = 9.0
    D, dh = model.cfg.d_model, model.cfg.d_head
    assert attn.c_attn.weight[D + 2 * dh + 3, 5] == 7.0
    assert attn.c_attn.bias[2 * D + 1 * dh] == -3.0
    assert attn.c_proj.weight[4, 3 * dh + 1] == 2.5
    assert mlp.c_proj.weight[20, 10] == 1.5
    assert model.wte.weight[11, 0] == 4.0 and model.unembed.W_U[0, 11] == 4.0  # tied
    assert model.ln_final.weight[0] == 9.0
    assert attn.W_Q.requires_grad  # views keep autograd, as TransformerLens' parameters
    for owner, name in [
        (attn, "W_Q"),
        (mlp, "b_in"),
        (model.unembed, "W_U"),
        (model.ln_final, "w"),
    ]:
        with pytest.raises(AttributeError):
            setattr(owner, name, torch.zeros(1))
    with pytest.raises(GPT2LabError, match="read-only"):
        model.embed.W_E = torch.zeros(1)
    with pytest.raises(GPT2LabError, match="read-only"):
        model.pos_embed.W_pos = torch.zeros(1)


# ---- bad arguments: one line each ---------------------------------------------------------
BAD = {
    "return_type='logit'": lambda m, c, x: m(x, return_type="logit"),
    "return_type=True": lambda m, c, x: m(x, return_type=True),
    "loss_per_token='yes'": lambda m, c, x: m(x, return_type="loss", loss_per_token="yes"),
    "loss with logits_to_keep": lambda m, c, x: m(x, return_type="loss", logits_to_keep=1),
    "run_with_hooks return_type": lambda m, c, x: m.run_with_hooks(x, return_type="probs"),
    "run_with_cache return_type": lambda m, c, x: m.run_with_cache(x, return_type="str"),
    "return_cache_object='no'": lambda m, c, x: m.run_with_cache(x, return_cache_object="no"),
    "reset_hooks_end=False": lambda m, c, x: m.run_with_hooks(x, reset_hooks_end=False),
    "clear_contexts=1": lambda m, c, x: m.run_with_hooks(x, clear_contexts=1),
    "loss_fn 2-d logits": lambda m, c, x: m.loss_fn(torch.zeros(3, 4), x),
    "loss_fn float tokens": lambda m, c, x: m.loss_fn(torch.zeros(1, 5, 50257), x.float()),
    "loss_fn shape mismatch": lambda m, c, x: m.loss_fn(torch.zeros(1, 4, 7), x),
    "loss_fn one position": lambda m, c, x: m.loss_fn(torch.zeros(1, 1, 7), x[:, :1]),
    "loss_fn mask shape": lambda m, c, x: m.loss_fn(torch.zeros(1, 5, 50257), x, torch.ones(1, 4)),
    "loss_fn id outside logits": lambda m, c, x: m.loss_fn(torch.zeros(1, 5, 7), x),
    "loss_fn per_token=1": lambda m, c, x: m.loss_fn(torch.zeros(1, 5, 50257), x, per_token=1),
    "add_hook dir='up'": lambda m, c, x: m.add_hook("hook_embed", lambda t, hook: None, dir="up"),
    "add_hook dir='both'": lambda m, c, x: m.add_hook("hook_embed", lambda t, hook: None, dir="both"),
    "add_hook is_permanent='yes'": lambda m, c, x: m.add_hook("hook_embed", lambda t, hook: None, is_permanent="yes"),
    "add_hook level='1'": lambda m, c, x: m.add_hook("hook_embed", lambda t, hook: None, level="1"),
    "add_hook prepend=1": lambda m, c, x: m.add_hook("hook_embed", lambda t, hook: None, prepend=1),
    "add_hook unknown name": lambda m, c, x: m.add_hook("blocks.0.hook_resid", lambda t, hook: None),
    "add_hook not callable": lambda m, c, x: m.add_hook("hook_embed", 3),
    "reset_hooks direction": lambda m, c, x: m.reset_hooks(direction="sideways"),
    "remove_hooks dir": lambda m, c, x: m.hook_dict["hook_embed"].remove_hooks("up"),
    "hook.layer() outside blocks": lambda m, c, x: m.hook_dict["ln_final.hook_scale"].layer(),
    "set_use_split_qkv_input(True)": lambda m, c, x: m.set_use_split_qkv_input(True),
    "set_use_attn_in(True)": lambda m, c, x: m.set_use_attn_in(True),
    "set_use_attn_result('yes')": lambda m, c, x: m.set_use_attn_result("yes"),
    "set_use_hook_mlp_in(1)": lambda m, c, x: m.set_use_hook_mlp_in(1),
    "stack_activation layer=0": lambda m, c, x: c.stack_activation("resid_pre", layer=0),
    "stack_activation layer=9": lambda m, c, x: c.stack_activation("resid_pre", layer=9),
    "stack_activation uncached": lambda m, c, x: c.stack_activation("result"),
    "stack_activation name=3": lambda m, c, x: c.stack_activation(3),
    "decomposition layer=5": lambda m, c, x: c.get_full_resid_decomposition(layer=5),
    "decomposition mlp_input at the end": lambda m, c, x: c.get_full_resid_decomposition(mlp_input=True),
    "decomposition projection shape": lambda m, c, x: c.get_full_resid_decomposition(project_output_onto=torch.ones(5)),
    "embed.W_E reassigned": lambda m, c, x: setattr(m.embed, "W_E", None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_are_one_line_errors(pair, case):
    ours, _ = pair
    x = random_tokens(1, 5, seed=14)
    with torch.no_grad():
        _, cache = ours.run_with_cache(x, names_filter=lambda n: "attn.hook_result" not in n)
    with pytest.raises(GPT2LabError) as info:
        BAD[case](ours, cache, x)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert not any(hp.persistent for hp in ours.hook_dict.values())  # nothing half-attached
