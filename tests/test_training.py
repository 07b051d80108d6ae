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
    """A prepared dataset: eight short documents (fewer than 20: each one's last quarter
    of tokens is val)."""
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


def split_streams(out: Path) -> dict[str, list[int]]:
    return {
        split: shards.window(0, shards.n_tokens).tolist() if shards.n_tokens else []
        for split in ("train", "val")
        for shards in [TokenShards(out, split)]
    }


def by_tokens(texts: list[str], val_fraction: float) -> dict[str, list[int]]:
    """The split by tokens, written out: each document's last round(f x n) tokens to
    val, the rest to train, each part followed by <|endoftext|>."""
    tok = gl.Tokenizer()
    split = {"train": [], "val": []}
    for text in texts:
        ids = tok.encode(text)
        cut = len(ids) - int(val_fraction * len(ids) + 0.5)
        for name, part in (("train", ids[:cut]), ("val", ids[cut:])):
            if part:
                split[name] += part + [tok.eot_token]
    return split


def test_one_file_is_split_by_tokens(tmp_path, capsys):
    """nanoGPT's one-file corpus: a split by document put all of it in train or val."""
    (tmp_path / "play.txt").write_text(PROSE)
    manifest = prepare([tmp_path / "play.txt"], tmp_path / "out", progress=False)
    assert split_streams(tmp_path / "out") == by_tokens([PROSE], 0.05)
    n = len(gl.Tokenizer().encode(PROSE))
    assert manifest["tokens"] == {"train": n - round(0.05 * n) + 1, "val": round(0.05 * n) + 1}
    assert manifest["split"] == {"by": "tokens", "val_fraction": 0.05,
                                 "reason": "1 document, fewer than 20"}  # fmt: skip
    assert manifest["documents"] == {"train": 1, "val": 1}

    from gpt2lab.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "play.txt"), "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"{tmp_path / 'cli'}: train {manifest['tokens']['train']:,} tokens, val "
        f"{manifest['tokens']['val']:,} tokens: split by tokens (1 document, fewer than 20), "
        "the last 5% of each document's tokens is val"
    )


def test_few_documents_are_each_split_by_tokens_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "COPY_TOKENS", 7)  # copied in many small blocks
    texts = [PROSE[i * 300 : (i + 1) * 300] for i in range(5)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    files = [tmp_path / f"{i}.txt" for i in range(5)]
    manifest = prepare(files, tmp_path / "out", val_fraction=0.3, shard_tokens=40, progress=False)
    assert split_streams(tmp_path / "out") == by_tokens(texts, 0.3)
    assert len(manifest["splits"]["train"]) > 1 and len(manifest["splits"]["val"]) > 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for split in ("train", "val") for s in manifest["splits"][split]]
    )  # fmt: skip
    again = prepare(files, tmp_path / "again", val_fraction=0.3, shard_tokens=40, progress=False)
    assert again == manifest  # deterministic (the seed plays no part)


def test_many_documents_are_split_by_document_unless_val_is_left_empty(tmp_path):
    tok = gl.Tokenizer()
    texts = [f"Document {i}. " + PROSE[i * 50 : i * 50 + 200] for i in range(25)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare([path], tmp_path / "out", val_fraction=0.2, seed=1, progress=False)
    assert manifest["split"] == {"by": "document", "val_fraction": 0.2, "seed": 1}
    expected = {"train": [], "val": []}
    for i, text in enumerate(texts):
        split = "val" if data_mod._goes_to_val(i, 0.2, 1) else "train"
        expected[split] += tok.encode(text) + [tok.eot_token]
    assert split_streams(tmp_path / "out") == expected and expected["val"]

    # 25 documents, none of which draws val at 1%: split by tokens instead
    assert not any(data_mod._goes_to_val(i, 0.01, 0) for i in range(25))
    manifest = prepare([path], tmp_path / "tiny_val", val_fraction=0.01, progress=False)
    assert manifest["split"]["reason"] == "the split by document left val empty"
    assert split_streams(tmp_path / "tiny_val") == by_tokens(texts, 0.01)
    assert manifest["tokens"]["val"] > 0

    # no val asked for: none made
    manifest = prepare([path], tmp_path / "no_val", val_fraction=0.0, progress=False)
    assert manifest["split"]["by"] == "document" and manifest["tokens"]["val"] == 0


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


@pytest.mark.slow  # ~70 s on 2 cores: the default suite keeps the fast training checks
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


# ---- what a run prints and reports ------------------------------------------------------------
def test_plain_progress_lines_at_an_interval_each_evaluation_and_the_end():
    """Not on a terminal: one line for the first step, then at most one every `every_s`
    seconds, plus every evaluation and the last step (a fake clock: 1 s per step)."""
    import io

    from gpt2lab.training.console import Console

    now = [0.0]
    stream = io.StringIO()
    console = Console(stream=stream, tty=False, every_s=10, clock=lambda: now[0])
    console.start(0, 100)
    for step in range(1, 101):
        now[0] = float(step)
        record = {"step": step, "loss": 5 - step / 100, "lr": 1e-3, "mfu": 0.25,
                  "tokens_per_s": 1000.0 if step % 2 else 3000.0}  # fmt: skip
        if step % 25 == 0:
            record["val_loss"] = 6 - step / 100
        console.step(record)
    lines = stream.getvalue().splitlines()
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == [1, 11, 21, 25, 35, 45, 50, 60, 70, 75, 85, 95, 100]
    by_step = dict(zip(steps, lines, strict=True))
    # tokens/s: the mean over the steps since the previous line (1000 and 3000 -> 1500)
    assert by_step[11] == ("train: step 11/100 (11%), loss 4.8900, 1,500 tok/s, MFU 25.0%, "
                           "elapsed 11s, ETA 1m29s")  # fmt: skip
    assert ", val 5.7500, " in by_step[25] and "ETA 1m15s" in by_step[25]
    assert ", val 5.5000 (step 50), " in by_step[60]
    assert by_step[100].endswith("elapsed 1m40s, ETA 0s")


def test_a_run_prints_its_phases_progress_and_summary(tmp_path, corpus):
    import io

    from gpt2lab.training.console import Console

    stream = io.StringIO()
    cfg = run_config(tmp_path, corpus, "log.progress=true", "train.max_steps=3", "eval.every=2",
                     "train.batch_size=2", "train.seq_len=16", "train.warmup_steps=1")  # fmt: skip
    trainer.train(cfg, console=Console(stream=stream, tty=False, every_s=0))
    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        "train: building the model (2 layers, d_model 32, 2 heads, context 64) on cpu"
    )
    assert lines[1].startswith("train: 1.64M parameters on cpu (float32); ")
    assert lines[2] == "train: first evaluation (2 batches of 2 x 16 tokens)"
    assert lines[3].startswith("train: val loss at step 0: ")
    assert lines[4] == "train: measuring the device's matmul speed (the reference of MFU)"
    assert [line.split()[2] for line in lines[5:8]] == ["1/3", "2/3", "3/3"]
    assert " val " in lines[6] and " ETA " in lines[7]
    assert lines[8].startswith("train: done: 3 steps, 96 tokens in ")
    assert lines[8].endswith(f"final model in {tmp_path / 'final'}, best in {tmp_path / 'best'}")
    assert len(lines) == 9


@pytest.mark.parametrize("columns", [80, 200])
def test_on_a_terminal_a_bar_instead_of_step_lines(tmp_path, corpus, monkeypatch, columns):
    import io

    from gpt2lab.training.console import Console

    monkeypatch.setenv("COLUMNS", str(columns))  # rich sizes its console from COLUMNS
    stream = io.StringIO()
    cfg = run_config(tmp_path, corpus, "train.max_steps=3", "eval.every=3", "train.batch_size=2",
                     "train.seq_len=16", "train.warmup_steps=1")  # fmt: skip
    trainer.train(cfg, console=Console(stream=stream, tty=True))
    lines = stream.getvalue().splitlines()
    assert not any(line.startswith("train: step") for line in lines)
    assert lines[0].startswith("train: building the model")
    bar = lines[-2]  # rich draws the finished bar once more when it stops (not a terminal here)
    # a narrow terminal cuts the numbers at the end; the counts and times keep their width
    assert len(bar) <= columns and bar.startswith("train ━") and " 3/3 0:00:" in bar
    assert " ETA 0:00:00 loss " in bar and ", val " in bar
    if columns == 200:
        assert bar.rstrip().endswith(" tok/s") or ", MFU " in bar
    assert lines[-1].startswith("train: done: 3 steps")


def test_report_holds_losses_tokens_time_and_paths(tmp_path, corpus):
    cfg = run_config(tmp_path, corpus, "train.max_steps=6", "eval.every=2", "train.batch_size=2",
                     "train.seq_len=16", "train.warmup_steps=1", "train.lr=3e-3")  # fmt: skip
    trainer.train(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(vals) == [2, 4, 6]
    best_step = min(vals, key=vals.get)
    assert report["val_loss_final"] == vals[6]
    assert report["val_loss_best"] == vals[best_step] and report["best_step"] == best_step
    assert report["val_loss_start"] > max(vals.values())  # it learned something
    assert report["steps"] == 6 and report["tokens_seen"] == 6 * 2 * 16
    speed = report["tokens_seen"] / report["train_time_s"]  # times are rounded to 1 ms
    assert report["tokens_per_s"] == pytest.approx(speed, rel=0.01)
    assert 0 < report["train_time_s"] < report["wall_time_s"]
    assert (report["device"], report["dtype"], report["processes"]) == ("cpu", "float32", 1)
    assert report["final"] == str(tmp_path / "final") and report["best"] == str(tmp_path / "best")
    assert gl.load(report["best"]) and gl.load(report["final"])


def test_an_empty_val_split_is_one_warning_and_a_report_without_losses(tmp_path, capsys):
    (tmp_path / "prose.txt").write_text(PROSE)
    prepare([tmp_path / "prose.txt"], tmp_path / "data", val_fraction=0.0, progress=False)
    cfg = run_config(tmp_path / "run", tmp_path / "data", "train.max_steps=2", "eval.every=1",
                     "train.batch_size=2", "train.seq_len=16")  # fmt: skip
    capsys.readouterr()
    trainer.train(cfg)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt2lab: warning: the val split of "), err
    assert "has 0 tokens" in err and "no best/" in err and "--val-fraction" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["val_loss_start"] is None and report["val_loss_final"] is None
    assert report["val_loss_best"] is None and report["best"] is None
    assert not (tmp_path / "run" / "best").exists()


def test_train_redirected_to_a_file_writes_progress_lines(tmp_path, corpus):
    """`gpt2lab train run.toml > log.txt`: plain lines (a bar would write nothing readable)."""
    (tmp_path / "run.toml").write_text("")
    sets = [*TINY, "eval.iters=2", f"data.dir='{corpus}'", f"train.out_dir='{tmp_path / 'run'}'",
            "train.max_steps=3", "eval.every=3", "train.batch_size=2", "train.seq_len=16",
            "train.warmup_steps=1"]  # fmt: skip
    with open(tmp_path / "log.txt", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "gpt2lab", "train", str(tmp_path / "run.toml"),
             *[a for item in sets for a in ("--set", item)]],
            stdout=log, stderr=subprocess.PIPE, check=True,
        )  # fmt: skip
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0].startswith("train: building the model")
    assert any(line.startswith("train: step 1/3 (33%), loss ") for line in lines), lines
    assert any(
        line.startswith("train: step 3/3 (100%), loss ") and " val " in line for line in lines
    )
    assert lines[-1].startswith("train: done: 3 steps, 96 tokens in ")
    assert f"final model in {tmp_path / 'run' / 'final'}, best in " in lines[-1]


def test_the_example_configs_load():
    """configs/cpu.toml (the CPU-sized example) and configs/gpu-gpt2.toml parse and pass
    every check; the CPU one is small enough for a CPU (a few minutes on 2 cores)."""
    root = Path(__file__).resolve().parent.parent / "configs"
    cpu = load_config(root / "cpu.toml")
    assert cpu.train.device == "cpu" and cpu.data.dir == "data/shakespeare"
    params = sum(p.numel() for p in gl.GPT2(cpu.model_config()).parameters())
    assert (
        params < 10e6 and cpu.train.max_steps * cpu.train.batch_size * cpu.train.seq_len <= 600_000
    )
    gpu = load_config(root / "gpu-gpt2.toml")
    assert (gpu.model.preset, gpu.train.dtype, gpu.train.device) == ("gpt2", "bfloat16", "cuda")
    assert (gpu.train.batch_size, gpu.train.seq_len, gpu.train.grad_accum, gpu.train.max_steps) == (
        16,
        256,
        4,
        2000,
    )
    assert load_config(root / "bundled.toml").data.dir == "data/bundled/shards"


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
