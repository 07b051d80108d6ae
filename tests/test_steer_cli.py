"""`gpt2lab steer make|sweep|show|convert` and `gpt2lab generate --steer` on the bundled
model: the files they write equal the library's vectors (and the `gguf` package's own
reader), `generate --steer FILE:COEF` prints what model.generate(steer=(v, coef)) gives
with the CLI's sampling defaults, and bad inputs are one "gpt2lab: error:" line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gpt2lab as gl
from gpt2lab.cli import main
from gpt2lab.steering import SteeringVector, actadd, mean_difference

POS = ["I love thee", "sweet love"]
NEG = ["I hate thee", "foul hate"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="module")
def model():
    return gl.load("bundled")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("steer_cli")
    v = mean_difference(model, POS, NEG, layers=[2])
    v.save(root / "v.safetensors")
    mean_difference(model, POS, NEG, layers=[1]).save(root / "v1.safetensors")
    actadd(model, "Love", "Hate", layers=2).save(root / "seq.safetensors")
    (root / "text.safetensors").write_text("not a safetensors file")
    save_file({"x": torch.zeros(3)}, str(root / "plain.safetensors"))
    (root / "empty.txt").write_text("\n\n")
    (root / "pos.txt").write_text("\n".join(POS) + "\n")
    return root


def test_make_equals_mean_difference_and_gguf_reads_back(files, model, capsys, tmp_path):
    gguf = pytest.importorskip("gguf")
    out, g = tmp_path / "m.safetensors", tmp_path / "m.gguf"
    code, stdout, err = run(
        ["steer", "make", "--positive-file", files / "pos.txt", *sum((["--negative", t] for t in
         NEG), []), "--layers", "2", "--out", out, "--gguf", g, "--coefficient", "3"], capsys
    )  # fmt: skip
    assert code == 0, err
    want = mean_difference(model, POS, NEG, layers=2)["blocks.2.hook_resid_pre"]
    got = SteeringVector.load(out, model)
    assert torch.equal(got["blocks.2.hook_resid_pre"], want)
    assert f"norm {float(want.norm()):.4g}" in stdout
    # llama.cpp's direction.1 is block 1's output = blocks.2.hook_resid_pre, times 3
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(g)).tensors}
    assert list(tensors) == ["direction.1"]
    np.testing.assert_allclose(tensors["direction.1"], 3 * want.numpy(), rtol=1e-6)


def test_make_reading_and_actadd(files, model, capsys, tmp_path):
    out = tmp_path / "r.safetensors"
    argv = ["steer", "make", "--method", "reading", "--hook", "blocks.1.hook_resid_post",
            "--read", "mean", "--out", out]  # fmt: skip
    for p, n in zip(POS, NEG, strict=True):
        argv += ["--positive", p, "--negative", n]
    assert run(argv, capsys)[0] == 0
    v = SteeringVector.load(out)
    assert v.meta["method"] == "reading_vector" and v.meta["read"] == "mean"
    assert float(v["blocks.1.hook_resid_post"].norm()) == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "a.safetensors"
    argv = ["steer", "make", "--method", "actadd", "--positive", "Love", "--negative", "Hate",
            "--layers", "2", "--out", out]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    ref = actadd(model, "Love", "Hate", layers=2)["blocks.2.hook_resid_pre"]
    assert torch.equal(SteeringVector.load(out)["blocks.2.hook_resid_pre"], ref)


def test_show_and_convert_round_trip(files, model, capsys, tmp_path):
    pytest.importorskip("gguf")
    code, out, _ = run(["steer", "show", files / "v.safetensors"], capsys)
    assert code == 0
    assert "blocks.2.hook_resid_pre" in out and "method: mean_difference" in out
    assert "sha256:" in out  # the data hash
    g, back = tmp_path / "c.gguf", tmp_path / "back.safetensors"
    assert run(["steer", "convert", files / "v.safetensors", g, "--coefficient", "2"],
               capsys)[0] == 0  # fmt: skip
    assert run(["steer", "convert", g, back], capsys)[0] == 0
    v = SteeringVector.load(files / "v.safetensors")["blocks.2.hook_resid_pre"]
    got = SteeringVector.load(back)
    assert got.hooks == ["blocks.1.hook_resid_post"]  # the same residual stream point
    assert torch.allclose(got["blocks.1.hook_resid_post"], 2 * v, rtol=1e-6, atol=0)
    code, out, _ = run(["steer", "show", g], capsys)
    assert code == 0 and "blocks.1.hook_resid_post" in out


def test_generate_steer_equals_api(files, model, capsys):
    v = SteeringVector.load(files / "v.safetensors", model)
    for extra, steer in (
        ([], (v, 4.0)),
        (["--steer-positions", "generated"], gl.steering.Steering(v, 4.0, "add", "generated")),
    ):
        code, out, err = run(["generate", "ROMEO:", "-n", "12", "--steer",
                              f"{files / 'v.safetensors'}:4", *extra], capsys)  # fmt: skip
        assert code == 0, err
        want = model.generate("ROMEO:", max_new_tokens=12, temperature=0.8, top_k=200, seed=0,
                              steer=steer)  # fmt: skip
        assert out == "ROMEO:" + want + "\n"
    plain = model.generate("ROMEO:", max_new_tokens=12, temperature=0.8, top_k=200, seed=0)
    assert plain != want  # the steering changed the text
    # two vectors add; FILE alone is coefficient 1
    code, out, _ = run(["generate", "ROMEO:", "-n", "8", "--greedy", "--steer",
                        files / "v.safetensors", "--steer", f"{files / 'v.safetensors'}:2"],
                       capsys)  # fmt: skip
    assert code == 0
    assert out == "ROMEO:" + model.generate("ROMEO:", max_new_tokens=8, steer=(v, 3.0)) + "\n"


def test_sweep_prints_table_and_writes_files(files, capsys, tmp_path):
    c, j = tmp_path / "s.csv", tmp_path / "s.json"
    code, out, err = run(
        ["steer", "sweep", files / "v.safetensors", "--prompt", "ROMEO:", "--prompt", "I am",
         "--coefficients", "-2,2", "--samples", "2", "--max-new-tokens", "4",
         "--positive-words", "love,sweet", "--negative-words", "hate", "--csv", c, "--json", j],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["hook", "kind", "coefficient", "positive", "negative", "perplexity",
                      "repetition", "n"]  # fmt: skip
    rows = list(csv.DictReader(c.open()))
    assert [(r["kind"], r["coefficient"]) for r in rows] == [
        ("unsteered", "0.0"), ("steered", "-2.0"), ("random", "-2.0"), ("steered", "2.0"),
        ("random", "2.0"),
    ]  # fmt: skip
    assert all(r["n"] == "4" for r in rows)
    doc = json.loads(j.read_text())
    assert len(doc["samples"]) == 2 * 4 and doc["words"]["negative"] == ["hate"]


BAD = {
    "missing vector": (["steer", "sweep", "{d}/missing.safetensors", "--prompt", "x"],
                       "does not exist"),
    "not a vector file": (["steer", "show", "{d}/text.safetensors"], "not a steering vector"),
    "safetensors without record": (["steer", "show", "{d}/plain.safetensors"],
                                   "not a gpt2lab steering vector"),
    "unknown hook": (["steer", "make", "--positive", "a", "--negative", "b", "--hook",
                      "blocks.9.hook_resid_pre", "--out", "{d}/o.safetensors"], "no hook point"),
    "layer out of range": (["steer", "make", "--positive", "a", "--negative", "b", "--layers",
                            "7", "--out", "{d}/o.safetensors"], "layer"),
    "bad layers": (["steer", "make", "--positive", "a", "--negative", "b", "--layers", "x",
                    "--out", "{d}/o.safetensors"], "--layers"),
    "no positive texts": (["steer", "make", "--negative", "b", "--layers", "1", "--out",
                           "{d}/o.safetensors"], "no positive texts"),
    "empty text file": (["steer", "make", "--positive-file", "{d}/empty.txt", "--negative", "b",
                         "--layers", "1", "--out", "{d}/o.safetensors"], "no positive texts"),
    "missing text file": (["steer", "make", "--positive-file", "{d}/nope.txt", "--negative",
                           "b", "--layers", "1", "--out", "{d}/o.safetensors"], "does not exist"),
    "no layers or hook": (["steer", "make", "--positive", "a", "--negative", "b", "--out",
                           "{d}/o.safetensors"], "--layers"),
    "bad method": (["steer", "make", "--positive", "a", "--negative", "b", "--layers", "1",
                    "--method", "pca", "--out", "{d}/o.safetensors"], "--method"),
    "gguf of a sequence": (["steer", "make", "--method", "actadd", "--positive", "Love",
                            "--negative", "Hate", "--layers", "2", "--out", "{d}/o.safetensors",
                            "--gguf", "{d}/o.gguf"], "sequence"),
    "gguf at layer 0": (["steer", "make", "--positive", "a", "--negative", "b", "--layers", "0",
                         "--out", "{d}/o.safetensors", "--gguf", "{d}/o.gguf"], "llama.cpp"),
    "convert a sequence": (["steer", "convert", "{d}/seq.safetensors", "{d}/o.gguf"],
                           "sequence"),
    "convert same format": (["steer", "convert", "{d}/v.safetensors", "{d}/o.safetensors"],
                            "one .safetensors and one .gguf"),
    "bad coefficients": (["steer", "sweep", "{d}/v.safetensors", "--prompt", "x",
                          "--coefficients", "1,a"], "--coefficients"),
    "inf coefficient": (["steer", "sweep", "{d}/v.safetensors", "--prompt", "x",
                         "--coefficients", "inf"], "--coefficients"),
    "zero samples": (["steer", "sweep", "{d}/v.safetensors", "--prompt", "x", "--samples", "0"],
                     "n_samples"),
    "sweep unknown hook": (["steer", "sweep", "{d}/v.safetensors", "--prompt", "x", "--hook",
                            "blocks.0.hook_resid_pre"], "no direction"),
    "bad steer coefficient": (["generate", "x", "--steer", "{d}/v.safetensors:abc"], ":COEF"),
    "missing steer file": (["generate", "x", "--steer", "{d}/missing.safetensors:2"],
                           "does not exist"),
    "steer not a vector": (["generate", "x", "--steer", "{d}/text.safetensors"],
                           "not a steering vector"),
    "bad steer positions": (["generate", "x", "--steer", "{d}/v.safetensors", "--steer-positions",
                             "middle"], "positions"),
    "bad steer operator": (["generate", "x", "--steer", "{d}/v.safetensors", "--steer-operator",
                            "mul"], "operator"),
    "vector of another model size": (["generate", "x", "--steer", "{d}/v1.safetensors", "--model",
                                      "{small}"], "width"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, files, small_ckpt, capsys):
    argv, words = BAD[case]
    argv = [a.format(d=files, small=small_ckpt) for a in argv]
    code, out, err = run(argv, capsys)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: "), err
    assert code == 1
    assert words in lines[0], lines[0]
    assert not (files / "o.safetensors").exists()  # a refused make writes nothing
