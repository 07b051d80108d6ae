"""Shared fixtures: small GPT-2 checkpoints with random weights, made by transformers itself."""

from __future__ import annotations

import pytest
import torch

SMALL = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


def pytest_configure(config):
    """Kernel choices measured during the tests go to a cache file of this session (one
    the test processes and their subprocesses share), not the user's."""
    import os
    import tempfile

    if "GPT2LAB_KERNEL_CACHE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="gpt2lab-kernels-")
        os.environ["GPT2LAB_KERNEL_CACHE"] = os.path.join(folder, "kernels.json")


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


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """GPT-2's tokenizer in HF's layout, made by transformers from the vocabulary gpt2lab
    ships (no hub): what TransformerLens needs to be given, since it loads one by name."""
    import warnings
    from pathlib import Path

    from transformers import GPT2Tokenizer

    import gpt2lab

    data = Path(gpt2lab.__file__).parent / "data"
    path = tmp_path_factory.mktemp("gpt2_tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GPT2Tokenizer(
            vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"), add_prefix_space=False
        ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(hf_tokenizer_dir):
    """That tokenizer loaded by transformers (a fast GPT2TokenizerFast)."""
    import warnings

    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of hundreds of tiny forward passes: one thread avoids OpenMP's per-op
    hand-off cost, which on a 2-core machine costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
