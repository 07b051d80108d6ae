"""Every `gpt2lab` subcommand over a table of bad arguments and bad files (issue 11).

The promise under test: whatever the user gets wrong, the CLI exits with code 1 (an
error the user caused) or 2 (a usage error), prints exactly one non-empty line on
stderr ("gpt2lab: error: ..." for code 1), and never a traceback. Most cases run
in-process through `gpt2lab.cli.main` (fast); a handful run as real `python -m gpt2lab`
processes, concurrently, so the exit code and stderr are exactly what a user sees.

Unwritable outputs are paths under a regular file (`a-file/out`) or in /proc: tests
may run as root, where chmod does not stop writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lab.checkpoint
from gpt2lab import GPT2LabError
from gpt2lab.cli import main
from gpt2lab.training.data import prepare

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
PATCH = ["patch", IOI_CLEAN, IOI_CORRUPT, "--answer", " Mary", "--wrong", " John"]
LENS_TRAIN = ["lens-train", "--data", "{text}", "--steps", "1", "--tokens-per-step", "64",
              "--seq-len", "16"]  # fmt: skip


# ---- the bad files -----------------------------------------------------------------------
def safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


@pytest.fixture(scope="module")
def paths(tmp_path_factory, small_ckpt) -> dict[str, str]:
    """Every bad (and a few good) file and folder the cases name, by key."""
    root = tmp_path_factory.mktemp("bad_inputs")
    made: dict[str, Path] = {"missing": root / "missing", "small": small_ckpt}
    made["empty"] = root / "empty.txt"
    made["empty"].write_text("")
    made["dir"] = root / "a-folder"
    made["dir"].mkdir()
    made["binary"] = root / "garbage.bin"
    made["binary"].write_bytes(bytes(range(256)) * 16)
    made["latin1"] = root / "latin1.txt"
    made["latin1"].write_bytes("café crème, à la carte ".encode("latin-1") * 20)
    made["file"] = root / "a-file"
    made["file"].write_text("a regular file, in the way of a folder")
    made["text"] = root / "text.txt"
    made["text"].write_text("The cat sat on the mat. It was a sunny day.\n" * 40)
    made["folder_html"] = root / "folder.html"
    made["folder_html"].mkdir()
    made["folder_png"] = root / "folder.png"
    made["folder_png"].mkdir()
    made["fifo"] = root / "a-fifo"
    os.mkfifo(made["fifo"])
    made["loop"] = root / "loop-a"
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    made["jsonl_latin1"] = root / "rows.jsonl"
    made["jsonl_latin1"].write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')

    config = json.loads((small_ckpt / "config.json").read_text())
    weights = (small_ckpt / "model.safetensors").read_bytes()

    def checkpoint(name: str, cfg=None, data: bytes | None = None, raw_config: bytes | None = None):
        folder = root / name
        folder.mkdir()
        if raw_config is not None:
            (folder / "config.json").write_bytes(raw_config)
        else:
            (folder / "config.json").write_text(json.dumps(config if cfg is None else cfg))
        (folder / "model.safetensors").write_bytes(weights if data is None else data)
        made[name] = folder

    checkpoint("truncated", data=weights[: len(weights) // 2])
    checkpoint("zero_bytes", data=b"")
    checkpoint("header_list", data=safetensors_with_header(b"[1, 2, 3]"))
    checkpoint("header_huge", data=struct.pack("<Q", 2**62) + b"{}")
    checkpoint("header_garbage", data=safetensors_with_header(b"\xff\xfe not json"))
    checkpoint("no_offsets", data=safetensors_with_header(
        json.dumps({"wte.weight": {"dtype": "F32", "shape": [2, 2]}}).encode()))  # fmt: skip
    checkpoint("weights_garbage", data=os.urandom(4096))
    checkpoint("cfg_types", cfg={**config, "n_layer": "two", "n_embd": [64]})
    checkpoint("cfg_bool", cfg={**config, "n_layer": True})
    checkpoint("cfg_negative", cfg={**config, "n_head": -4})
    checkpoint("cfg_nan_eps", cfg={**config, "layer_norm_epsilon": float("nan")})
    checkpoint("cfg_huge", cfg={**config, "n_layer": 200_000})
    checkpoint("cfg_list", cfg=[1, 2, 3])
    checkpoint("cfg_binary", raw_config=bytes(range(256)))
    checkpoint("cfg_empty", raw_config=b"")
    checkpoint("cfg_nested", raw_config=b"[" * 100_000 + b"]" * 100_000)

    toml = {
        "toml_binary": bytes(range(256)),
        "toml_syntax": b"[train\nlr = = 3",
        "toml_types": b'[data]\ndir = 5\n[train]\nmax_steps = "many"\n',
        "toml_unknown": b"[train]\nlearning_speed = 3\n",
        "toml_no_data": b"[train]\nmax_steps = 3\n",
    }
    for name, content in toml.items():
        made[name] = root / f"{name}.toml"
        made[name].write_bytes(content)

    shards = root / "shards"
    prepare([made["text"]], shards, val_fraction=0.0, progress=False)
    made["shards"] = shards
    made["good_toml"] = root / "good.toml"
    made["good_toml"].write_text(
        f"[model]\nn_layers = 1\nd_model = 32\nn_heads = 2\nn_ctx = 32\n"
        f"[data]\ndir = '{shards}'\n[train]\nmax_steps = 2\nseq_len = 16\nbatch_size = 2\n"
        f"out_dir = '{root / 'run'}'\n[log]\nprogress = false\n"
    )
    made["manifest_broken"] = root / "manifest_broken"
    made["manifest_broken"].mkdir()
    (made["manifest_broken"] / "manifest.json").write_text('{"tokenizer": "gpt2", "dtype": ')
    return {key: str(path) for key, path in made.items()}


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    """Nothing here may use a real Hugging Face cache or the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("empty_hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("GPT2LAB_DEBUG", raising=False)


def fill(args: list[str], paths: dict[str, str]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: paths[m.group(1)], a) for a in args]


# ---- the table: case -> (arguments, exit code, words the one line must contain) ------------
CASES: dict[str, tuple[list[str], int, str]] = {
    # usage errors (typer): exit code 2, still one line
    "no-command-args": (["generate"], 2, "Missing argument"),
    "unknown-command": (["frobnicate"], 2, "No such command"),
    "unknown-option": (["info", "{small}", "--colour"], 2, "No such option"),
    "not-an-int": (["generate", "hi", "-n", "many"], 2, "--max-new-tokens"),
    "not-a-float": (["generate", "hi", "--temperature", "warm"], 2, "--temperature"),
    "int-overflow-text": (["score", "hi", "--stride", "1e999"], 2, "--stride"),
    "prepare-no-out": (["prepare", "{text}"], 2, "--out"),
    "patch-no-answer": (["patch", "a b", "a c", "--wrong", " x"], 2, "--answer"),
    "lens-train-no-data": (["lens-train", "--out", "{missing}"], 2, "--data"),
    # info
    "tune-rows-not-ints": (["tune", "--rows", "x"], 1, "--rows"),
    "tune-rows-zero": (["tune", "--rows", "0"], 1, "rows"),
    "tune-unknown-dtype": (["tune", "--dtypes", "fp8"], 1, "dtypes"),
    "tune-missing-model": (["tune", "--model", "{missing}"], 1, "does not exist"),
    "convert-missing": (["convert", "{missing}", "{missing}.gguf"], 1, "does not exist"),
    "serve-missing-model": (["serve", "--model", "{missing}"], 1, "does not exist"),
    "serve-bad-dtype": (["serve", "--dtype", "fp8"], 1, "--dtype"),
    "serve-port-range": (["serve", "--port", "70000"], 2, "--port"),
    "serve-max-batch-zero": (["serve", "--max-batch", "0"], 2, "--max-batch"),
    "serve-queue-not-int": (["serve", "--max-queue", "lots"], 2, "--max-queue"),
    "serve-timeout-zero": (["serve", "--request-timeout", "0"], 2, "--request-timeout"),
    "serve-connections-zero": (["serve", "--max-connections", "0"], 2, "--max-connections"),
    "serve-body-timeout-zero": (["serve", "--body-timeout", "0"], 2, "--body-timeout"),
    "serve-steering-missing": (["serve", "--steering-dir", "{missing}"], 1, "does not exist"),
    "serve-lens-missing": (["serve", "--tuned-lens", "{missing}"], 1, "does not exist"),
    "convert-unknown-dtype": (
        ["convert", "{small}", "{missing}.gguf", "--dtype", "q4_0"],
        1,
        "q4_0",
    ),
    "convert-unknown-format": (
        ["convert", "{small}", "{missing}", "--format", "zip"],
        1,
        "--format",
    ),
    "convert-not-gguf": (["convert", "{binary}", "{missing}", "--format", "hf"], 1, "config.json"),
    "info-missing": (["info", "{missing}"], 1, "does not exist"),
    "info-empty-dir": (["info", "{dir}"], 1, "config.json"),
    "info-binary-file": (["info", "{binary}"], 1, "config.json"),
    "info-truncated": (["info", "{truncated}"], 1, "truncated"),
    "info-zero-bytes": (["info", "{zero_bytes}"], 1, "model.safetensors"),
    "info-header-list": (["info", "{header_list}"], 1, "model.safetensors"),
    "info-header-huge": (["info", "{header_huge}"], 1, "model.safetensors"),
    "info-header-garbage": (["info", "{header_garbage}"], 1, "model.safetensors"),
    "info-no-offsets": (["info", "{no_offsets}"], 1, "model.safetensors"),
    "info-cfg-types": (["info", "{cfg_types}"], 1, "n_layers"),
    "info-cfg-bool": (["info", "{cfg_bool}"], 1, "n_layers"),
    "info-cfg-negative": (["info", "{cfg_negative}"], 1, "n_heads"),
    "info-cfg-nan-eps": (["info", "{cfg_nan_eps}"], 1, "eps"),
    "info-cfg-huge": (["info", "{cfg_huge}"], 1, "n_layers"),
    "info-cfg-list": (["info", "{cfg_list}"], 1, "config.json"),
    "info-cfg-binary": (["info", "{cfg_binary}"], 1, "config.json"),
    "info-cfg-empty": (["info", "{cfg_empty}"], 1, "config.json"),
    "info-cfg-nested": (["info", "{cfg_nested}"], 1, "config.json"),
    "info-dev-null": (["info", "/dev/null"], 1, "/dev/null"),
    "info-proc": (["info", "/proc"], 1, "config.json"),
    "info-unknown-preset": (["info", "gpt9-huge"], 1, "gpt9-huge"),
    "info-fifo": (["info", "{fifo}"], 1, "a-fifo"),
    "info-symlink-loop": (["info", "{loop}"], 1, "loop-a"),
    "info-name-too-long": (["info", "x" * 5000], 1, "too long"),
    # generate: models
    "gen-weights-garbage": (["generate", "hi", "-m", "{weights_garbage}"], 1, "model.safetensors"),
    "gen-header-list": (["generate", "hi", "-m", "{header_list}"], 1, "model.safetensors"),
    "gen-cfg-types": (["generate", "hi", "-m", "{cfg_types}"], 1, "n_layers"),
    "gen-cfg-huge": (["generate", "hi", "-m", "{cfg_huge}"], 1, "n_layers"),
    "gen-cfg-binary": (["generate", "hi", "-m", "{cfg_binary}"], 1, "config.json"),
    # generate: options
    "gen-negative-n": (["generate", "hi", "-n", "-5"], 1, "max_new_tokens"),
    "gen-zero-n": (["generate", "hi", "-n", "0"], 1, "max_new_tokens"),
    "gen-huge-n": (["generate", "hi", "-n", str(10**12)], 1, "context"),
    "gen-nan-temperature": (["generate", "hi", "-t", "nan"], 1, "temperature"),
    "gen-inf-temperature": (["generate", "hi", "-t", "inf"], 1, "temperature"),
    "gen-negative-temperature": (["generate", "hi", "-t", "-1"], 1, "temperature"),
    "gen-top-p-zero": (["generate", "hi", "-t", "1", "--top-p", "0"], 1, "top_p"),
    "gen-top-p-nan": (["generate", "hi", "-t", "1", "--top-p", "nan"], 1, "top_p"),
    "gen-top-k-negative": (["generate", "hi", "-t", "1", "--top-k", "-3"], 1, "top_k"),
    "gen-min-p-two": (["generate", "hi", "-t", "1", "--min-p", "2"], 1, "min_p"),
    "gen-typical-nan": (["generate", "hi", "-t", "1", "--typical-p", "nan"], 1, "typical_p"),
    "gen-repetition-zero": (["generate", "hi", "--repetition-penalty", "0"], 1, "repetition"),
    "gen-ngram-negative": (["generate", "hi", "--no-repeat-ngram-size", "-1"], 1, "ngram"),
    "gen-min-new-negative": (["generate", "hi", "--min-new-tokens", "-4"], 1, "min_new_tokens"),
    "gen-beams-zero": (["generate", "hi", "--num-beams", "0"], 1, "num_beams"),
    "gen-beams-negative": (["generate", "hi", "--num-beams", "-2"], 1, "num_beams"),
    "gen-length-penalty-nan": (
        ["generate", "hi", "--num-beams", "2", "--length-penalty", "nan"],
        1,
        "length_penalty",
    ),  # fmt: skip
    "gen-penalty-alpha": (["generate", "hi", "--penalty-alpha", "2", "--top-k", "4"], 1, "alpha"),
    "gen-max-time-nan": (["generate", "hi", "--max-time", "nan"], 1, "max_time"),
    "gen-max-time-negative": (["generate", "hi", "--max-time", "-1"], 1, "max_time"),
    "gen-seed-negative": (["generate", "hi", "-t", "1", "--seed", "-1"], 1, "seed"),
    "gen-seed-huge": (["generate", "hi", "-t", "1", "--seed", str(2**70)], 1, "seed"),
    "gen-stop-empty": (["generate", "hi", "--stop", ""], 1, "stop"),
    "gen-dtype": (["generate", "hi", "--dtype", "int4"], 1, "int4"),
    "gen-device": (["generate", "hi", "--device", "tpu:9"], 1, "tpu:9"),
    "gen-long-prompt": (["generate", "word " * 300, "-n", "1"], 1, "context"),
    # score
    "score-missing-file": (["score", "@{missing}"], 1, "does not exist"),
    "score-empty-file": (["score", "@{empty}"], 1, "empty"),
    "score-folder": (["score", "@{dir}"], 1, "not a file"),
    "score-binary": (["score", "@{binary}"], 1, "UTF-8"),
    "score-latin1": (["score", "@{latin1}"], 1, "UTF-8"),
    "score-bare-at": (["score", "@"], 1, "file name"),
    "score-empty-text": (["score", ""], 1, "empty"),
    "score-stride-zero": (["score", "hello world", "--stride", "0"], 1, "stride"),
    "score-stride-negative": (["score", "hello world", "--stride", "-4"], 1, "stride"),
    "score-stride-huge": (["score", "hello world", "--stride", str(10**9)], 1, "stride"),
    "score-one-token-no-bos": (["score", "hi", "--no-bos"], 1, "two tokens"),
    "score-bad-model": (["score", "hi", "-m", "{cfg_types}"], 1, "n_layers"),
    "score-dtype": (["score", "hi", "--dtype", "int4"], 1, "int4"),
    # prepare
    "prepare-missing": (["prepare", "{missing}", "--out", "{missing}_out"], 1, "does not exist"),
    "prepare-empty": (["prepare", "{empty}", "--out", "{missing}_out1"], 1, "no text"),
    "prepare-binary": (["prepare", "{binary}", "--out", "{missing}_out2"], 1, "binary"),
    "prepare-shard-zero": (
        ["prepare", "{text}", "--out", "{missing}_3", "--shard-tokens", "0"],
        1,
        "shard_tokens",
    ),  # fmt: skip
    "prepare-shard-negative": (
        ["prepare", "{text}", "--out", "{missing}_4", "--shard-tokens", "-100"],
        1,
        "shard_tokens",
    ),  # fmt: skip
    "prepare-val-nan": (
        ["prepare", "{text}", "--out", "{missing}_5", "--val-fraction", "nan"],
        1,
        "val_fraction",
    ),  # fmt: skip
    "prepare-val-one": (
        ["prepare", "{text}", "--out", "{missing}_6", "--val-fraction", "1"],
        1,
        "val_fraction",
    ),  # fmt: skip
    "prepare-val-negative": (
        ["prepare", "{text}", "--out", "{missing}_7", "--val-fraction", "-0.5"],
        1,
        "val_fraction",
    ),  # fmt: skip
    "prepare-empty-field": (
        ["prepare", "{text}", "--out", "{missing}_8", "--field", ""],
        1,
        "field",
    ),  # fmt: skip
    "prepare-jsonl-not-utf8": (
        ["prepare", "{jsonl_latin1}", "--out", "{missing}_9"],
        1,
        "rows.jsonl:2 is not UTF-8",
    ),  # fmt: skip
    "prepare-out-is-file": (["prepare", "{text}", "--out", "{file}"], 1, "is a file"),
    "prepare-out-under-file": (["prepare", "{text}", "--out", "{file}/out"], 1, "not a folder"),
    "prepare-out-in-proc": (["prepare", "{text}", "--out", "/proc/gpt2lab-out"], 1, "/proc"),
    "prepare-out-not-a-dataset": (["prepare", "{text}", "--out", "{small}"], 1, "no gpt2lab"),
    # train
    "train-missing": (["train", "{missing}.toml"], 1, "does not exist"),
    "train-folder": (["train", "{dir}"], 1, "directory"),
    "train-empty": (["train", "{empty}"], 1, "data.dir"),
    "train-binary": (["train", "{toml_binary}"], 1, "UTF-8"),
    "train-syntax": (["train", "{toml_syntax}"], 1, "toml_syntax"),
    "train-types": (["train", "{toml_types}"], 1, "config"),
    "train-unknown-key": (["train", "{toml_unknown}"], 1, "learning_speed"),
    "train-no-data": (["train", "{toml_no_data}"], 1, "data.dir"),
    "train-bad-set": (["train", "{good_toml}", "--set", "nonsense"], 1, "nonsense"),
    "train-set-unknown": (["train", "{good_toml}", "--set", "train.bogus=1"], 1, "bogus"),
    "train-lr-inf": (["train", "{good_toml}", "--set", "train.lr=inf"], 1, "lr"),
    "train-beta1": (["train", "{good_toml}", "--set", "train.beta1=2"], 1, "beta1"),
    "train-keep-negative": (["train", "{good_toml}", "--set", "checkpoint.keep=-1"], 1, "keep"),
    "train-data-missing": (
        ["train", "{good_toml}", "--set", "data.dir='{missing}'"],
        1,
        "manifest.json",
    ),  # fmt: skip
    "train-data-broken": (
        ["train", "{good_toml}", "--set", "data.dir='{manifest_broken}'"],
        1,
        "manifest.json",
    ),  # fmt: skip
    "train-out-under-file": (
        ["train", "{good_toml}", "--set", "train.out_dir='{file}/run'"],
        1,
        "a-file",
    ),  # fmt: skip
    "train-out-in-proc": (
        ["train", "{good_toml}", "--set", "train.out_dir='/proc/gpt2lab-run'"],
        1,
        "/proc",
    ),  # fmt: skip
    # patch
    "patch-out-under-file": ([*PATCH, "--out", "{file}/fig.html"], 1, "not a folder"),
    "patch-out-in-proc": ([*PATCH, "--out", "/proc/fig.html"], 1, "/proc"),
    "patch-out-is-folder": ([*PATCH, "--out", "{folder_html}"], 1, "is a folder"),
    "patch-out-suffix": ([*PATCH, "--out", "{dir}/fig.pdf"], 1, ".png or .html"),
    "patch-out-missing-folder": ([*PATCH, "--out", "{missing}/fig.html"], 1, "does not exist"),
    "patch-batch-zero": ([*PATCH, "--batch", "0"], 1, "batch"),
    "patch-what": ([*PATCH, "--what", "bogus"], 1, "bogus"),
    "patch-lengths-differ": (
        ["patch", "a b", "a c d", "--answer", " x", "--wrong", " y"],
        1,
        "same number of tokens",
    ),  # fmt: skip
    "patch-answer-two-tokens": (
        ["patch", "a b", "a c", "--answer", " xylophone", "--wrong", " y"],
        1,
        "xylophone",
    ),  # fmt: skip
    "patch-empty-prompts": (["patch", "", "", "--answer", " x", "--wrong", " y"], 1, ""),
    "patch-bad-model": ([*PATCH, "-m", "{header_list}"], 1, "model.safetensors"),
    # lens
    "lens-out-under-file": (["lens", "hello world", "--out", "{file}/x.html"], 1, "not a folder"),
    "lens-out-in-proc": (["lens", "hello world", "--out", "/proc/x.html"], 1, "/proc"),
    "lens-png-in-proc": (["lens", "hello world", "--out", "/proc/x.png"], 1, "/proc"),
    "lens-out-is-folder": (["lens", "hello world", "--out", "{folder_png}"], 1, "is a folder"),
    "lens-out-suffix": (["lens", "hello world", "--out", "{dir}/x.txt"], 1, ".png or .html"),
    "lens-empty-prompt": (["lens", ""], 1, "empty"),
    "lens-k-zero": (["lens", "hello", "-k", "0"], 1, "k"),
    "lens-k-huge": (["lens", "hello", "-k", str(10**9)], 1, "k"),
    "lens-color-by": (["lens", "hello", "--color-by", "rainbow"], 1, "rainbow"),
    "lens-target-two-tokens": (["lens", "hello", "--target", " xylophone"], 1, "xylophone"),
    "lens-tuned-missing": (["lens", "hello", "--tuned", "{missing}"], 1, "tuned lens"),
    "lens-tuned-file": (["lens", "hello", "--tuned", "{binary}"], 1, "tuned lens"),
    "lens-tuned-empty-folder": (["lens", "hello", "--tuned", "{dir}"], 1, "tuned lens"),
    "lens-long-prompt": (["lens", "word " * 300], 1, "context"),
    # lens-train
    "lt-out-is-file": ([*LENS_TRAIN, "--out", "{file}"], 1, "is a file"),
    "lt-out-under-file": ([*LENS_TRAIN, "--out", "{file}/lens"], 1, "not a folder"),
    "lt-out-in-proc": ([*LENS_TRAIN, "--out", "/proc/gpt2lab-lens"], 1, "/proc"),
    "lt-data-missing": (
        ["lens-train", "--data", "{missing}", "--out", "{missing}_l"],
        1,
        "does not exist",
    ),  # fmt: skip
    "lt-data-binary": (["lens-train", "--data", "{binary}", "--out", "{missing}_l"], 1, "UTF-8"),
    "lt-data-empty-folder": (
        ["lens-train", "--data", "{dir}", "--out", "{missing}_l"],
        1,
        "manifest.json",
    ),  # fmt: skip
    "lt-data-broken-manifest": (
        ["lens-train", "--data", "{manifest_broken}", "--out", "{missing}_l"],
        1,
        "manifest.json",
    ),  # fmt: skip
    "lt-eval-missing": ([*LENS_TRAIN, "--out", "{missing}_l", "--eval", "{missing}"], 1, "--eval"),
    "lt-steps-zero": ([*LENS_TRAIN, "--out", "{missing}_l", "--steps", "0"], 1, "steps"),
    "lt-seq-len-zero": ([*LENS_TRAIN, "--out", "{missing}_l", "--seq-len", "0"], 1, "seq_len"),
    "lt-seq-len-huge": (
        [*LENS_TRAIN, "--out", "{missing}_l", "--seq-len", str(10**9)],
        1,
        "seq_len",
    ),  # fmt: skip
    "lt-lr-nan": ([*LENS_TRAIN, "--out", "{missing}_l", "--lr", "nan"], 1, "lr"),
    "lt-lr-negative": ([*LENS_TRAIN, "--out", "{missing}_l", "--lr", "-1"], 1, "lr"),
    "lt-optimizer": (
        [*LENS_TRAIN, "--out", "{missing}_l", "--optimizer", "rmsprop"],
        1,
        "optimizer",
    ),  # fmt: skip
    "lt-tokens-zero": (
        [*LENS_TRAIN, "--out", "{missing}_l", "--tokens-per-step", "0"],
        1,
        "tokens_per_step",
    ),  # fmt: skip
    # eval (lm-eval's own command line: its errors become one line too)
    "eval-bad-flag": (["eval", "run", "--bogus-flag"], 2, "--bogus-flag"),
    "eval-bad-limit": (["eval", "run", "--model", "gpt2lab", "--limit", "abc"], 2, "--limit"),
    "eval-unknown-task": (
        [
            "eval",
            "--model",
            "gpt2lab",
            "--model_args",
            "device=cpu",
            "--tasks",
            "no_such_task_anywhere",
        ],
        1,
        "no_such_task_anywhere",
    ),  # fmt: skip
}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line(code, out: str, err: str, expected_code: int, words: str) -> None:
    """Exit code 1 or 2 as expected, one non-empty stderr line, no traceback anywhere."""
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {err!r}"
    assert code == expected_code, (code, err)
    assert lines[0].startswith("gpt2lab: error: "), lines[0]
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_code(case, paths, offline, capsys, tmp_path):
    args, expected_code, words = CASES[case]
    argv = fill(args, paths)
    before = sorted(os.listdir(Path(paths["dir"])))
    assert_one_line(*run_main(argv, capsys), expected_code, fill([words], paths)[0])
    assert sorted(os.listdir(Path(paths["dir"]))) == before  # nothing left in the way


def test_serve_on_a_port_in_use_says_so(capsys):
    """The port is bound before the model loads: in use, it is one line, not a log."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_main(["serve", "--port", str(port)], capsys)
    assert_one_line(code, out, err, 1, f"cannot listen on 127.0.0.1:{port}")


def test_every_subcommand_is_covered():
    from gpt2lab.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {args[0] for args, _, _ in CASES.values()}
    assert commands <= covered | {"frobnicate"}, commands - covered


# ---- the same through real processes --------------------------------------------------------
PROCESS_CASES = {
    "info-cfg-binary": (["info", "{cfg_binary}"], 1, "config.json"),
    "score-binary": (["score", "@{binary}"], 1, "UTF-8"),
    "prepare-shard-zero": (
        ["prepare", "{text}", "--out", "{missing}_p", "--shard-tokens", "0"],
        1,
        "shard_tokens",
    ),  # fmt: skip
    "train-binary": (["train", "{toml_binary}"], 1, "UTF-8"),
    "lens-out-in-proc": (["lens", "hello", "--out", "/proc/x.html"], 1, "/proc"),
    "usage": (["generate", "hi", "-n", "many"], 2, "--max-new-tokens"),
    # a million beams once asked for ~24 GB (the OOM killer ended it); capped address space
    "beams-huge": (["generate", "hi", "--num-beams", "1000000", "-n", "5"], 1, "beams"),
}


def limit_memory() -> None:
    """Run in the child: a runaway allocation fails there instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))


@pytest.fixture(scope="module")
def process_runs(paths, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "GPT2LAB_DEBUG")}
    env.update(HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_HUB_OFFLINE="1",
               PYTHONIOENCODING="utf-8")  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gpt2lab", *fill(args, paths)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=limit_memory,
        )  # fmt: skip
        for name, (args, _, _) in PROCESS_CASES.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_bad_input_in_a_real_process(case, process_runs, paths):
    _, expected_code, words = PROCESS_CASES[case]
    run = process_runs[case]
    assert run.stdout == ""
    assert_one_line(run.returncode, run.stdout, run.stderr, expected_code, words)


# ---- the handler itself: every kind of exception a command can raise -------------------------
class BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("no string for you")


def unicode_error() -> UnicodeDecodeError:
    try:
        b"\xff".decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    raise AssertionError


def chained_empty() -> GPT2LabError:
    try:
        raise KeyError("n_layer")
    except KeyError as cause:
        error = GPT2LabError()
        error.__cause__ = cause
        return error


RAISED = {
    "empty-message": (GPT2LabError(), "gpt2lab: error: GPT2LabError (no details given"),
    "empty-with-cause": (
        chained_empty(),
        "gpt2lab: error: GPT2LabError caused by KeyError: 'n_layer'",
    ),
    "multi-line": (
        GPT2LabError("first line\n  second line\n"),
        "gpt2lab: error: first line second line",
    ),
    "permission": (
        PermissionError(errno.EACCES, "Permission denied", "/x/out.png"),
        "gpt2lab: error: /x/out.png: Permission denied",
    ),  # fmt: skip
    "read-only": (
        OSError(errno.EROFS, "Read-only file system", "/ro/f"),
        "gpt2lab: error: /ro/f: Read-only file system",
    ),  # fmt: skip
    "disk-full": (
        OSError(errno.ENOSPC, "No space left on device"),
        "gpt2lab: error: No space left on device",
    ),  # fmt: skip
    "is-a-directory": (
        IsADirectoryError(errno.EISDIR, "Is a directory", "cfg"),
        "gpt2lab: error: cfg: Is a directory",
    ),  # fmt: skip
    "rename": (
        OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"),
        "gpt2lab: error: a -> b: Invalid cross-device link",
    ),  # fmt: skip
    "bare-os-error": (OSError(), "gpt2lab: error: OSError (no details given"),
    "not-utf8": (unicode_error(), "gpt2lab: error: a file is not UTF-8 text"),
    "memory": (MemoryError(), "gpt2lab: error: out of memory"),
    "torch-cpu-oom": (
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"),
        "gpt2lab: error: out of memory",
    ),  # fmt: skip
    "bug": (
        ZeroDivisionError("division by zero"),
        "gpt2lab: internal error: ZeroDivisionError: division by zero (a bug: please report "
        "it; GPT2LAB_DEBUG=1 shows the traceback)",
    ),  # fmt: skip
    "bug-multi-line": (ValueError("a\nb"), "gpt2lab: internal error: ValueError: a b (a bug"),
    "bug-broken-str": (BrokenStr(), "gpt2lab: internal error: BrokenStr: BrokenStr (no details"),
    "ours-multi-line": (GPT2LabError("a\n  b\tc\r\n"), "gpt2lab: error: a b c"),
    "tabs-and-blank-lines": (GPT2LabError("\n\tfirst\t line \n\n"), "gpt2lab: error: first line"),
}


def test_cli_words_errors_with_the_shared_helpers():
    """One way to fold a message onto a line, shared with the library (errors.py)."""
    import gpt2lab.cli
    import gpt2lab.errors

    assert gpt2lab.cli.one_line is gpt2lab.errors.one_line


@pytest.fixture
def raising_info(monkeypatch):
    """Make `gpt2lab info` raise whatever the test sets."""
    box = {}

    def resolve(model):
        raise box["error"]

    monkeypatch.setattr(gpt2lab.checkpoint, "resolve", resolve)
    return box


@pytest.mark.parametrize("case", list(RAISED))
def test_every_exception_becomes_one_line(case, raising_info, offline, capsys):
    error, expected = RAISED[case]
    raising_info["error"] = error
    code, out, err = run_main(["info", "x"], capsys)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(expected), err


def test_debug_env_shows_the_real_exception(raising_info, offline, monkeypatch):
    monkeypatch.setenv("GPT2LAB_DEBUG", "1")
    raising_info["error"] = ZeroDivisionError("boom")
    with pytest.raises(ZeroDivisionError, match="boom"):
        main(["info", "x"])


def test_interrupt_and_broken_pipe(raising_info, offline, capsys, monkeypatch):
    raising_info["error"] = KeyboardInterrupt()
    code, _, err = run_main(["info", "x"], capsys)
    assert code == 130 and err.count("\n") <= 1 and "Traceback" not in err
    raising_info["error"] = BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main swaps it for /dev/null
    code, _, err = run_main(["info", "x"], capsys)
    assert code == 1 and err == ""


def test_bare_command_prints_help(offline, capsys):
    code, out, err = run_main([], capsys)
    assert code in (0, 2) and "Usage" in out + err and "Traceback" not in out + err


# ---- nothing is left behind by the refusals ----------------------------------------------------
def test_refused_outputs_leave_nothing_behind(paths, offline, capsys):
    root = Path(paths["dir"]).parent
    before = {p.name for p in root.iterdir()}
    for case in ("prepare-out-under-file", "prepare-shard-zero", "lt-out-under-file",
                 "patch-out-under-file", "lens-out-under-file"):  # fmt: skip
        args, expected_code, words = CASES[case]
        assert_one_line(*run_main(fill(args, paths), capsys), expected_code, words)
    assert {p.name for p in root.iterdir()} == before
    assert Path(paths["file"]).read_text().startswith("a regular file")
    assert not list(root.glob(".*probe*")) and not list(root.glob(".*tmp-*"))


@pytest.fixture(autouse=True, scope="module")
def _fewer_threads():
    """Hundreds of tiny runs: one thread avoids OpenMP hand-off costs on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cleanup_of_case_outputs(paths):
    """No case may have created its output: every `{missing}_...` path is still absent."""
    root = Path(paths["missing"]).parent
    assert not [p.name for p in root.iterdir() if p.name.startswith("missing")]
    shutil.rmtree(root / "run", ignore_errors=True)
