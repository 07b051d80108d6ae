"""Logit lens and tuned lens against TransformerLens (same weights), numpy and
transformers; tuned-lens training on the bundled model, judged on held-out text; the
`gpt2lab lens` / `lens-train` commands."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.cells import cell_len
from rich.console import Console
from safetensors.numpy import load_file as load_numpy
from tl_reference import hooked_transformer

import gpt2lab as gl
from gpt2lab.cli import main
from gpt2lab.errors import GPT2LabError
from gpt2lab.interp import TunedLens, lens_kl, logit_lens
from gpt2lab.interp.lens import LensResult
from gpt2lab.interp.lens_plots import lens_html, show_token

PROMPT = "The quick brown fox jumps over the lazy dog because"

# Lens training text: famous passages of plays the bundled model was trained on.
TRAIN_TEXT = """HAMLET. To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them? To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.

MACBETH. To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day
To the last syllable of recorded time,
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow, a poor player
That struts and frets his hour upon the stage
And then is heard no more: it is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.

ANTONY. Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones;
So let it be with Caesar. The noble Brutus
Hath told you Caesar was ambitious:
If it were so, it was a grievous fault,
And grievously hath Caesar answer'd it.

JULIET. O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
'Tis but thy name that is my enemy;
Thou art thyself, though not a Montague.
What's in a name? that which we call a rose
By any other name would smell as sweet.

JAQUES. All the world's a stage,
And all the men and women merely players:
They have their exits and their entrances;
And one man in his time plays many parts,
His acts being seven ages. At first the infant,
Mewling and puking in the nurse's arms.
And then the whining school-boy, with his satchel
And shining morning face, creeping like snail
Unwillingly to school.

GLOUCESTER. Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lour'd upon our house
In the deep bosom of the ocean buried.
Now are our brows bound with victorious wreaths;
Our bruised arms hung up for monuments;
Our stern alarums changed to merry meetings,
Our dreadful marches to delightful measures.

PROSPERO. Our revels now are ended. These our actors,
As I foretold you, were all spirits and
Are melted into air, into thin air:
And, like the baseless fabric of this vision,
The cloud-capp'd towers, the gorgeous palaces,
The solemn temples, the great globe itself,
Yea, all which it inherit, shall dissolve
And, like this insubstantial pageant faded,
Leave not a rack behind. We are such stuff
As dreams are made on, and our little life
Is rounded with a sleep.

PORTIA. The quality of mercy is not strain'd,
It droppeth as the gentle rain from heaven
Upon the place beneath: it is twice blest;
It blesseth him that gives and him that takes:
'Tis mightiest in the mightiest: it becomes
The throned monarch better than his crown.

Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd.

KING HENRY. Once more unto the breach, dear friends, once more;
Or close the wall up with our English dead.
In peace there's nothing so becomes a man
As modest stillness and humility:
But when the blast of war blows in our ears,
Then imitate the action of the tiger;
Stiffen the sinews, summon up the blood.
"""

# Held out twice over: none of it is in TRAIN_TEXT, and it comes from the four plays
# that scripts/bundled_data.py keeps out of the bundled model's training split.
HELD_OUT = (
    "FLAVIUS. Have you forgot me, sir?\n"
    "TIMON. Why dost ask that? I have forgot all men;\n"
    "Then, if thou grant'st thou'rt a man, I have forgot thee.\n"
    "ISABELLA. But man, proud man,\nDrest in a little brief authority,\n"
    "Most ignorant of what he's most assur'd,\nHis glassy essence, like an angry ape,\n"
    "Plays such fantastic tricks before high heaven\nAs make the angels weep.\n"
    "CLAUDIO. Ay, but to die, and go we know not where;\nTo lie in cold obstruction and to rot;\n"
    "DUKE. Be absolute for death; either death or life\nShall thereby be the sweeter.\n"
    "PISTOL. Why, then the world's mine oyster,\nWhich I with sword will open.\n"
    "PUCELLE. Glory is like a circle in the water,\nWhich never ceaseth to enlarge itself\n"
    "Till by broad spreading it disperse to nought.\n"
)


@pytest.fixture(scope="module")
def small(small_ckpt):
    return gl.load(small_ckpt)


@pytest.fixture(scope="module")
def ref(small):
    return hooked_transformer(small)


@pytest.fixture(scope="module")
def tokens(small):
    return small.to_tokens(PROMPT)  # [1, pos]


def tl_lens_logprobs(ref, tokens, translators=None) -> torch.Tensor:
    """TransformerLens' logit lens [rows, pos, vocab]: its accumulated residual stream,
    its final LayerNorm with recomputed statistics, its unembedding; `translators`
    (A, b) per row are applied as h + h A^T + b first."""
    with torch.no_grad():
        _, cache = ref.run_with_cache(tokens)
        stack = cache.accumulated_resid(apply_ln=False)  # [rows, batch, pos, d_model]
        if translators is not None:
            stack = torch.stack(
                [h + h @ A.T + b for h, (A, b) in zip(stack[:-1], translators, strict=True)]
                + [stack[-1]]
            )
        normed = cache.apply_ln_to_stack(stack, recompute_ln=True)
        return ref.unembed(normed)[:, 0].log_softmax(-1)


# ---- 1. the logit lens against TransformerLens -------------------------------------------
def test_logit_lens_matches_transformer_lens(small, ref, tokens):
    res = logit_lens(small, tokens, keep_logprobs=True)
    with torch.no_grad():  # TransformerLens' own logit lens (3.x recomputes the LN statistics)
        _, cache = ref.run_with_cache(tokens)
        expect = ref.unembed(cache.accumulated_resid(apply_ln=True))[:, 0].log_softmax(-1)
    assert res.logprobs.shape == (small.cfg.n_layers + 1, tokens.shape[1], small.cfg.d_vocab)
    diff = (res.logprobs - expect).abs().max().item()
    print(f"logit lens vs TransformerLens: max |log-prob diff| {diff:.2e}")
    assert diff < 1e-4

    # Each row is normalised with its own scale. With the final layer's cached scale
    # instead, only the last row would agree.
    with torch.no_grad():
        stack = cache.accumulated_resid(apply_ln=False)
        frozen = cache.apply_ln_to_stack(stack, recompute_ln=False)
        frozen = ref.unembed(frozen * ref.ln_final.w + ref.ln_final.b)[:, 0].log_softmax(-1)
    assert (res.logprobs[-1] - frozen[-1]).abs().max() < 1e-4
    assert (res.logprobs[0] - frozen[0]).abs().max() > 1e-2


def test_logit_lens_matches_processed_transformer_lens(small, tokens):
    """With LayerNorm folded and the unembedding centred (TransformerLens' default
    processing), the same log-probabilities come out: an independent route."""
    ref = hooked_transformer(small, processed=True)
    with torch.no_grad():
        _, cache = ref.run_with_cache(tokens)
        stack = cache.accumulated_resid(apply_ln=False)
        expect = ref.unembed(ref.ln_final(stack[:, 0])).log_softmax(-1)
    res = logit_lens(small, tokens, keep_logprobs=True)
    assert (res.logprobs - expect).abs().max() < 1e-4


def test_final_row_is_the_models_output(small, hf_small, tokens):
    res = logit_lens(small, tokens, keep_logprobs=True)
    with torch.no_grad():
        hf = hf_small(tokens).logits[0].log_softmax(-1)
        ours = small(tokens)[0].log_softmax(-1)
    assert (res.logprobs[-1] - hf).abs().max() < 1e-4
    # the lens reads the residual stream of a hooked run (step-by-step kernels, README
    # "one rule"), the plain forward runs fused ones: equal to float32 rounding
    assert (res.logprobs[-1] - ours).abs().max() < 2e-5
    assert res.kl[-1].abs().max() < 1e-5


def test_lens_statistics_match_numpy(small, tokens):
    k = 4
    res = logit_lens(small, tokens, k=k, keep_logprobs=True)
    lp = res.logprobs.double().numpy()  # checked against TransformerLens above
    ids = tokens[0].numpy()
    rows, n = lp.shape[:2]
    top = -np.sort(-lp, axis=-1)[..., :k]
    assert np.allclose(res.top_probs.numpy(), np.exp(top), atol=1e-6)
    picked = np.take_along_axis(lp, res.top_ids.numpy(), -1)  # tie-proof: compare values
    assert np.allclose(picked, top, atol=1e-6)
    assert res.top_strings[1][2][0] == small.tokenizer.decode([int(res.top_ids[1, 2, 0])])

    nxt = lp[:, np.arange(n - 1), ids[1:]]  # [rows, pos - 1]: the actual next token
    assert np.allclose(res.target_probs[:, :-1].numpy(), np.exp(nxt), atol=1e-6)
    ranks = (lp[:, : n - 1] > nxt[..., None]).sum(-1) + 1
    assert (res.target_ranks[:, :-1].numpy() == ranks).all()
    assert res.target_ids[-1] == -1 and torch.isnan(res.target_probs[:, -1]).all()
    assert (res.target_ids[:-1] == tokens[0, 1:]).all() and res.target is None

    entropy = -(np.exp(lp) * lp).sum(-1)
    kl = (np.exp(lp[-1]) * (lp[-1] - lp)).sum(-1)
    assert np.allclose(res.entropy.numpy(), entropy, atol=1e-4)
    assert np.allclose(res.kl.numpy(), kl, atol=1e-4)

    the = small.tokenizer.encode(" the")[0]
    fixed = logit_lens(small, tokens, target=" the")
    assert fixed.target == " the" and (fixed.target_ids == the).all()
    assert np.allclose(fixed.target_probs.numpy(), np.exp(lp[..., the]), atol=1e-6)
    assert (fixed.target_ranks.numpy() == (lp > lp[..., the : the + 1]).sum(-1) + 1).all()
    assert torch.equal(logit_lens(small, tokens, target=the).target_ranks, fixed.target_ranks)


# ---- 2. the tuned lens -----------------------------------------------------------------------
def test_untrained_tuned_lens_is_exactly_the_logit_lens(small, tokens):
    lens = TunedLens(small)
    assert len(lens.translators) == small.cfg.n_layers  # none for the output row
    tuned = lens.apply(tokens, k=3, keep_logprobs=True)
    plain = logit_lens(small, tokens, k=3, keep_logprobs=True)
    for field in ("logprobs", "top_ids", "top_probs", "target_ranks", "entropy", "kl"):
        assert torch.equal(getattr(tuned, field), getattr(plain, field)), field
    assert tuned.lens == "tuned lens" and plain.lens == "logit lens"


def random_lens(model, seed: int = 0) -> TunedLens:
    lens = TunedLens(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.copy_(torch.randn(t.weight.shape, generator=gen) * 0.1)
            t.bias.copy_(torch.randn(t.bias.shape, generator=gen) * 0.1)
    return lens


def test_tuned_lens_matches_affine_maps_through_transformer_lens(small, ref, tokens, tmp_path):
    lens = random_lens(small)
    path = lens.save(tmp_path / "lens", model="small")
    stored = load_numpy(str(path / "params.safetensors"))
    translators = [
        (torch.from_numpy(stored[f"translators.{i}.weight"]),
         torch.from_numpy(stored[f"translators.{i}.bias"]))
        for i in range(small.cfg.n_layers)
    ]  # fmt: skip
    expect = tl_lens_logprobs(ref, tokens, translators)
    loaded = TunedLens.load(path, small)
    res = loaded.apply(tokens, keep_logprobs=True)
    assert (res.logprobs - expect).abs().max() < 1e-4
    assert (res.logprobs[0] - tl_lens_logprobs(ref, tokens)[0]).abs().max() > 1e-2  # not a no-op

    # round trip: identical outputs, and the saved config says what it is for
    before = lens.apply(tokens, keep_logprobs=True)
    assert torch.equal(before.logprobs, res.logprobs) and torch.equal(before.kl, res.kl)
    config = json.loads((path / "config.json").read_text())
    assert (config["n_layers"], config["d_model"], config["model"]) == (2, 64, "small")


def test_tuned_lens_load_errors(small, tmp_path):
    with pytest.raises(GPT2LabError, match="no tuned lens at"):
        TunedLens.load(tmp_path / "nothing", small)
    path = random_lens(small).save(tmp_path / "lens")
    with pytest.raises(GPT2LabError, match="trained for a model"):
        TunedLens.load(path, gl.load())  # the bundled model: other sizes
    (path / "config.json").write_text("{not json")
    with pytest.raises(GPT2LabError, match="not valid JSON"):
        TunedLens.load(path, small)


def test_lens_kl_matches_transformer_lens(small, ref):
    data = torch.tensor([small.tokenizer.encode(TRAIN_TEXT)[:48]]).view(3, 16)
    lens = random_lens(small, seed=1)
    got_logit = lens_kl(small, data)
    got_tuned = lens.kl(data)
    translators = [(t.weight.detach(), t.bias.detach()) for t in lens.translators]
    for got, tr in ((got_logit, None), (got_tuned, translators)):
        lp = torch.stack([tl_lens_logprobs(ref, row[None], tr) for row in data]).double()
        kl = (lp[:, -1:].exp() * (lp[:, -1:] - lp)).sum(-1).mean((0, 2))  # [rows]
        assert np.allclose(got.numpy(), kl.numpy(), atol=1e-4)


def test_training_loss_is_the_kl_to_the_output(small, ref):
    """Step 0 starts from the identity, so its loss per row is the logit lens's KL on
    that step's windows, computed here through TransformerLens."""
    from gpt2lab.interp.lens_data import TokenArray

    ids = np.asarray(small.tokenizer.encode(TRAIN_TEXT)[:300])
    history = TunedLens(small).fit(
        torch.from_numpy(ids), steps=1, tokens_per_step=32, seq_len=16, bf16=False, progress=False
    )
    windows, _ = TokenArray(ids).batch(2, 16, seed=0, index=0)  # what step 0 trained on
    lp = torch.stack([tl_lens_logprobs(ref, row[None]) for row in windows]).double()
    kl = (lp[:, -1:].exp() * (lp[:, -1:] - lp)).sum(-1).mean((0, 2))
    assert history.shape == (1, small.cfg.n_layers)
    assert np.allclose(history[0].numpy(), kl[:-1].numpy(), atol=1e-4)


def test_tuned_lens_beats_the_logit_lens_on_held_out_text():
    """A few steps on a few passages already bring every row's KL to the output below
    the logit lens's, on text from plays held out of the model's training."""
    model = gl.load()
    train = torch.tensor(model.tokenizer.encode(TRAIN_TEXT))
    held_out = torch.tensor([model.tokenizer.encode(HELD_OUT)])
    lens = TunedLens(model)
    history = lens.fit(train, steps=16, tokens_per_step=64, seq_len=64, progress=False)
    logit, tuned = lens_kl(model, held_out), lens.kl(held_out)
    print("held-out KL per row, logit lens:", [round(x, 3) for x in logit.tolist()])
    print("held-out KL per row, tuned lens:", [round(x, 3) for x in tuned.tolist()])
    assert history[-1].sum() < history[0].sum()
    assert (tuned[:-1] < logit[:-1]).all()
    assert logit[-1] < 1e-5 and tuned[-1] < 1e-5  # the output row is the model's output
    assert tuned[0] < logit[0] / 2  # the embeddings need the most translating


# ---- 3. input errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: logit_lens(m, PROMPT, k=0), "k must be"),
        (lambda m: logit_lens(m, ""), "prompt is empty"),
        (lambda m: logit_lens(m, PROMPT, target=" Parisian"), "give a single token"),
        (lambda m: logit_lens(m, PROMPT, target=60000), "outside the vocabulary"),
        (lambda m: logit_lens(m, torch.zeros(2, 3, dtype=torch.long)), "one prompt"),
        (lambda m: logit_lens(m, PROMPT).values("logits"), "color_by must be"),
        (lambda m: TunedLens(m).fit(torch.arange(500), steps=0), "steps must be"),
        (lambda m: TunedLens(m).fit(torch.arange(500), optimizer="lbfgs"), "optimizer must be"),
        (lambda m: TunedLens(m).fit("/nonexistent/corpus.txt"), "does not exist"),
        (lambda m: TunedLens(m).fit(torch.arange(10), seq_len=64), "fewer than one window"),
    ],
)
def test_bad_input_raises_our_error(small, call, words):
    with pytest.raises(GPT2LabError, match=words):
        call(small)


# ---- 3b. showing it: terminal tables that fit, HTML pages, progress -------------------------
README_PROMPT = "When Mary and John went to the store, John gave a drink to"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def bundled():
    return gl.load()


def render(renderable, width: int, terminal: bool = True) -> str:
    """What rich prints at `width` columns, colours stripped."""
    out = io.StringIO()
    console = Console(
        file=out,
        width=width,
        force_terminal=terminal,
        color_system="truecolor" if terminal else None,
    )
    console.print(renderable)
    return ANSI.sub("", out.getvalue())


def check_pages(res: LensResult, k: int, text: str, width: int) -> int:
    """Every line fits; every page repeats every layer label, with the top-1 token and
    probability of each of its positions whole in that label's line; returns the pages."""
    lines = text.splitlines()
    assert max(cell_len(line) for line in lines) <= width
    pages = res.table(k).page_ranges(width)
    assert [p for page in pages for p in page] == list(range(len(res.strings)))
    for row, label in enumerate(res.labels):
        rows = [line for line in lines if line.startswith(f"│ {label} ")]
        assert len(rows) == len(pages), label
        for line, page in zip(rows, pages, strict=True):
            for pos in page:
                cell = f"{show_token(res.top_strings[row][pos][0])} {float(res.top_probs[row, pos, 0]):.2f}"
                assert f"│ {cell} " in line, (label, pos, line)
    for s in res.strings:
        assert f" {show_token(s)} " in text
    return len(pages)


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("k, target", [(1, None), (2, " Mary")])
def test_lens_table_pages_to_fit_the_terminal(bundled, width, k, target):
    res = logit_lens(bundled, README_PROMPT, k=k, target=target)
    text = render(res.table(k), width)
    assert check_pages(res, k, text, width) > 1
    assert text.startswith(f"logit lens: top-{k} token and probability")
    assert "positions 0-" in text and f"(of {len(res.strings)})" in text
    if target is not None:
        assert "p and rank of ' Mary'" in text
        for row in range(len(res.labels)):
            assert (
                f"p={float(res.target_probs[row, -1]):.2f} #{int(res.target_ranks[row, -1])}"
                in text
            )


def test_lens_table_piped_is_one_table_and_prints_as_text(bundled, monkeypatch):
    res = logit_lens(bundled, README_PROMPT, k=1)
    text = render(res.table(), 1000, terminal=False)
    assert check_pages(res, 1, text, 1000) == 1 and "positions" not in text
    monkeypatch.setenv("COLUMNS", "80")
    plain = str(res.table())  # print(result.table()) without rich: the terminal's width
    assert check_pages(res, 1, plain, 80) > 1
    assert repr(res.table()).startswith("<LensTable: logit lens")


def test_show_token_keeps_its_quotes():
    assert show_token(" Psychiatric") == "' Psychiat…'"
    assert show_token(" to") == "' to'"
    assert len(show_token("x" * 50, 10)) == 10


def test_to_html_returns_a_short_page_or_writes_the_file(bundled, tmp_path):
    res = logit_lens(bundled, README_PROMPT, k=3)
    page = res.to_html(color_by="entropy")
    assert page == lens_html(res, "entropy") and isinstance(page, str)  # old callers: a str
    assert page.html == str(page) and type(page.html) is str
    assert len(
        repr(page)
    ) < 200 and "HTML heat map of the logit lens (5 rows x 14 positions)" in repr(page)
    frame = page._repr_html_()  # a notebook shows the page, its styles kept inside an iframe
    assert frame.startswith("<iframe srcdoc='")
    assert html.unescape(frame.split("'")[1]) == page.html
    path = res.to_html(tmp_path / "lens.html", color_by="entropy")
    assert path == tmp_path / "lens.html" and path.read_text(encoding="utf-8") == page
    assert page.save(tmp_path / "again.html").read_text(encoding="utf-8") == page


def test_long_lens_jobs_report_progress(small, capsys, monkeypatch):
    """progress=True in a log (stderr here is not a terminal): periodic lines and a last
    one; the default (auto) stays silent there."""
    from gpt2lab import progress

    data = torch.arange(2048) % 1000
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every step
    lens_kl(small, data, max_tokens=256, seq_len=32, batch_size=4, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("logit lens KL: 4/8 windows (50%), ")
    assert lines[-1].startswith("logit lens KL: 8/8 windows (100%), ") and "done in" in lines[-1]
    lens = TunedLens(small)
    lens.fit(data, steps=2, tokens_per_step=64, seq_len=32, bf16=False, progress=True)
    lens.kl(data, max_tokens=64, seq_len=32, progress=True)
    err = capsys.readouterr().err
    assert "tuned lens: 1/2 steps (50%)" in err and ", train KL " in err
    assert "tuned lens KL: 2/2 windows (100%)" in err
    lens_kl(small, data, max_tokens=64, seq_len=32)
    lens.fit(data, steps=1, tokens_per_step=32, seq_len=32, bf16=False)
    assert capsys.readouterr().err == ""


# ---- 4. the command line ----------------------------------------------------------------------
def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def test_cli_lens_prints_table_and_writes_png_and_html(small_ckpt, small, tmp_path, capsys):
    png, page = tmp_path / "lens.png", tmp_path / "lens.html"
    rc, out, _ = run_main(["lens", PROMPT, "--model", str(small_ckpt), "--out", str(png)], capsys)
    assert rc == 0
    res = logit_lens(small, PROMPT, k=1)
    assert "logit lens: top-1 token" in out
    for row, label in enumerate(res.labels):  # every row, with its top-1 token and probability
        line = next(x for x in out.splitlines() if x.lstrip("│┃ ").startswith(label))
        cell = f"{show_token(res.top_strings[row][-1][0])} {float(res.top_probs[row, -1, 0]):.2f}"
        assert cell in line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc, out, _ = run_main(
        ["lens", PROMPT, "--model", str(small_ckpt), "--out", str(page), "--target", " the",
         "--k", "2", "--color-by", "target"],
        capsys,
    )  # fmt: skip
    assert rc == 0 and "p and rank of ' the'" in out
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<td style=") == res.top_ids.numel()
    assert "<script" not in html and "src=" not in html and "href=" not in html


def test_cli_lens_train_then_lens_with_it(small_ckpt, small, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TRAIN_TEXT, encoding="utf-8")
    held = tmp_path / "held.txt"
    held.write_text(HELD_OUT, encoding="utf-8")
    out_dir = tmp_path / "tuned"
    rc, out, _ = run_main(
        ["lens-train", "--model", str(small_ckpt), "--data", str(corpus), "--out", str(out_dir),
         "--steps", "2", "--tokens-per-step", "64", "--seq-len", "32", "--eval", str(held),
         "--eval-tokens", "64"],
        capsys,
    )  # fmt: skip
    assert rc == 0, out
    lens = TunedLens.load(out_dir, small)
    assert lens.info["steps"] == 2
    expect = lens.kl(str(held), max_tokens=64, seq_len=32)
    printed = [line.split() for line in out.splitlines() if line.startswith(("embed", "block"))]
    assert [float(p[-1]) for p in printed] == pytest.approx(expect.tolist(), abs=1e-4)

    rc, out, _ = run_main(
        ["lens", PROMPT, "--model", str(small_ckpt), "--tuned", str(out_dir)], capsys
    )
    assert rc == 0 and "tuned lens: top-1 token" in out


def run_in_terminal(args: list[str], columns: int) -> subprocess.Popen:
    """`python -m gpt2lab ARGS` with stdout on a pseudo-terminal `columns` wide (as
    `stty cols`), stderr piped; returns the process with its terminal's master end."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", *args],
        stdout=slave, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    os.close(slave)
    proc.master = master
    return proc


def read_terminal(proc: subprocess.Popen) -> str:
    import os

    screen = b""
    while True:
        try:
            chunk = os.read(proc.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(proc.master)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return ANSI.sub("", screen.decode()).replace("\r\n", "\n")


def test_cli_lens_in_80_and_120_column_terminals(bundled):
    """The README's prompt in real terminals: every layer label on every page, every
    top-1 token readable, no line wider than the terminal."""
    procs = {width: run_in_terminal(["lens", README_PROMPT], width) for width in (80, 120)}
    res = logit_lens(bundled, README_PROMPT, k=1)
    for width, proc in procs.items():
        screen = read_terminal(proc)
        assert check_pages(res, 1, screen, width) > 1
        assert screen.startswith("logit lens: top-1 token and probability")


@pytest.mark.parametrize(
    "args, words",
    [
        (["lens", PROMPT, "--tuned", "{missing}"], "no tuned lens at"),
        (["lens", PROMPT, "--k", "0"], "--k must be at least 1"),
        (["lens", ""], "prompt is empty"),
        (["lens", PROMPT, "--out", "{tmp}/lens.jpg"], "--out must end in .png or .html"),
        (["lens", PROMPT, "--target", " Parisian"], "give a single token"),
        (["lens-train", "--data", "{missing}", "--out", "{tmp}/x"], "does not exist"),
    ],
)
def test_cli_lens_errors_are_one_line(small_ckpt, tmp_path, capsys, args, words):
    paths = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    argv = [a.format(**paths) for a in args] + ["--model", str(small_ckpt)]
    rc, out, err = run_main(argv, capsys)
    lines = err.splitlines()
    assert rc == 1 and out == "" and len(lines) == 1, (out, err)
    assert lines[0].startswith("gpt2lab: error: ") and words in lines[0]
