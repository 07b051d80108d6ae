"""The forward pass against transformers' GPT2LMHeadModel on the same random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model

import gpt2lab as gl


@pytest.fixture(scope="module")
def pair(small_ckpt, hf_small):
    return gl.load(small_ckpt), hf_small


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = tokens(len(lengths), width, seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        ids[row, : width - n] = 50256
    return ids, mask


@torch.no_grad()
def test_logits_match_transformers(pair):
    ours, hf = pair
    x = tokens(3, 40)
    diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"max |logit diff| vs transformers: {diff:.2e}")
    assert diff < 1e-4


@torch.no_grad()
def test_left_padded_batch_matches_transformers(pair):
    ours, hf = pair
    ids, mask = left_padded([7, 19, 12])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    mine = ours(ids, attention_mask=mask)  # positions derived from the mask
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-4
    # and each row equals that prompt run alone, unpadded
    for row in range(3):
        alone = ours(ids[row, real[row]][None])
        assert (mine[row, real[row]] - alone[0]).abs().max().item() < 1e-4


@torch.no_grad()
def test_kv_cache_steps_equal_full_forward(pair):
    ours, _ = pair
    x = tokens(2, 30, seed=5)
    full = ours(x)
    cache = ours.new_cache(2, 30)
    chunks = [ours(x[:, :10], cache=cache)]
    for t in range(10, 30):
        chunks.append(ours(x[:, t : t + 1], cache=cache))
    stepped = torch.cat(chunks, 1)
    diff = (stepped - full).abs().max().item()
    print(f"KV-cache vs full forward: {diff:.2e}")
    assert diff < 1e-5


@torch.no_grad()
def test_kv_cache_with_left_padding(pair):
    ours, _ = pair
    ids, mask = left_padded([5, 11], seed=3)
    extra = tokens(2, 6, seed=4)
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    full = ours(full_ids, attention_mask=full_mask)
    cache = ours.new_cache(2, full_ids.shape[1])
    out = [ours(ids, attention_mask=mask, cache=cache)]
    for t in range(extra.shape[1]):
        out.append(ours(extra[:, t : t + 1], cache=cache))  # new tokens only: mask remembered
    stepped = torch.cat(out, 1)
    real = full_mask.bool()
    assert (stepped[real] - full[real]).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_close_to_fp32(pair, dtype):
    ours, _ = pair
    x = tokens(2, 64, seed=7)
    ref = ours(x)
    half = gl.GPT2(ours.cfg)
    half.load_state_dict(ours.state_dict())
    logits = half.to(dtype)(x)
    assert logits.dtype == dtype
    diff = (logits.float() - ref).abs()
    scale = ref.abs().mean().item()
    top_agree = (logits.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"{dtype}: max diff {diff.max():.4f}, mean diff {diff.mean():.5f}, mean |logit| {scale:.3f}, "
        f"argmax agreement {top_agree:.3f}"
    )
    eps = 2**-8 if dtype == torch.bfloat16 else 2**-11  # unit roundoff
    assert diff.mean().item() < 12 * eps * scale
    assert diff.max().item() < 100 * eps * scale
    assert top_agree > 0.9


def attention_f64(q, k, v, allowed, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()


@pytest.mark.parametrize("case", ["causal", "causal_after_cache", "shared_mask"])
def test_bmm_attention_is_attention(case):
    # bf16 prefill on CPU runs attention as baddbmm + in-place softmax + bmm
    # (kernels.attention's `bmm` candidate); it must be softmax(q k^T * scale + mask) v.
    from gpt2lab.kernels.attention import AttnMask, _bmm

    gen = torch.Generator().manual_seed(3)
    B, H, T, S, dh = 2, 4, 9, 9 if case == "causal" else 14, 16
    q, k, v = (torch.randn(B, H, n, dh, generator=gen).bfloat16() for n in (T, S, S))
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if case == "shared_mask":
        allowed = causal & (torch.rand(T, S, generator=gen) > 0.3)
        allowed[:, 0] = True  # every query sees at least one key
    else:
        allowed = causal
    with torch.inference_mode():
        mask = AttnMask(None, True) if case == "causal" else AttnMask(allowed, False)
        got = _bmm(q, k, v, mask, 0.25)
    ref = attention_f64(q, k, v, allowed, 0.25)
    assert got.shape == (B, H, T, dh) and got.dtype == torch.bfloat16
    err = (got.double() - ref).abs().max().item()
    print(f"{case}: max |diff| vs float64 attention {err:.4f}")
    assert err < 2**-6 * ref.abs().max().item()


@torch.no_grad()
def test_bf16_prefill_takes_bmm_attention_and_agrees_with_sdpa(pair, monkeypatch):
    # The same bf16 model with the bmm path off (torch's SDPA kernel) is the reference:
    # plain prefill, a prefill after a cached prefix, and a left-padded batch (SDPA).
    from gpt2lab import kernels
    from gpt2lab.kernels import attention

    ours, _ = pair
    half = gl.GPT2(ours.cfg)
    half.load_state_dict(ours.state_dict())
    half = half.to(torch.bfloat16)
    calls = []
    real = attention._bmm
    monkeypatch.setitem(attention.CANDIDATES, "bmm", lambda *a: calls.append(1) or real(*a))

    def run():
        x = tokens(1, 40, seed=11)
        full = half(x)
        cache = half.new_cache(1, 40)
        chunked = torch.cat([half(x[:, :25], cache=cache), half(x[:, 25:], cache=cache)], 1)
        ids, mask = left_padded([7, 19])
        return full, chunked, half(ids, attention_mask=mask)[mask.bool()]

    with torch.inference_mode(), kernels.force("attend", "bmm"):
        fast = run()
    assert len(calls) == 3 * ours.cfg.n_layers  # full, both chunks; not the padded batch
    with torch.inference_mode(), kernels.force("attend", "sdpa"):
        slow = run()
    assert len(calls) == 3 * ours.cfg.n_layers
    ref = ours(tokens(1, 40, seed=11))
    for got, want in zip(fast, slow, strict=True):
        scale = want.float().abs().mean().item()
        assert (got.float() - want.float()).abs().mean().item() < 0.05 * scale
    for got in (fast[0], fast[1], slow[0]):  # both bf16 paths equally close to fp32
        print(f"mean |bf16 - fp32| {(got.float() - ref).abs().mean():.4f}")
        assert (got.float() - ref).abs().mean().item() < 12 * 2**-8 * ref.abs().mean().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(scale_attn_weights=False, initializer_range=0.05),
        dict(reorder_and_upcast_attn=True),
        dict(activation_function="relu"),
        dict(activation_function="gelu"),
        dict(n_inner=96),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@torch.no_grad()
def test_config_options_keep_parity(tmp_path, overrides):
    hf = hf_model(seed=2, **overrides)
    hf.save_pretrained(tmp_path)
    ours = gl.load(tmp_path)
    x = tokens(2, 24, seed=9)
    assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


HOOK_SHAPES = {
    "hook_embed": "bpd",
    "hook_pos_embed": "bpd",
    "ln_final.hook_scale": "bp1",
    "ln_final.hook_normalized": "bpd",
    "unembed.hook_in": "bpd",
    "unembed.hook_out": "bpv",
    "blocks.{l}.hook_resid_pre": "bpd",
    "blocks.{l}.hook_resid_mid": "bpd",
    "blocks.{l}.hook_resid_post": "bpd",
    "blocks.{l}.hook_attn_out": "bpd",
    "blocks.{l}.hook_mlp_out": "bpd",
    "blocks.{l}.ln1.hook_scale": "bp1",
    "blocks.{l}.ln1.hook_normalized": "bpd",
    "blocks.{l}.ln2.hook_scale": "bp1",
    "blocks.{l}.ln2.hook_normalized": "bpd",
    "blocks.{l}.attn.hook_q": "bphe",
    "blocks.{l}.attn.hook_k": "bphe",
    "blocks.{l}.attn.hook_v": "bphe",
    "blocks.{l}.attn.hook_z": "bphe",
    "blocks.{l}.attn.hook_attn_scores": "bhpp",
    "blocks.{l}.attn.hook_pattern": "bhpp",
    "blocks.{l}.attn.hook_result": "bphd",
    "blocks.{l}.mlp.hook_pre": "bpm",
    "blocks.{l}.mlp.hook_post": "bpm",
}


@torch.no_grad()
def test_every_hook_point_has_its_documented_shape(pair):
    ours, _ = pair
    cfg = ours.cfg
    sizes = {
        "b": 2,
        "p": 9,
        "d": cfg.d_model,
        "h": cfg.n_heads,
        "e": cfg.d_head,
        "m": cfg.d_mlp,
        "v": cfg.d_vocab,
        "1": 1,
    }
    expected = {}
    for pattern, dims in HOOK_SHAPES.items():
        for layer in range(cfg.n_layers) if "{l}" in pattern else [None]:
            expected[pattern.format(l=layer)] = tuple(sizes[c] for c in dims)
    assert sorted(ours.hook_names()) == sorted(expected)

    seen = {}
    x = tokens(2, 9, seed=11)
    plain = ours(x)
    with ours.hooks(
        [(lambda name: True, lambda t, hook: seen.__setitem__(hook.name, tuple(t.shape)))]
    ):
        hooked = ours(x)
    assert seen == expected
    # every slow path taken because of the hooks computes the same thing as the fast one
    assert (hooked - plain).abs().max().item() < 1e-4
    assert not any(hp.fns for hp in ours.hook_dict.values())  # removed on exit


@torch.no_grad()
def test_hook_that_returns_a_tensor_changes_the_output(pair, tmp_path):
    ours, hf = pair
    x = tokens(2, 16, seed=12)
    with ours.hooks([("blocks.1.hook_mlp_out", lambda t, hook: torch.zeros_like(t))]):
        ablated = ours(x)
    # reference: transformers with layer 1's MLP output projection zeroed
    hf_ablated = hf_model()
    with torch.no_grad():
        hf_ablated.transformer.h[1].mlp.c_proj.weight.zero_()
        hf_ablated.transformer.h[1].mlp.c_proj.bias.zero_()
    assert (ablated - hf_ablated(x).logits).abs().max().item() < 1e-4
    assert (ablated - ours(x)).abs().max().item() > 1e-2


@torch.no_grad()
def test_pattern_hook_edits_attention(pair):
    """Replacing layer 0's pattern by uniform causal attention equals doing it by hand."""
    ours, _ = pair
    x = tokens(1, 6, seed=13)
    T = x.shape[1]
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    z_seen = {}

    def set_pattern(pattern, hook):
        return uniform.expand_as(pattern).clone()

    with ours.hooks(
        [
            ("blocks.0.attn.hook_pattern", set_pattern),
            ("blocks.0.attn.hook_v", lambda t, hook: z_seen.__setitem__("v", t)),
            ("blocks.0.attn.hook_z", lambda t, hook: z_seen.__setitem__("z", t)),
        ]
    ):
        ours(x)
    expected_z = torch.einsum("qk,bkhe->bqhe", uniform, z_seen["v"])
    assert (z_seen["z"] - expected_z).abs().max().item() < 1e-5


@torch.no_grad()
def test_weight_views_reproduce_hooked_activations(pair):
    ours, _ = pair
    x = tokens(1, 8, seed=14)
    acts = {}
    names = ["blocks.1.ln1.hook_normalized", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k",
             "blocks.1.attn.hook_v", "blocks.1.attn.hook_z", "blocks.1.hook_attn_out",
             "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
             "blocks.0.hook_mlp_out", "ln_final.hook_normalized"]  # fmt: skip
    with ours.hooks([(n, lambda t, hook: acts.__setitem__(hook.name, t)) for n in names]):
        logits = ours(x)
    cfg = ours.cfg
    assert ours.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert ours.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert ours.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert ours.W_out.shape == (cfg.n_layers, cfg.d_mlp, cfg.d_model)
    assert ours.W_U.shape == (cfg.d_model, cfg.d_vocab) and ours.W_E.shape == (
        cfg.d_vocab,
        cfg.d_model,
    )
    assert ours.W_pos.shape == (cfg.n_ctx, cfg.d_model)

    def affine(name, ln):  # hook_normalized is before the LayerNorm's weight and bias
        return acts[name] * ln.weight + ln.bias

    ln1 = affine("blocks.1.ln1.hook_normalized", ours.blocks[1].ln1)
    for name, W, b in (
        ("q", ours.W_Q, ours.b_Q),
        ("k", ours.W_K, ours.b_K),
        ("v", ours.W_V, ours.b_V),
    ):
        ref = torch.einsum("bpd,hde->bphe", ln1, W[1]) + b[1]
        assert (ref - acts[f"blocks.1.attn.hook_{name}"]).abs().max().item() < 1e-4
    attn_out = (
        torch.einsum("bphe,hed->bpd", acts["blocks.1.attn.hook_z"], ours.W_O[1]) + ours.b_O[1]
    )
    assert (attn_out - acts["blocks.1.hook_attn_out"]).abs().max().item() < 1e-4
    pre = affine("blocks.0.ln2.hook_normalized", ours.blocks[0].ln2) @ ours.W_in[0] + ours.b_in[0]
    assert (pre - acts["blocks.0.mlp.hook_pre"]).abs().max().item() < 1e-4
    out = acts["blocks.0.mlp.hook_post"] @ ours.W_out[0] + ours.b_out[0]
    assert (out - acts["blocks.0.hook_mlp_out"]).abs().max().item() < 1e-4
    assert (
        affine("ln_final.hook_normalized", ours.ln_final) @ ours.W_U + ours.b_U - logits
    ).abs().max().item() < 1e-4
    # the views are copies: editing one leaves the model alone
    ours.W_Q.zero_()
    assert ours.W_Q.abs().sum() > 0


def test_bad_tokens_and_lengths_are_clear_errors(pair):
    ours, _ = pair
    with pytest.raises(gl.GPT2LabError, match="50257 is outside the vocabulary"):
        ours(torch.tensor([[1, 2, 50257]]))
    with pytest.raises(gl.GPT2LabError, match="outside the vocabulary"):
        ours(torch.tensor([[-1]]))
    with pytest.raises(gl.GPT2LabError, match="longer than the model's context"):
        ours(torch.zeros(1, ours.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(gl.GPT2LabError, match="integer tensor"):
        ours(torch.zeros(1, 4))
    with pytest.raises(gl.GPT2LabError, match="attention_mask"):
        ours(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    cache = ours.new_cache(1, 8)
    ours(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(gl.GPT2LabError, match="KV cache"):
        ours(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# Tensor methods that wait for the device (copy a value to the host)
HOST_READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "nonzero"}


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts calls that read a tensor's values back to Python (a device sync each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_token_range_check_reads_the_device_once(pair, dtype):
    """The vocabulary check runs on every decoding step: both bounds in one read."""
    ours, _ = pair
    for ids in ([[3, 1, 2]], [[0]], [[5, 127], [9, 2]]):
        with _HostReads() as reads:
            checked = ours._check_tokens(torch.tensor(ids, dtype=dtype))
        assert reads.count == 1
        assert checked.dtype == torch.long and checked.tolist() == ids
    if dtype != torch.uint8:
        with pytest.raises(gl.GPT2LabError, match="token id -1 is outside the vocabulary"):
            ours._check_tokens(torch.tensor([[4, -1, 3]], dtype=dtype))
    if dtype in (torch.int64, torch.int32):
        with pytest.raises(gl.GPT2LabError, match="token id 50257 is outside the vocabulary"):
            ours._check_tokens(torch.tensor([[-1, 50257]], dtype=dtype))


def test_position_ids_and_logits_to_keep_are_checked(pair):
    """position_ids are [batch, T], [1, T] or [T] (the latter two broadcast over the
    batch), non-negative and inside the context; logits_to_keep >= 0, past T means all."""
    ours, _ = pair
    x = tokens(2, 5)
    plain = ours(x)
    positions = torch.arange(5)
    for p in (positions, positions[None], positions.expand(2, 5)):
        assert torch.equal(ours(x, position_ids=p), plain)
    for bad in (positions.expand(3, 5), positions[:4], positions - 1, positions + ours.cfg.n_ctx):
        with pytest.raises(gl.GPT2LabError, match="position_ids"):
            ours(x, position_ids=bad)
    with pytest.raises(gl.GPT2LabError, match="position_ids"):
        ours(x, position_ids=positions.float())
    # the same logits to rounding: a matmul over 4 rows may take another kernel than over 10
    torch.testing.assert_close(ours(x, logits_to_keep=2), plain[:, -2:], rtol=0, atol=1e-5)
    assert torch.equal(ours(x, logits_to_keep=99), plain)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(gl.GPT2LabError, match="logits_to_keep"):
            ours(x, logits_to_keep=bad)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: m([]), "non-empty list"),
        (lambda m: m(torch.zeros(0, 3, dtype=torch.long)), "empty"),
        (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), "empty"),
        (lambda m: m(torch.tensor([[1.0, 2.0]])), "integer tensor"),
        (lambda m: m(torch.tensor([[1]]), attention_mask=[[1]]), "attention_mask"),
        (lambda m: m(torch.tensor([[1]]), cache="cache"), "KVCache"),
        (lambda m: m(torch.tensor([[1]]), stop_at_layer=m.cfg.n_layers + 1), "stop_at_layer"),
        (lambda m: m(torch.tensor([[1]]), stop_at_layer="1"), "stop_at_layer"),
        (lambda m: m.new_cache(0), "batch"),
        (lambda m: m.new_cache(1.5), "batch"),
        (lambda m: m.new_cache(1, 0), "max_len"),
        (lambda m: m.new_cache(1, m.cfg.n_ctx + 1), "exceeds the context"),
        (lambda m: m.new_cache(batch=10**9), "would need .* of memory"),
        (lambda m: m.to_tokens(5), "string"),
        (lambda m: m.to_tokens(["a", 5]), "string"),
    ],
)
def test_bad_inputs_are_clear_errors(pair, call, words):
    ours, _ = pair
    with pytest.raises(gl.GPT2LabError, match=words) as err:
        call(ours)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@torch.no_grad()
def test_gpt2_medium_dimensions_match_transformers(tmp_path):
    hf = hf_model(
        seed=3, n_layer=24, n_embd=1024, n_head=16, n_positions=1024, initializer_range=0.02
    )
    hf.save_pretrained(tmp_path)
    ours = gl.load(tmp_path)
    x = tokens(1, 256, seed=15)
    diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"gpt2-medium size: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    ids, mask = left_padded([100, 37], seed=16)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    assert (ours(ids, attention_mask=mask)[real] - theirs[real]).abs().max().item() < 1e-4


def test_masks_cached_under_inference_mode_serve_autograd_later(pair):
    # The causal masks are cached per shape; one first made under inference_mode must
    # still work in a later forward that autograd records (and give the same logits).
    ours, _ = pair
    x = tokens(1, 33, seed=12)
    hook = [("blocks.0.attn.hook_pattern", lambda t, hook: t)]  # forces the explicit path
    with torch.inference_mode():
        first = ours.run_with_hooks(x, fwd_hooks=hook)
    out = ours.run_with_hooks(x, fwd_hooks=hook)
    out.sum().backward()
    assert ours.wte.weight.grad is not None
    ours.zero_grad(set_to_none=True)
    assert torch.equal(out.detach(), first)


def test_building_a_model_checks_memory_first(monkeypatch):
    # A model bigger than the free memory is a clear error before any allocation, not an
    # out-of-memory kill. On meta (what load() builds on before reading the file)
    # nothing is allocated, so nothing is checked.
    import gpt2lab.validate

    monkeypatch.setattr(gpt2lab.validate, "available_memory", lambda device=None: 1 << 30)
    cfg = gl.GPT2Config.preset("gpt2-medium")  # 1.42 GB in fp32
    with pytest.raises(gl.GPT2LabError, match=r"354,823,168 parameters would need 1\.4 GB"):
        gl.GPT2(cfg)
    with torch.device("meta"):
        assert gl.GPT2(cfg).wte.weight.is_meta
    with pytest.raises(gl.GPT2LabError, match="takes a GPT2Config"):
        gl.GPT2({"n_layers": 2})
