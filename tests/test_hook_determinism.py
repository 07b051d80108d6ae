"""What a hook reads does not depend on which other hooks are attached.

The rule (README, "Looking inside"): a forward with no hook of the model attached runs
the fused kernels; a forward with any hook attached computes every layer step by step
(LayerNorm, attention pattern, GELU), whatever the hooks. So a full `run_with_cache`,
a `names_filter` + `stop_at_layer` run, a single steering hook and a persistent hook
all see bit-identical activations and logits. The one exception is `hook_result`
(per-head outputs, opt-in as in TransformerLens): hooking it sums the heads' outputs
instead of one matmul over them.
"""

from __future__ import annotations

import random

import pytest
import torch

import gpt2lab

PROMPTS = ["TIMON. Why dost ask that? I have a friend here", "ROMEO: But soft"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request):
    return gpt2lab.load(dtype=request.param)


@pytest.fixture(scope="module")
def batch(model):
    return model.to_tokens(PROMPTS, return_mask=True)


@pytest.fixture(scope="module")
def full(model, batch):
    tokens, mask = batch
    return model.run_with_cache(tokens, attention_mask=mask)


def test_a_pattern_alone_equals_the_pattern_of_a_full_cache(model, batch, full):
    # TransformerLens' Main_Demo: torch.equal(cache pattern, names_filter + stop_at_layer)
    tokens, mask = batch
    _, cache = full
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_pattern"
        _, alone = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=name, stop_at_layer=layer + 1
        )
        assert torch.equal(alone[name], cache[name]), name


def _random_hook_sets(model, n: int) -> list[list[str]]:
    names = [n for n in model.hook_names() if not n.endswith("hook_result")]
    rng = random.Random(0)
    return [rng.sample(names, rng.randint(1, 6)) for _ in range(n)]


@pytest.mark.parametrize("which", range(12))
def test_logits_and_activations_do_not_depend_on_the_hook_set(model, batch, full, which):
    tokens, mask = batch
    logits, cache = full
    hook_set = _random_hook_sets(model, 12)[which]
    seen = {}

    def read(x, hook):
        seen[hook.name] = x.clone()

    hooked = model.run_with_hooks(
        tokens, attention_mask=mask, fwd_hooks=[(name, read) for name in hook_set]
    )
    assert torch.equal(hooked, logits)
    for name, value in seen.items():
        assert torch.equal(value, cache[name]), name


def test_a_persistent_hook_is_a_hook_like_any_other(model, batch, full):
    tokens, mask = batch
    logits, _ = full
    plain = model(tokens, attention_mask=mask)
    model.add_hook("blocks.1.mlp.hook_post", lambda x, hook: None)
    try:
        assert torch.equal(model(tokens, attention_mask=mask), logits)
    finally:
        model.reset_hooks()
    assert torch.equal(model(tokens, attention_mask=mask), plain)  # back to the fused kernels


def test_plain_and_hooked_forwards_agree_to_rounding(model, batch, full):
    # not bitwise (fused kernels vs step by step), but the same function
    tokens, mask = batch
    logits, _ = full
    plain = model(tokens, attention_mask=mask)
    tol = 1e-4 if model.dtype == torch.float32 else 0.25
    real = mask.bool()
    assert (plain - logits)[real].abs().max().item() < tol


def test_an_empty_hooks_block_asks_for_the_hooked_path(model, batch, full):
    # what patching does for its baselines, so that a patch restoring the clean run
    # scores exactly the clean metric
    tokens, mask = batch
    logits, _ = full
    with model.hooks():
        assert torch.equal(model(tokens, attention_mask=mask), logits)
    plain = model(tokens, attention_mask=mask)
    other = gpt2lab.load(dtype=model.dtype)  # another model's block does not count
    with other.hooks():
        assert torch.equal(model(tokens, attention_mask=mask), plain)
