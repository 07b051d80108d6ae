"""Data preparation and the trainer: exact resume, multi-process equivalence, recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt2lab as gl
from gpt2lab.training import data as data_mod
from gpt2lab.training import recipes, trainer
from gpt2lab.training.config import load_config
from gpt2lab.training.data import TokenShards, prepare

# About 2 KB of plain English prose (public domain: the opening of Pride and Prejudice).
PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters.\n"
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is '
    'let at last?"\nMr. Bennet replied that he had not.\n"But it is," returned she; "for Mrs. Long '
    'has just been here, and she told me all about it."\nMr. Bennet made no answer.\n"Do you not '
    'want to know who has taken it?" cried his wife impatiently.\n"You want to tell me, and I have '
    'no objection to hearing it."\nThis was invitation enough.\n"Why, my dear, you must know, Mrs. '
    "Long says that Netherfield is taken by a young man of large fortune from the north of England; "
    "that he came down on Monday in a chaise and four to see the place, and was so much delighted "
    "with it, that he agreed with Mr. Morris immediately; that he is to take possession before "
    'Michaelmas, and some of his servants are to be in the house by the end of next week."\n'
    '"What is his name?"\n"Bingley."\n"Is he married or single?"\n"Oh! Single, my dear, to be '
    "sure! A single man of large fortune; four or five thousand a year. What a fine thing for our "
    'girls!"\n"How so? How can it affect them?"\n"My dear Mr. Bennet," replied his wife, "how '
    'can you be so tiresome! You must know that I am thinking of his marrying one of them."\n"Is '
    'that his design in settling here?"\n"Design! Nonsense, how can you talk so! But it is very '
    "likely that he may fall in love with one of them, and therefore you must visit him as soon as "
    'he comes."\n"I see no occasion for that. You and the girls may go, or you may send them by '
    "themselves, which perhaps will be still better, for as you are as handsome as any of them, Mr. "
    'Bingley may like you the best of the party."\n'
)

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_ctx=64"]
QUIET = ["log.progress=false", "eval.iters=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A prepared dataset: eight short documents, one of which lands in val."""
    src = tmp_path_factory.mktemp("corpus_src")
    sentences = PROSE.split("\n")
    for i in range(8):
        (src / f"doc{i}.txt").write_text("\n".join(sentences[i::3]) + "\n")
    out = tmp_path_factory.mktemp("corpus")
    prepare([src], out, val_fraction=0.25, seed=0, progress=False)
    return out


def run_config(tmp_path, corpus, *extra):
    return load_config(
        None,
        [
            *TINY,
            *QUIET,
            "train.seq_len=32",
            f"data.dir='{corpus}'",
            f"train.out_dir='{tmp_path}'",
            *extra,
        ],  # fmt: skip
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


# ---- prepare ----------------------------------------------------------------------------
def test_prepare_writes_documents_with_endoftext(tmp_path):
    tok = gl.Tokenizer()
    docs = ["First document.\nWith two lines.", "Second one, café ☕.", "Third!"]
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(docs):
        (src / f"{i}.txt").write_text(text)
    manifest = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    ids = np.fromfile(tmp_path / "out" / "train_0000.bin", dtype=np.uint16).tolist()
    expected = [t for text in docs for t in tok.encode(text) + [tok.eot_token]]
    assert ids == expected
    assert manifest["tokens"] == {"train": len(expected), "val": 0}
    assert manifest["documents"] == {"train": 3, "val": 0}
    assert manifest["tokenizer"] == "gpt2" and manifest["vocab_size"] == 50257


def test_prepare_jsonl_split_by_document_and_shards(tmp_path):
    tok = gl.Tokenizer()
    records = [{"text": f"Document number {i}: " + "words " * (i % 7), "id": i} for i in range(60)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    manifest = prepare(
        [path], tmp_path / "out", val_fraction=0.2, shard_tokens=100, seed=3, progress=False
    )
    train = TokenShards(tmp_path / "out", "train")
    val = TokenShards(tmp_path / "out", "val")
    assert len(manifest["splits"]["train"]) > 1  # rolled over into several shards
    assert all(s["tokens"] <= 100 for s in manifest["splits"]["train"])
    streams = {
        split: shards.window(0, shards.n_tokens).tolist()
        for split, shards in (("train", train), ("val", val))
    }
    # every document is whole in exactly one split, followed by <|endoftext|>
    by_split = {"train": [], "val": []}
    for i, r in enumerate(records):
        split = "val" if data_mod._goes_to_val(i, 0.2, 3) else "train"
        by_split[split] += tok.encode(r["text"]) + [tok.eot_token]
    assert streams == by_split
    assert 0 < manifest["documents"]["val"] < 60


def test_prepare_large_file_in_pieces_gives_identical_ids(tmp_path, monkeypatch):
    text = (PROSE + "  indented\n\n\n\tTabs and   spaces \n") * 40
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 1000)
    assert len(list(data_mod._text_pieces(path))) > 10
    prepare([path], tmp_path / "out", val_fraction=0.0, progress=False)
    ids = np.fromfile(tmp_path / "out" / "train_0000.bin", dtype=np.uint16).tolist()
    tok = gl.Tokenizer()
    assert ids == tok.encode(text) + [tok.eot_token]


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(gl.GPT2LabError, match="does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(gl.GPT2LabError, match="no text"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", progress=False)
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(gl.GPT2LabError, match="field 'text'"):
        prepare([tmp_path / "x.jsonl"], tmp_path / "out", progress=False)


def test_batches_depend_only_on_seed_and_index(corpus):
    shards = TokenShards(corpus, "train")
    x1, y1 = shards.batch(4, 16, seed=5, index=7)
    x2, y2 = shards.batch(4, 16, seed=5, index=7)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert not torch.equal(shards.batch(4, 16, seed=5, index=8)[0], x1)


# ---- training ---------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    from gpt2lab.training.optim import lr_at

    cfg = load_config(None, ["data.dir='x'", "model.preset='tiny'", "train.lr=1e-3", "train.warmup_steps=10",
                             "train.max_steps=110", "train.seq_len=32"])  # fmt: skip
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_memorises_a_2kb_text(tmp_path):
    (tmp_path / "prose.txt").write_text(PROSE)
    assert 1900 <= len(PROSE.encode()) <= 2200
    prepare([tmp_path / "prose.txt"], tmp_path / "data", val_fraction=0.0, progress=False)
    # Random 128-token windows over ~500 tokens: the whole text is seen many times per step.
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_ctx=128",
                             f"data.dir='{tmp_path / 'data'}'", f"train.out_dir='{tmp_path / 'out'}'",
                             "train.batch_size=4", "train.seq_len=128", "train.max_steps=200",
                             "train.warmup_steps=10", "train.lr=5e-3", "train.weight_decay=0.0",
                             "train.dtype='float32'", "eval.every=0", "checkpoint.every=1000",
                             "log.every=1", *QUIET])  # fmt: skip
    trainer.train(cfg)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    ]
    last = sum(losses[-10:]) / 10
    print(f"loss: first {losses[0]:.3f}, mean of the last 10 steps {last:.4f}")
    assert last < 0.1


def test_resume_after_sigkill_is_bit_identical(tmp_path, corpus):
    common = [*TINY, *QUIET, f"data.dir='{corpus}'", "train.batch_size=8", "train.seq_len=32",
              "train.max_steps=30", "train.warmup_steps=5", "checkpoint.every=2", "checkpoint.keep=3",
              "eval.every=10", "train.dtype='float32'"]  # fmt: skip
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("")

    def cli(out, *more):
        args = [sys.executable, "-m", "gpt2lab", "train", str(cfg_file)]
        for item in [*common, f"train.out_dir='{out}'"]:
            args += ["--set", item]
        return args + list(more)

    subprocess.run(cli(tmp_path / "a"), check=True, capture_output=True)

    proc = subprocess.Popen(
        cli(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    target = tmp_path / "b" / "checkpoints" / "step_0000010.pt"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run finished before it could be killed"
    killed_at = trainer.latest_checkpoint(tmp_path / "b")
    print(f"killed after {killed_at.name}")
    subprocess.run(cli(tmp_path / "b", "--resume"), check=True, capture_output=True)

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, corpus, monkeypatch):
    cfg = run_config(tmp_path / "run", corpus, "train.max_steps=6", "checkpoint.every=2", "train.warmup_steps=2",
                     "train.batch_size=2", "train.seq_len=16", "eval.every=0")  # fmt: skip
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half of it, then "die"
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    monkeypatch.setattr(trainer.torch, "save", real_save)
    latest = trainer.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step_0000002.pt"
    state = trainer._load_state(latest)
    assert state["step"] == 2
    trainer.train(cfg, resume=True)
    reference = run_config(tmp_path / "ref", corpus, "train.max_steps=6", "checkpoint.every=2",
                           "train.warmup_steps=2", "train.batch_size=2", "train.seq_len=16", "eval.every=0")  # fmt: skip
    trainer.train(reference)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_with_double_accumulation(tmp_path, corpus):
    common = [*TINY, *QUIET, f"data.dir='{corpus}'", "train.batch_size=4", "train.seq_len=32",
              "train.max_steps=5", "train.warmup_steps=2", "eval.every=0", "checkpoint.every=100"]  # fmt: skip
    (tmp_path / "run.toml").write_text("")

    def sets(items):
        return [a for item in items for a in ("--set", item)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "gpt2lab", "train", str(tmp_path / "run.toml")]  # fmt: skip
    two = subprocess.run(torchrun + sets([*common, "train.grad_accum=1", f"train.out_dir='{tmp_path / 'ddp'}'"]),
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = run_config(tmp_path / "one", corpus, *common, "train.grad_accum=2")
    trainer.train(one)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "one")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"2 processes vs 1 with double accumulation: max |diff| {worst:.2e}")
    assert worst < 1e-5
    start = trainer.build_model(one, torch.device("cpu")).state_dict()["wte.weight"]
    assert (a["transformer.wte.weight"] - start).abs().max() > 1e-4  # training really happened


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("base")
    cfg = run_config(out, corpus, "train.max_steps=10", "train.warmup_steps=2", "train.lr=3e-3",
                     "eval.every=0", "checkpoint.every=100", "train.batch_size=4", "train.seq_len=32")  # fmt: skip
    return trainer.train(cfg)


def test_embeddings_only_recipe_freezes_every_block(tmp_path, corpus, base_ckpt):
    cfg = run_config(tmp_path, corpus, f"model.init_from='{base_ckpt}'", "train.recipe='embeddings-only'",
                     "train.max_steps=4", "train.warmup_steps=1", "train.lr=1e-2", "eval.every=0",
                     "train.batch_size=4", "train.seq_len=32")  # fmt: skip
    before = load_file(Path(base_ckpt) / "model.safetensors")
    after = final_weights(Path(trainer.train(cfg)).parent)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == ["transformer.wte.weight"]


def test_freeze_and_only_patterns(tmp_path, corpus, base_ckpt):
    cfg = run_config(tmp_path, corpus, f"model.init_from='{base_ckpt}'", "train.only=['blocks.1.*']",
                     "train.freeze=['blocks.1.mlp.*']", "train.max_steps=2", "train.warmup_steps=1",
                     "eval.every=0", "train.batch_size=2", "train.seq_len=16")  # fmt: skip
    before = load_file(Path(base_ckpt) / "model.safetensors")
    after = final_weights(Path(trainer.train(cfg)).parent)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"transformer.h.1.{m}" for m in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight",
                     "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias")}  # fmt: skip


def test_ln_free_recipe_removes_every_layernorm(tmp_path, corpus, base_ckpt):
    cfg = run_config(tmp_path, corpus, f"model.init_from='{base_ckpt}'", "train.recipe='ln-free'",
                     "train.ln_free_start=2", "train.ln_free_gap=1", "train.max_steps=9", "train.warmup_steps=1",
                     "train.lr=1e-3", "eval.every=3", "train.batch_size=4", "train.seq_len=32")  # fmt: skip
    final = trainer.train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    print(
        f"ln-free held-out loss: before {report['val_loss_start']:.4f}, after {report['val_loss_end']:.4f}"
    )
    assert np.isfinite(report["val_loss_start"]) and np.isfinite(report["val_loss_end"])
    model = gl.load(final)
    assert model.cfg.ln_free
    # the forward pass no longer divides by a live std: every LayerNorm is affine in its input
    x = torch.randint(0, 50257, (1, 12))
    scales = []
    with model.hooks([(lambda n: n.endswith("hook_scale"), lambda t, hook: scales.append(t))]):
        model(x)
    assert len(scales) == 2 * model.cfg.n_layers + 1
    assert all(torch.equal(s, torch.ones_like(s)) for s in scales)
    ln = model.blocks[0].ln1
    v = torch.randn(3, model.cfg.d_model)
    assert torch.allclose(ln(2 * v) - ln.bias, 2 * (ln(v) - ln.bias), atol=1e-5)


def test_folding_fixed_scales_preserves_logits(hf_small, small_ckpt):
    model = gl.load(small_ckpt)
    sites = recipes.ln_sites(model)
    sigmas = {site: 0.5 + i / 10 for i, site in enumerate(sites)}
    recipes.apply_ln_schedule(model, sigmas, {site: 0 for site in sites}, step=0)
    x = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        before = model(x)
        recipes.fold_ln_scales(model)
        after = model(x)
    assert (before - after).abs().max().item() < 1e-5 * before.abs().max().item()
    assert model.cfg.ln_free


# ---- bad input ----------------------------------------------------------------------------
def test_bad_configs_are_named(tmp_path, corpus):
    with pytest.raises(gl.GPT2LabError, match="unknown key train.learning_rate"):
        load_config(
            None, ["train.learning_rate=1e-3", f"data.dir='{corpus}'", "model.preset='tiny'"]
        )
    with pytest.raises(gl.GPT2LabError, match=r"train.lr must be a number, got 'fast'"):
        load_config(None, ["train.lr=fast", f"data.dir='{corpus}'", "model.preset='tiny'"])
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nlr = "fast"\n[data]\ndir = "x"\n')
    with pytest.raises(gl.GPT2LabError, match="train.lr must be a number"):
        load_config(toml)
    toml.write_text("[trian]\nlr = 1\n")
    with pytest.raises(gl.GPT2LabError, match=r"unknown section \[trian\]"):
        load_config(toml)
    with pytest.raises(gl.GPT2LabError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_bad_data_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(gl.GPT2LabError, match="no manifest.json"):
        trainer.train(run_config(tmp_path, tmp_path / "missing"))
    other = tmp_path / "other_vocab"
    other.mkdir()
    manifest = json.loads((corpus / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 32000}))
    with pytest.raises(gl.GPT2LabError, match="vocabulary of 32000 tokens"):
        trainer.train(run_config(tmp_path, other))
    (other / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "llama"}))
    with pytest.raises(gl.GPT2LabError, match="tokenizer 'llama'"):
        trainer.train(run_config(tmp_path, other))


def test_resume_with_another_model_shape_is_refused(tmp_path, corpus):
    trainer.train(run_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.every=1", "eval.every=0",
                             "train.batch_size=2", "train.seq_len=16"))  # fmt: skip
    with pytest.raises(gl.GPT2LabError, match="another model shape"):
        trainer.train(
            run_config(
                tmp_path,
                corpus,
                "model.n_layers=3",
                "train.max_steps=4",
                "train.batch_size=2",
                "train.seq_len=16",
            ),
            resume=True,
        )
    with pytest.raises(gl.GPT2LabError, match="no checkpoint"):
        trainer.train(run_config(tmp_path / "fresh", corpus), resume=True)


def test_cli_train_error_is_one_line(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[train]\nlr = "fast"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "train", str(toml)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "train.lr must be a number" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("autocast", [False, True])
def test_in_place_cross_entropy_equals_torch(autocast):
    from gpt2lab.training.loss import cross_entropy

    torch.manual_seed(0)
    h = torch.randn(3, 40, 32)
    W = torch.randn(1000, 32) * 0.5
    y = torch.randint(0, 1000, (3, 40))
    results = []
    for fn in (
        lambda logits: torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()),
        lambda logits: cross_entropy(logits, y),
    ):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = fn(hh @ WW.T) * 3.0  # a non-unit upstream gradient
        loss.backward()
        results.append((loss.item(), hh.grad, WW.grad))
    (l_ref, gh_ref, gw_ref), (l_new, gh_new, gw_new) = results
    tol = 1e-2 if autocast else 1e-5  # bf16 matmuls round the gradients
    assert abs(l_ref - l_new) < 1e-5 * abs(l_ref)
    assert (gh_ref - gh_new).abs().max().item() < tol * gh_ref.abs().max().item()
    assert (gw_ref - gw_new).abs().max().item() < tol * gw_ref.abs().max().item()
