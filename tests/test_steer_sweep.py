"""steering.sweep: the cells are model.generate's own samples (same seeds, steered or
not), the metrics equal brute-force recomputations (regex-free word counts, a direct
3-gram scan, model.score's log-probs), the random baseline has the vector's norm, and
the love/hate acceptance check on the bundled model (issue 14)."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

import gpt2lab as gl
from gpt2lab import GPT2, GPT2Config, GPT2LabError
from gpt2lab.steering import SteeringVector, mean_difference
from gpt2lab.steering.sweep import random_like, repetition_rate, sweep

SAMPLING = dict(temperature=0.8, top_k=200)


@pytest.fixture(scope="module")
def small():
    cfg = GPT2Config(n_layers=2, d_model=64, n_heads=4, n_ctx=128, d_vocab=50257, d_mlp=256)
    return GPT2(cfg).init_weights(seed=0).eval()


@pytest.fixture(scope="module")
def small_vector(small):
    return mean_difference(small, ["good day", "a fine morning"], ["bad day", "a grim night"],
                           layers=[0, 1])  # fmt: skip


@pytest.fixture(scope="module")
def small_sweep(small, small_vector):
    return sweep(
        small, small_vector, ["Hello", "The cat sat"], coefficients=[-3.0, 0.0, 3.0],
        n_samples=3, max_new_tokens=8, seed=5, words=(["the", "a"], ["and", "of"]),
        metric=lambda t: float(len(t)),
    )  # fmt: skip


def brute_count(texts, words):
    """Whole-word, case-insensitive counts by splitting on non-word characters."""
    lowered = {w.lower() for w in words}
    return sum(tok.lower() in lowered for t in texts for tok in re.split(r"\W+", t) if tok)


def test_cells_are_generate_samples_with_the_same_seeds(small, small_vector, small_sweep):
    """Each text of each cell is what model.generate gives for that batch and seed."""
    batch = ["Hello"] * 3 + ["The cat sat"] * 3
    base = small.generate(batch, seed=5, max_new_tokens=8, **SAMPLING)
    for hook in small_vector.hooks:
        for c in (-3.0, 3.0):
            got = [s for s in small_sweep.samples if s["hook"] == hook and s["coefficient"] == c]
            steered = small.generate(
                batch, seed=5, max_new_tokens=8, steer=(small_vector.only(hook), c), **SAMPLING
            )
            assert [s["prompt"] for s in got] == batch
            assert [s["unsteered"] for s in got] == base
            assert [s["steered"] for s in got] == steered
            assert steered != base  # the steering did something
        zero = [s for s in small_sweep.samples if s["hook"] == hook and s["coefficient"] == 0]
        assert [s["steered"] for s in zero] == base == [s["random"] for s in zero]


def test_random_baseline_has_the_vector_norm(small_vector):
    r = random_like(small_vector, seed=3)
    for hook, d in small_vector.directions.items():
        assert torch.allclose(r[hook].norm(), d.norm(), rtol=1e-5)
        cos = float(r[hook] @ d / (r[hook].norm() * d.norm()))
        assert abs(cos) < 0.5  # a random direction in 64 dimensions, not the vector
    seq = SteeringVector({"blocks.0.hook_resid_pre": torch.randn(3, 64) * torch.tensor([[1.0],
                          [5.0], [0.5]])})  # fmt: skip
    rs = random_like(seq, seed=0)["blocks.0.hook_resid_pre"]
    assert torch.allclose(rs.norm(dim=-1), seq["blocks.0.hook_resid_pre"].norm(dim=-1), rtol=1e-5)
    assert torch.equal(rs, random_like(seq, seed=0)["blocks.0.hook_resid_pre"])


def test_metrics_equal_brute_force(small, small_vector, small_sweep):
    result = small_sweep
    assert len(result.rows) == 1 + 2 * 3 * 2  # unsteered + hooks x coefficients x kinds
    batch = ["Hello"] * 3 + ["The cat sat"] * 3
    for row in result.rows:
        hook, coef = row["hook"], row["coefficient"]
        steer = None
        if row["kind"] != "unsteered":
            v = small_vector.only(hook)
            if row["kind"] == "random":  # the documented seed: seed * 1_000_003 + hook index
                v = random_like(v, seed=5 * 1_000_003 + small_vector.hooks.index(hook))
            steer = (v, coef)
        got = small.generate(
            batch, seed=5, max_new_tokens=8, steer=steer, return_result=True, **SAMPLING
        )
        texts = got.texts
        assert row["n"] == 6
        assert row["positive"] == brute_count(texts, ["the", "a"])
        assert row["negative"] == brute_count(texts, ["and", "of"])
        assert row["metric"] == pytest.approx(sum(len(t) for t in texts) / 6)
        # perplexity: model.score (the sliding-window scorer) of prompt + continuation ids
        nll, n, reps = 0.0, 0, []
        for prompt, ids in zip(batch, got.tokens, strict=True):
            prompt_ids = small.tokenizer.encode(prompt)
            if ids:
                lp = small.score(prompt_ids + ids, bos=False).logprobs[len(prompt_ids) :]
                nll, n = nll - sum(lp), n + len(ids)
            grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
            if grams:
                reps.append(sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams))
        assert row["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert row["repetition"] == pytest.approx(sum(reps) / len(reps))


def test_repetition_rate_by_hand():
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # 123 231 312 123
    assert repetition_rate([7] * 6) == pytest.approx(3 / 4)
    assert repetition_rate([1, 2, 3, 4]) == 0.0
    assert math.isnan(repetition_rate([1, 2]))


def test_words_are_whole_words_case_insensitive(small, small_vector):
    from gpt2lab.steering.sweep import count_words, word_pattern

    p = word_pattern(["love", "o'er"])
    assert count_words(["Love, glove LOVE lovely o'er O'ER"], p) == 4
    assert count_words(["love"], None) == 0


def test_table_csv_json_plot(small_sweep, tmp_path):
    table = small_sweep.table().splitlines()
    assert table[0].split() == small_sweep.columns
    assert len(table) == 1 + len(small_sweep.rows)
    with small_sweep.to_csv(tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == [r["kind"] for r in small_sweep.rows]
    assert [float(r["perplexity"]) for r in rows] == pytest.approx(
        [r["perplexity"] for r in small_sweep.rows]
    )
    doc = json.loads(small_sweep.to_json(tmp_path / "s.json").read_text())
    assert doc["rows"][3]["positive"] == small_sweep.rows[3]["positive"]
    assert len(doc["samples"]) == len(small_sweep.samples)
    assert doc["words"] == {"positive": ["the", "a"], "negative": ["and", "of"]}
    pytest.importorskip("matplotlib")
    png = small_sweep.plot(tmp_path / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


BAD = {
    "not a vector": (dict(vector="v"), "SteeringVector"),
    "no prompts": (dict(prompts=[]), "prompts"),
    "empty prompt": (dict(prompts=[""]), "prompt"),
    "no coefficients": (dict(coefficients=[]), "coefficients"),
    "nan coefficient": (dict(coefficients=[1.0, float("nan")]), "finite"),
    "text coefficient": (dict(coefficients=["4"]), "coefficient"),
    "unknown hook": (dict(hooks="blocks.9.hook_resid_pre"), "no direction"),
    "zero samples": (dict(n_samples=0), "n_samples"),
    "zero tokens": (dict(max_new_tokens=0), "max_new_tokens"),
    "words not a pair": (dict(words=["love"]), "pair"),
    "empty word": (dict(words=(["love", ""], ["hate"])), "positive words"),
    "both lists empty": (dict(words=([], [])), "empty"),
    "metric not callable": (dict(metric=3), "metric"),
    "metric returns text": (dict(metric=lambda t: "x"), "number"),
    "bad operator": (dict(operator="multiply"), "operator"),
    "seed given as option": (dict(seed=None), "seed"),
    "steer given as option": (dict(steer=1), "steer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case, small, small_vector):
    changes, words = BAD[case]
    args = dict(vector=small_vector, prompts=["Hi"], coefficients=[1.0], n_samples=1,
                max_new_tokens=2)  # fmt: skip
    args.update(changes)
    with pytest.raises(GPT2LabError, match=words) as info:
        sweep(small, args.pop("vector"), args.pop("prompts"), **args)
    assert "\n" not in str(info.value)


def test_vector_for_another_model_is_refused(small):
    bundled = gl.load("bundled")
    v = mean_difference(small, ["a"], ["b"], layers=0)
    with pytest.raises(GPT2LabError, match="width 64"):
        sweep(bundled, v, ["Hi"], coefficients=[1.0], n_samples=1, max_new_tokens=2)


# ---- acceptance: love vs hate on the bundled Shakespeare model ---------------------------
LOVE = ["I love thee", "sweet love", "my dear joy", "O happy day", "fair and gentle",
        "my sweet love, my joy", "kind and dear", "I do love thee well"]  # fmt: skip
HATE = ["I hate thee", "O death, O grief", "foul murder and blood", "I will kill thee",
        "woe and tears", "cursed be thy blood", "die, villain", "bitter grief and woe"]  # fmt: skip
POSITIVE_WORDS = "love loves loved lovely sweet joy dear dearest fair happy gentle kind".split()
NEGATIVE_WORDS = ("hate hated death dead die dies kill killed blood bloody murder grief woe "
                  "tears weep curse cursed foul villain fear").split()  # fmt: skip


@pytest.mark.slow  # (moved out of the default suite: several seconds)
def test_love_hate_vector_moves_word_counts_and_random_does_not():
    """A mean-difference love/hate vector at blocks.1.hook_resid_pre, coefficient +-2, 120
    seeded samples (2 prompts x 60, 24 tokens; 50 were too few once sampling seeds became
    per row: one other draw of 50 showed no rise in the positive count). With D = positive - negative count:

    - at +2 both lists move as intended: positive up by >= 5, negative down;
    - at -2 it moves the other way: positive does not rise, and the swing D(+2) - D(-2)
      is >= 8 (the bundled model has almost no hate vocabulary to add: the negative
      count at -2 is reported, not required to rise);
    - the equal-norm random direction moves the positive count by at most half what the
      vector does, and its swing |D(+2) - D(-2)| is at most half the vector's.
    """
    model = gl.load("bundled")
    v = mean_difference(model, LOVE, HATE, layers=1)
    result = sweep(
        model, v, ["ROMEO:\n", "I am"], coefficients=[-2.0, 2.0], n_samples=60,
        max_new_tokens=24, seed=0, words=(POSITIVE_WORDS, NEGATIVE_WORDS),
    )  # fmt: skip
    print("\n" + result.table())
    base = result.row("unsteered")
    up, down = result.row("steered", 2.0), result.row("steered", -2.0)
    r_up, r_down = result.row("random", 2.0), result.row("random", -2.0)
    assert base["n"] == up["n"] == 120

    def d(row):
        return row["positive"] - row["negative"]

    assert up["positive"] >= base["positive"] + 5
    assert up["negative"] < base["negative"]
    assert down["positive"] <= base["positive"]
    swing = d(up) - d(down)
    assert swing >= 8
    moved = up["positive"] - base["positive"]
    for r in (r_up, r_down):
        assert abs(r["positive"] - base["positive"]) <= moved / 2
    assert abs(d(r_up) - d(r_down)) <= swing / 2
