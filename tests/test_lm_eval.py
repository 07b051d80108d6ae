"""lm-evaluation-harness integration: lm-eval's own evaluator on a tiny local task, and
each request type against transformers' GPT2LMHeadModel on the same random weights."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from gpt2lab import Tokenizer
from gpt2lab.lm_eval_model import GPT2LabLM

EOS = 50256
DATA = Path(__file__).parent / "data" / "lm_eval"
TOK = Tokenizer()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@torch.no_grad()
def hf_logprobs(hf, inputs: list[int], targets: list[int]) -> torch.Tensor:
    """log p(targets) read from the last len(targets) positions of one forward over inputs."""
    logits = hf(torch.tensor([inputs])).logits[0, -len(targets) :].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(targets)[:, None])[:, 0]


def expected_accuracies(hf) -> tuple[float, float]:
    """acc and acc_norm of the tiny task computed directly with transformers."""
    acc, acc_norm = [], []
    docs = [json.loads(line) for line in (DATA / "gpt2lab_tiny_mc.jsonl").open()]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            ctx = TOK.encode(context)
            cont = TOK.encode(context + " " + choice)[len(ctx) :]
            lls.append(float(hf_logprobs(hf, ctx + cont[:-1], cont).sum()))
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["answer"]))
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


def test_simple_evaluate_multiple_choice(hf_small, small_ckpt, monkeypatch):
    monkeypatch.chdir(DATA)  # the task's data_files path is relative
    results = lm_eval.simple_evaluate(
        model="gpt2lab",
        model_args=f"pretrained={small_ckpt},batch_size=4",
        tasks=["gpt2lab_tiny_mc"],
        task_manager=TaskManager(include_path=str(DATA)),
        bootstrap_iters=0,
    )
    got = results["results"]["gpt2lab_tiny_mc"]
    acc, acc_norm = expected_accuracies(hf_small)
    assert got["acc,none"] == pytest.approx(acc)
    assert got["acc_norm,none"] == pytest.approx(acc_norm)
    assert results["config"]["model"] == "gpt2lab"


def test_gpt2lab_eval_command_runs_lm_eval(hf_small, small_ckpt, monkeypatch, tmp_path):
    from gpt2lab import cli

    monkeypatch.chdir(DATA)
    with pytest.raises(SystemExit) as done:
        cli.main(["eval", "run", "--model", "gpt2lab", "--model_args",
                  f"pretrained={small_ckpt},batch_size=4", "--tasks", "gpt2lab_tiny_mc",
                  "--include_path", str(DATA),
                  "--output_path", str(tmp_path)])  # fmt: skip
    assert done.value.code == 0
    (results_file,) = tmp_path.rglob("results_*.json")
    got = json.loads(results_file.read_text())["results"]["gpt2lab_tiny_mc"]
    acc, acc_norm = expected_accuracies(hf_small)
    assert got["acc,none"] == pytest.approx(acc)
    assert got["acc_norm,none"] == pytest.approx(acc_norm)


def test_command_line_parsing_changes_nothing_process_wide(monkeypatch, capsys):
    """Only lm-eval's own parser objects give one-line errors, and only while parsing:
    while the evaluation runs, argparse (which other threads may be using) and sys.argv
    are as they were."""
    import argparse
    import sys

    from lm_eval._cli import HarnessCLI

    from gpt2lab import lm_eval_model

    original_error = argparse.ArgumentParser.__dict__["error"]
    argv = list(sys.argv)
    seen = {}

    def execute(self, args):
        seen["error"] = argparse.ArgumentParser.__dict__["error"]
        seen["argv"] = list(sys.argv)
        seen["model"] = args.model
        other = argparse.ArgumentParser(prog="other")
        other.add_argument("--n", type=int)
        with pytest.raises(SystemExit) as exit_:  # argparse as always: usage text, exit 2
            other.parse_args(["--n", "x"])
        seen["other_exit"] = exit_.value.code

    monkeypatch.setattr(HarnessCLI, "execute", execute)
    lm_eval_model.main(["run", "--model", "gpt2lab", "--tasks", "gpt2lab_tiny_mc"])
    assert seen == {"error": original_error, "argv": argv, "model": "gpt2lab", "other_exit": 2}
    assert "usage: other" in capsys.readouterr().err
    # a bad command line: one line and exit code 2, and nothing left changed afterwards
    for bad, words in ((["run", "--bogus-flag"], "--bogus-flag"),
                       (["--model", "gpt2lab", "--limit", "abc"], "--limit")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            lm_eval_model.main(bad)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gpt2lab: error: ") and words in err
        assert argparse.ArgumentParser.__dict__["error"] is original_error
        assert sys.argv == argv


def test_loglikelihood_matches_transformers(hf_small, small_ckpt):
    lm = GPT2LabLM(pretrained=str(small_ckpt), batch_size=2)
    pairs = [("The cat sat on the", " mat"), ("", "Hello world"), ("One two ", "three four")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    # lm-eval's split: trailing context whitespace joins the continuation; empty -> EOS
    for (ll, greedy), (ctx, cont) in zip(
        got,
        [("The cat sat on the", " mat"), (None, "Hello world"), ("One two", " three four")],
        strict=True,
    ):
        c = [EOS] if ctx is None else TOK.encode(ctx)
        t = TOK.encode((ctx or "") + cont)[len(c) if ctx is not None else 0 :]
        lp = hf_logprobs(hf_small, c + t[:-1], t)
        assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
        top = hf_small(torch.tensor([c + t[:-1]])).logits[0, -len(t) :].argmax(-1)
        assert greedy == bool((top == torch.tensor(t)).all())


def test_loglikelihood_rolling_windows(hf_small, small_ckpt):
    """lm-eval's rolling windows with max_length 16: each window is the 16 tokens ending
    just before its last target, the first one starting with EOS."""
    L = 16
    lm = GPT2LabLM(pretrained=str(small_ckpt), batch_size=3, max_length=L)
    texts = [
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness.",
        "Short text.",
    ]
    got = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    )
    for text, value in zip(texts, got, strict=True):
        full = [EOS, *TOK.encode(text)]
        n = len(full) - 1
        total = 0.0
        for s in range(0, n, L):
            e = min(s + L, n)
            a = max(0, e - L)
            total += float(hf_logprobs(hf_small, full[a:e], full[s + 1 : e + 1]).sum())
        assert value == pytest.approx(total, abs=1e-4)
    assert len(TOK.encode(texts[0])) > 2 * L  # several windows


def test_generate_until_matches_greedy_transformers(hf_small, small_ckpt):
    lm = GPT2LabLM(pretrained=str(small_ckpt), batch_size=4)
    contexts = ["Once upon a time", "The weather today is", "In the beginning God created"]
    full = []
    for ctx in contexts:
        ids = TOK.encode(ctx)
        out = hf_small.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24, do_sample=False, pad_token_id=EOS,
        )[0, len(ids) :].tolist()  # fmt: skip
        full.append(TOK.decode(out[: out.index(EOS)] if EOS in out else out))
    # stop strings taken from the second half of each greedy text, so they really cut;
    # one shared list, so the three prompts (different lengths) run as one padded batch
    until = [text[len(text) // 2 : len(text) // 2 + 3] for text in full]
    options = {"until": until, "max_gen_toks": 24, "do_sample": False}
    reqs = [Instance("generate_until", {}, (ctx, options), i) for i, ctx in enumerate(contexts)]
    reqs.append(Instance("generate_until", {}, (contexts[0], {"max_gen_toks": 24}), 9))
    got = lm.generate_until(reqs)
    want = []
    for text in full:
        cut = min(text.find(u) for u in until if u in text)
        want.append(text[:cut])
        assert cut < len(text) // 2 + 3
    assert got[:3] == want
    assert got[3] == full[0]


def test_dtype_int8_means_int8_weights(small_ckpt):
    """model_args dtype=int8, as documented: int8 weights with bf16 compute."""
    from gpt2lab.quantize import is_quantized

    lm = GPT2LabLM(pretrained=str(small_ckpt), dtype="int8")
    assert is_quantized(lm.model) and lm.model.dtype == torch.bfloat16


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "two", "0"])
def test_bad_batch_sizes_are_clear_errors(small_ckpt, value):
    from gpt2lab import GPT2LabError

    with pytest.raises(GPT2LabError, match="batch_size"):
        GPT2LabLM(pretrained=str(small_ckpt), batch_size=value)
