"""The `gpt2lab` command line: `info` and `generate` against references, and user errors
as one line on stderr with exit code 1 (the main cases run as real `python -m gpt2lab`
subprocesses, so the exit code and stderr are the ones a user sees; more cases go
in-process through the same `main`)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.cli import app, main
from gpt2lab.tokenizer import Tokenizer

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def offline_home(tmp_path_factory) -> Path:
    """An empty HF_HOME, so nothing here can use a real cache or the network."""
    return tmp_path_factory.mktemp("empty_hf_home")


@pytest.fixture
def offline(monkeypatch, offline_home):
    monkeypatch.setenv("HF_HOME", str(offline_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def cli_env(home: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    }
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return env


def run_cli_many(jobs: dict[str, list[str]], home: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run `python -m gpt2lab ARGS` for every job at once (each spends most of its time
    importing torch) and collect the exit codes and outputs."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gpt2lab", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=cli_env(home),
        )
        for name, args in jobs.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def fields(output: str) -> dict[str, list[str]]:
    """`key  value` rows of `gpt2lab info` (a key may repeat, e.g. `file`)."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        key, _, value = re.split(r"(\s{2,})", line.strip(), maxsplit=1)
        rows.setdefault(key, []).append(value.strip())
    return rows


def hf_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied lm_head counted once


# ---- 7. info ------------------------------------------------------------------------
def test_info_of_a_directory(small_ckpt, hf_small, offline):
    result = invoke("info", str(small_ckpt))
    assert result.exit_code == 0, result.output
    rows = fields(result.output)
    assert rows["layers"] == ["2"]
    assert rows["d_model"] == ["64"]
    assert rows["context"] == ["128"]
    assert rows["vocabulary"] == ["50257"]
    count = hf_param_count(hf_small)
    assert rows["parameters"][0].split()[0] == f"{count:,}"
    assert rows["directory"] == [str(small_ckpt)]
    names = {f.split(" (")[0] for f in rows["file"]}
    assert names == {p.name for p in small_ckpt.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors"} <= names
    size = (small_ckpt / "model.safetensors").stat().st_size / 2**20
    assert f"model.safetensors ({size:.1f} MiB)" in rows["file"]
    assert rows["stored dtype"] == ["F32"]


def test_info_shows_bf16_dtype(small_ckpt, tmp_path, offline):
    gpt2lab.load(small_ckpt, dtype="bfloat16").save(tmp_path)
    result = invoke("info", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert fields(result.output)["stored dtype"] == ["BF16"]


def test_info_of_a_preset_offline_without_cache(offline, offline_home):
    assert not any(offline_home.iterdir())
    result = invoke("info", "gpt2-medium")
    assert result.exit_code == 0, result.output
    rows = fields(result.output)
    assert rows["layers"] == ["24"]
    assert rows["d_model"] == ["1024"]
    assert rows["heads"][0].startswith("16 ")
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16)
        )
    assert rows["parameters"][0].split()[0] == f"{hf_param_count(hf):,}"
    assert "not available" in rows["files"][0]
    assert str(offline_home / "hub") in rows["files"][0]


# ---- 8. generate -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_continuation(hf_small) -> str:
    tok = Tokenizer()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        out = hf_small.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.eot_token,
        )
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == 8 or tok.eot_token in new
    if tok.eot_token in new:  # both stop at <|endoftext|>
        new = new[: new.index(tok.eot_token)]
    return tok.decode(new)


def test_generate_greedy_matches_library_and_transformers(small_ckpt, hf_continuation, offline):
    library = gpt2lab.load(small_ckpt).generate(PROMPT, max_new_tokens=8)  # the API: greedy
    assert library == hf_continuation
    assert library  # something was generated
    for flag in (["--greedy"], ["--temperature", "0"], ["--greedy", "-t", "0"]):
        result = invoke("generate", PROMPT, "--model", str(small_ckpt), "-n", "8", *flag)
        assert result.exit_code == 0, result.output
        assert result.output == PROMPT + hf_continuation + "\n"


def test_generate_samples_by_default_like_nanogpt(small_ckpt, offline):
    """No options: temperature 0.8, top-k 200, seed 0, the same text every time; the API
    called with those options gives it."""
    args = ["generate", PROMPT, "--model", str(small_ckpt), "-n", "8"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output
    lm = gpt2lab.load(small_ckpt)
    expected = lm.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_k=200, seed=0)
    assert first.output == PROMPT + expected + "\n"
    assert expected != lm.generate(PROMPT, max_new_tokens=8)  # not greedy
    # the defaults apply one by one; beams and contrastive search do not sample
    top_k_all = invoke(*args, "--top-k", "0", "--seed", "1")
    assert (
        top_k_all.output
        == PROMPT + lm.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_k=0, seed=1) + "\n"
    )
    beams = invoke(*args, "--num-beams", "2")
    assert beams.output == PROMPT + lm.generate(PROMPT, max_new_tokens=8, num_beams=2) + "\n"
    contrastive = invoke(*args, "--penalty-alpha", "0.6", "--top-k", "4")
    assert (
        contrastive.output
        == PROMPT + lm.generate(PROMPT, max_new_tokens=8, penalty_alpha=0.6, top_k=4) + "\n"
    )


def test_generate_greedy_refuses_sampling_options(small_ckpt, offline, capsys):
    rc, out, err = run_main(
        ["generate", PROMPT, "--model", str(small_ckpt), "--greedy", "--top-p", "0.9"], capsys
    )
    assert_one_line_error(rc, out, err, "--greedy does not sample; drop --top-p")


def test_generate_reads_the_prompt_from_a_file(small_ckpt, tmp_path, offline, capsys):
    prompt = "Il était une fois, à Paris,\n"  # non-ASCII, and the final newline is kept
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    lm = gpt2lab.load(small_ckpt)
    result = invoke(
        "generate", f"@{tmp_path / 'prompt.txt'}", "--model", str(small_ckpt), "-n", "6"
    )
    assert result.exit_code == 0, result.output
    expected = lm.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=200, seed=0)
    assert result.output == prompt + expected + "\n"
    literal = invoke("generate", "@@home", "--model", str(small_ckpt), "-n", "3", "--greedy")
    assert literal.output == "@home" + lm.generate("@home", max_new_tokens=3) + "\n"
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = {
        "@": "give a file name after @ (generate @FILE)",
        f"@{tmp_path / 'nope.txt'}": "does not exist or is not a file",
        f"@{tmp_path}": "is not a file",
        f"@{tmp_path / 'latin1.txt'}": "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)",
    }
    for arg, words in cases.items():
        rc, out, err = run_main(["generate", arg, "--model", str(small_ckpt)], capsys)
        assert_one_line_error(rc, out, err, words)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


COMPUTING = ["generate", "score", "lens", "lens-train", "patch", "train", "eval"]


def test_threads_on_every_command_that_computes(small_ckpt, offline, restore_threads, capsys):
    import typer

    commands = typer.main.get_command(app).commands
    for name in COMPUTING:
        (option,) = [p for p in commands[name].params if p.name == "threads"]
        assert option.opts == ["--threads"] and "CPU threads" in option.help
    target = 1 if torch.get_num_threads() != 1 else 2
    result = invoke(
        "generate", PROMPT, "--model", str(small_ckpt), "-n", "2", "--threads", str(target)
    )
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == target  # set for the process, before the work
    for name in ("generate", "lens"):
        rc, out, err = run_main([name, "hi", "--threads", "0"], capsys)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1
        assert err.startswith("gpt2lab: error: Invalid value for '--threads'")


def test_info_without_a_model_is_the_bundled_one(offline):
    from gpt2lab.checkpoint import bundled_dir

    result = invoke("info")
    assert result.exit_code == 0, result.output
    rows = fields(result.output)
    assert rows["model"] == ["bundled"] and rows["layers"] == ["4"]
    assert rows["directory"] == [str(bundled_dir())]
    named = invoke("info", "bundled")  # the name --model takes too
    assert named.exit_code == 0 and named.output == result.output


def test_generate_sampling_is_seeded(small_ckpt, offline):
    args = ["generate", PROMPT, "--model", str(small_ckpt), "-n", "8"]
    first = invoke(*args, "--temperature", "0.8", "--seed", "3")
    second = invoke(*args, "--temperature", "0.8", "--seed", "3")
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    assert first.output == second.output
    expected = gpt2lab.load(small_ckpt).generate(
        PROMPT, max_new_tokens=8, temperature=0.8, top_k=200, seed=3
    )
    assert first.output == PROMPT + expected + "\n"
    # a different seed samples from the same distribution with other draws
    others = {invoke(*args, "--temperature", "0.8", "--seed", str(s)).output for s in (4, 5)}
    assert others - {first.output}


# ---- 9. errors ---------------------------------------------------------------------------
# (args, words the message must contain); `{name}` is a path from `error_paths`.
ERROR_CASES = {
    "missing-model": (["generate", "hi", "--model", "{missing}"], "does not exist"),
    "truncated": (["generate", "hi", "--model", "{truncated}"], "truncated"),
    "bad-dtype": (["generate", "hi", "--model", "{small}", "--dtype", "nonsense"], "nonsense"),
    "cuda": (["generate", "hi", "--model", "{small}", "--device", "cuda"], "cuda"),
    "too-long": (["generate", "hi", "--model", "{small}", "-n", "128"], "context"),
}
# The same handler, run in-process through `gpt2lab.cli.main` (a subprocess costs seconds).
MORE_ERROR_CASES = {
    "info-missing-model": (["info", "{missing}"], "does not exist"),
    "info-truncated": (["info", "{truncated}"], "truncated"),
    "bad-device": (["generate", "hi", "--model", "{small}", "--device", "tpu9"], "tpu9"),
    "long-prompt": (["generate", "word " * 130, "--model", "{small}", "-n", "1"], "context"),
    "bad-max-new-tokens": (["generate", "hi", "--model", "{small}", "-n", "0"], "max_new_tokens"),
    "bad-config": (["generate", "hi", "--model", "{llama}"], "llama"),
}


@pytest.fixture(scope="module")
def error_paths(small_ckpt, tmp_path_factory) -> dict[str, str]:
    truncated = tmp_path_factory.mktemp("truncated")
    shutil.copy(small_ckpt / "config.json", truncated / "config.json")
    data = (small_ckpt / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    llama = tmp_path_factory.mktemp("llama")
    shutil.copy(small_ckpt / "model.safetensors", llama / "model.safetensors")
    cfg = json.loads((small_ckpt / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return {
        "missing": str(tmp_path_factory.mktemp("gone") / "nope"),
        "truncated": str(truncated),
        "llama": str(llama),
        "small": str(small_ckpt),
    }


def fill(args: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) if a.startswith("{") else a for a in args]


@pytest.fixture(scope="module")
def cli_runs(error_paths, offline_home) -> dict[str, subprocess.CompletedProcess]:
    """The error cases as real `python -m gpt2lab` processes, run concurrently once."""
    jobs = {name: fill(args, error_paths) for name, (args, _) in ERROR_CASES.items()}
    return run_cli_many(jobs, offline_home)


def assert_one_line_error(rc: int, out: str, err: str, words: str) -> None:
    assert rc == 1, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpt2lab: error: ")
    assert words in lines[0]
    assert "Traceback" not in out + err
    assert out == ""


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line(case, cli_runs):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    result = cli_runs[case]
    assert_one_line_error(result.returncode, result.stdout, result.stderr, ERROR_CASES[case][1])


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.mark.parametrize("case", list(MORE_ERROR_CASES))
def test_more_user_errors_are_one_line(case, error_paths, offline, capsys):
    args, words = MORE_ERROR_CASES[case]
    assert_one_line_error(*run_main(fill(args, error_paths), capsys), words)


def test_main_exits_0_on_success(small_ckpt, offline, capsys):
    rc, out, err = run_main(["info", str(small_ckpt)], capsys)
    assert rc == 0 and "layers" in out and err == ""


def test_usage_error_is_typers(offline, capsys):
    rc, out, err = run_main(["generate"], capsys)  # no prompt
    assert rc == 2
    assert "Traceback" not in out + err
    assert "Missing argument 'prompt'" in err


# ---- 9. score and streaming ------------------------------------------------------------
def test_score_prints_transformers_perplexity(small_ckpt, hf_small, tmp_path, offline):
    text = "The cat sat on the mat. It was a sunny day, and the cat was happy."
    ids = [50256] + Tokenizer().encode(text)  # --bos (the default): <|endoftext|> as context
    with torch.no_grad():
        logits = hf_small(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    (tmp_path / "t.txt").write_text(text)
    for arg in (text, f"@{tmp_path / 't.txt'}"):
        result = invoke("score", arg, "--model", str(small_ckpt), "--words")
        assert result.exit_code == 0, result.output
        ppl = float(re.search(r"perplexity ([\d.]+)", result.output).group(1))
        assert abs(ppl - torch.tensor(nll).exp().item()) / ppl < 1e-4
        assert f"{len(ids) - 1} tokens scored" in result.output
    with pytest.raises(gpt2lab.GPT2LabError, match="does not exist"):
        invoke("score", f"@{tmp_path / 'nope.txt'}", "--model", str(small_ckpt))


def test_generate_stream_prints_the_same_text(small_ckpt, offline):
    args = ["generate", PROMPT, "--model", str(small_ckpt), "-n", "12", "-t", "0.9", "--seed", "5"]
    plain = invoke(*args)
    streamed = invoke(*args, "--stream")
    assert plain.exit_code == streamed.exit_code == 0
    assert streamed.output == plain.output
    expected = gpt2lab.load(small_ckpt).generate(
        PROMPT, max_new_tokens=12, temperature=0.9, top_k=200, seed=5
    )
    assert plain.output == PROMPT + expected + "\n"


# ---- long texts: progress on a terminal, linear word tables ------------------------------
LONG = "The cat sat on the mat, and the dog watched it from the door. " * 60  # ~ 900 tokens


def test_score_shows_a_transient_progress_bar_on_a_terminal_only(tmp_path, offline_home):
    """stderr a terminal (a pty): a rich bar that is erased at the end; stdout (a pipe)
    gets the result line and nothing else."""
    import pty

    (tmp_path / "long.txt").write_text(LONG)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "score", f"@{tmp_path / 'long.txt'}", "--words"],
        stdout=subprocess.PIPE, stderr=slave, text=True, env=cli_env(offline_home),
    )  # fmt: skip
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, terminal.decode(errors="replace")
    os.close(master)
    screen = terminal.decode(errors="replace")
    assert "scoring" in screen and "tokens" in screen  # the bar was drawn
    assert "\x1b[2K" in screen[screen.rindex("scoring") :]  # and erased (transient)
    assert "Traceback" not in screen
    lines = out.splitlines()
    assert lines[0].startswith("perplexity ") and "tokens scored" in lines[0]
    assert "scoring" not in out and "\x1b" not in out


def test_score_piped_prints_the_result_only(small_ckpt, offline, capsys):
    rc, out, err = run_main(["score", LONG, "--model", str(small_ckpt), "--stride", "32"], capsys)
    assert rc == 0 and err == ""
    assert len(out.splitlines()) == 1 and out.startswith("perplexity ")


def old_words(scores, split_punctuation=False):
    """The word grouping as first written (quadratic: it re-joined the word so far at
    every token), the reference for the linear one."""
    from gpt2lab.scoring import LN2, Word

    def starts_word(i, word_start):
        s = scores.strings[i]
        if "".join(scores.strings[word_start:i]).isspace():
            return False
        if s[:1].isspace():
            return True
        return split_punctuation and bool(s) and not s[0].isalnum() and s[0] != "\ufffd"

    words, start = [], 0
    for i in range(1, len(scores.tokens) + 1):
        if i < len(scores.tokens) and not starts_word(i, start):
            continue
        text = "".join(scores.strings[start:i])
        logprob = math.fsum(scores.logprobs[start:i])
        words.append(Word(text, start, i, logprob, -logprob / LN2))
        start = i
    return words


def test_word_table_matches_the_original_grouping_and_is_linear():
    import random

    from gpt2lab.scoring import TokenScores

    pool = ["", " ", "\n", "\n\n", " \t", " the", "cat", "!", "'s", "\ufffd", "a", "1", ".", " -"]
    rng = random.Random(0)
    for _ in range(500):
        strings = [rng.choice(pool) for _ in range(rng.randrange(0, 30))]
        scores = TokenScores(list(range(len(strings))), strings, [-rng.random() for _ in strings])
        for split in (False, True):
            assert scores.words(split_punctuation=split) == old_words(scores, split)
    # one 300,000-token "word" (a 5 MB line without spaces): quadratic grouping would
    # copy ~10^10 characters here
    n = 300_000
    (word,) = TokenScores([0] * n, ["ab"] * n, [-1.0] * n).words()
    assert (word.start, word.end, len(word.text), word.logprob) == (0, n, 2 * n, -n)
