"""The bundled model: found with no name, readable by transformers, and the CLI's default."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
from transformers import GPT2LMHeadModel

import gpt2lab as gl
from gpt2lab.checkpoint import bundled_dir

# Held out by construction: the val split of scripts/bundled_data.py is these four plays.
PASSAGE = (
    "FLAVIUS. Have you forgot me, sir?\n"
    "TIMON. Why dost ask that? I have forgot all men;\n"
    "Then, if thou grant'st thou'rt a man, I have forgot thee.\n"
)


def reference() -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(bundled_dir(), dtype=torch.float32).eval()


def test_load_without_a_name_gives_the_bundled_model():
    model = gl.load()
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (4, 256, 4, 50257)
    size = (bundled_dir() / "model.safetensors").stat().st_size
    print(f"bundled weights: {size / 1e6:.1f} MB")
    assert size <= 40e6
    ids = torch.tensor([model.tokenizer.encode(PASSAGE)])
    with torch.inference_mode():
        ours = model(ids)
        theirs = reference()(ids).logits
    diff = (ours - theirs).abs().max().item()
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).item()
    print(f"max |logit diff| vs transformers {diff:.2e}; loss on a held-out passage {loss:.3f}")
    assert diff < 1e-4
    # trained: far better than a uniform guess over the vocabulary (ln 50257 = 10.8 nats)
    assert loss < math.log(50257) / 2


def test_cli_default_generates_with_the_bundled_model():
    """No --model: the bundled model. By default the CLI samples (temperature 0.8, top-k
    200, seed 0: the API with those options); --greedy is transformers' greedy search."""
    runs = {
        flags: subprocess.Popen(
            [sys.executable, "-m", "gpt2lab", "generate", "ROMEO:", "--max-new-tokens", "24",
             *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for flags in ((), ("--greedy",))
    }  # fmt: skip
    out = {}
    for flags, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[flags] = stdout.rstrip("\n")
    tok = gl.Tokenizer()
    prompt = torch.tensor([tok.encode("ROMEO:")])
    with torch.inference_mode():
        expect = (
            reference()
            .generate(
                prompt, max_new_tokens=24, do_sample=False, pad_token_id=50256, eos_token_id=50256
            )[0, prompt.shape[1] :]
            .tolist()
        )
    text = tok.decode(expect[: expect.index(50256)] if 50256 in expect else expect)
    assert out[("--greedy",)] == "ROMEO:" + text
    sampled = gl.load().generate("ROMEO:", max_new_tokens=24, temperature=0.8, top_k=200, seed=0)
    assert out[()] == "ROMEO:" + sampled
    assert sampled != text
