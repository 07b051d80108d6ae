"""Shared fixtures: small GPT-2 checkpoints with random weights, made by transformers itself."""

from __future__ import annotations

import pytest
import torch

SMALL = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


def hf_model(seed: int = 0, **overrides):
    """A transformers GPT2LMHeadModel with random (non-trivial) weights, eager attention."""
    import transformers

    overrides = {"initializer_range": 0.2, **overrides}  # big enough that outputs depend on inputs
    cfg = transformers.GPT2Config(**{**SMALL, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises LayerNorms to 1/0 and biases to 0: randomise them too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_small():
    return hf_model()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, hf_small):
    path = tmp_path_factory.mktemp("hf_small")
    hf_small.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """For modules of hundreds of tiny forward passes: one thread avoids OpenMP's per-op
    hand-off cost, which on a 2-core machine costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
