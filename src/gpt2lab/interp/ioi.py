"""The indirect object identification (IOI) task of Wang et al. 2022.

"Then, Mary and John went to the store. John gave a drink to" -> " Mary": the model
must name the indirect object (IO), not the subject (S) who appears twice. The prompts
come from the paper's 15 templates, in two orders: BABA (the subject first) and ABBA
(the IO first). Every name, place and object is one GPT-2 token after a space, so the
prompts of a template line up token by token; that is what lets activations be
averaged per template and patched between a prompt and its "ABC" counterpart, where
the three names are replaced by three unrelated ones.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import GPT2LabError
from ..inputs import left_pad, single_token_id

if TYPE_CHECKING:
    from ..model import GPT2
    from ..tokenizer import Tokenizer

# The name list of the paper's published code (99 names, each one GPT-2 token).
NAMES = (
    "Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James "
    "Robert John Joseph Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie "
    "Brian Nicole Nicholas Anthony Heather Eric Elizabeth Adam Megan Melissa Kevin Steven "
    "Thomas Timothy Christina Kyle Rachel Laura Lauren Amber Brittany Danielle Richard "
    "Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron Charles "
    "Rebecca Jacob Stephen Patrick Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul "
    "Angela Tyler Scott Katherine Andrea Gregory Erica Mary Travis Lisa Kenneth Bryan "
    "Lindsey Kristen Jose Alexander Jesse Katie Lindsay Shannon Vanessa Courtney Christine "
    "Alicia Cody Allison Bradley Samuel"
).split()
PLACES = "store garden restaurant school hospital office house station".split()
OBJECTS = "ring kiss bone basketball computer necklace drink snack".split()

BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
]


def abba(template: str) -> str:
    """The ABBA order of a BABA template: the first [B] and the first [A] swap places."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


ABBA_TEMPLATES = [abba(t) for t in BABA_TEMPLATES]
SLOTS = re.compile(r"( \[A\]| \[B\]| \[PLACE\]| \[OBJECT\])")


def single_token_ids(tokenizer: Tokenizer, words: Sequence[str], what: str) -> dict[str, int]:
    """Each word's id as one token after a space; an error names the words that are not."""
    ids, bad = {}, []
    for w in words:
        try:
            ids[w] = single_token_id(tokenizer, " " + w)
        except GPT2LabError:
            bad.append(w)
    if bad:
        raise GPT2LabError(
            f"{what} must each be one GPT-2 token after a space; not: {', '.join(bad[:10])}"
        )
    return ids


@dataclass
class IOIDataset:
    """IOI prompts as a left-padded token batch, with the positions of IO, S1, S2, end.

    `prompts` end just before the answer; `io`, `s1` and `s2` are the names at the IO,
    first-subject and second-subject positions (s1 == s2 in a clean set, all three
    different in an ABC set). `io_tokens` / `s_tokens` are the ids of " IO" and " S1",
    the answer and the wrong answer. Positions index `tokens` (padding included), so
    `end_pos` is the last column for every prompt.
    """

    prompts: list[str]
    io: list[str]
    s1: list[str]
    s2: list[str]
    places: list[str]
    objects: list[str]
    template_ids: list[int]
    templates: list[str]
    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    lengths: torch.Tensor
    io_pos: torch.Tensor
    s1_pos: torch.Tensor
    s2_pos: torch.Tensor
    end_pos: torch.Tensor
    io_tokens: torch.Tensor
    s_tokens: torch.Tensor
    prepend_bos: bool
    seed: int

    def __len__(self) -> int:
        return len(self.prompts)

    def template_of(self, i: int) -> str:
        return self.templates[self.template_ids[i]]

    def logit_diff(self, logits: torch.Tensor, per_prompt: bool = False) -> torch.Tensor:
        """logit(IO) - logit(S) at the end position (batch mean unless per_prompt)."""
        if logits.shape[0] != len(self):
            raise GPT2LabError(
                f"logits are for {logits.shape[0]} prompts, the dataset has {len(self)}"
            )
        rows = torch.arange(len(self), device=logits.device)
        end = logits[rows, self.end_pos.to(logits.device)]
        diff = (
            end[rows, self.io_tokens.to(logits.device)] - end[rows, self.s_tokens.to(logits.device)]
        )
        return diff if per_prompt else diff.mean()

    def abc(self, seed: int | None = None, tokenizer: Tokenizer | None = None) -> IOIDataset:
        """The ABC counterpart: the same prompts with IO, S1 and S2 replaced by three
        different names, none of them the prompt's own two (the paper's ABC set)."""
        seed = self.seed + 1 if seed is None else seed
        rng = random.Random(seed)
        names = sorted(set(NAMES) | set(self.io) | set(self.s1))
        rows = []
        for i in range(len(self)):
            pool = [n for n in names if n not in (self.io[i], self.s1[i], self.s2[i])]
            x, y, z = rng.sample(pool, 3)
            rows.append((self.template_ids[i], x, y, z, self.places[i], self.objects[i]))
        return build(rows, self.templates, self.prepend_bos, seed, tokenizer)


def fill(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> list[tuple[str, str]]:
    """The prompt (answer cut off) as pieces: (slot, text), slot "" for literal text."""
    if not template.endswith(" [A]"):
        raise GPT2LabError(f"an IOI template must end with ' [A]' (the answer): {template!r}")
    body = template[: -len(" [A]")]
    if body.count("[A]") != 1 or body.count("[B]") != 2:
        raise GPT2LabError(
            f"an IOI template needs one [A] and two [B] before the answer: {template!r}"
        )
    pieces, subject = [], 0
    for part in SLOTS.split(body):
        if not part:
            continue
        if not SLOTS.fullmatch(part):
            pieces.append(("", part))
            continue
        key = part.strip()
        if key == "[B]":
            subject += 1
            slot = f"S{subject}"
        else:
            slot = {"[A]": "IO", "[PLACE]": "PLACE", "[OBJECT]": "OBJECT"}[key]
        word = {"IO": io, "S1": s1, "S2": s2, "PLACE": place, "OBJECT": obj}[slot]
        pieces.append((slot, " " + word))
    if "[" in "".join(text for slot, text in pieces if not slot):
        raise GPT2LabError(f"placeholders must follow a space in an IOI template: {template!r}")
    return pieces


def build(
    rows: Sequence[tuple[int, str, str, str, str, str]],
    templates: Sequence[str],
    prepend_bos: bool,
    seed: int,
    tokenizer: Tokenizer | None = None,
) -> IOIDataset:
    """Tokenize (template id, io, s1, s2, place, object) rows, locating each slot."""
    if tokenizer is None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer()
    words = {w for r in rows for w in r[1:4]}
    name_ids = single_token_ids(tokenizer, sorted(words), "names")
    single_token_ids(
        tokenizer, sorted({r[4] for r in rows} | {r[5] for r in rows}), "places and objects"
    )
    ids, slots, texts = [], [], []
    for t, io, s1, s2, place, obj in rows:
        pieces = fill(templates[t], io, s1, s2, place, obj)
        seq, where = ([tokenizer.eot_token] if prepend_bos else []), {}
        for slot, text in pieces:
            if slot:
                where[slot] = len(seq)
            seq += tokenizer.encode(text)
        text = "".join(text for _, text in pieces)
        expected = tokenizer.encode(text)
        if (seq[1:] if prepend_bos else seq) != expected:
            raise GPT2LabError(f"IOI prompt does not tokenize slot by slot: {text!r}")
        ids.append(seq)
        slots.append(where)
        texts.append(text)
    tokens, mask = left_pad(ids, tokenizer.eot_token)
    lengths = torch.tensor([len(s) for s in ids])
    pad = tokens.shape[1] - lengths

    def pos(slot: str) -> torch.Tensor:
        return torch.tensor([w[slot] for w in slots]) + pad

    return IOIDataset(
        prompts=texts,
        io=[r[1] for r in rows],
        s1=[r[2] for r in rows],
        s2=[r[3] for r in rows],
        places=[r[4] for r in rows],
        objects=[r[5] for r in rows],
        template_ids=[r[0] for r in rows],
        templates=list(templates),
        tokens=tokens,
        attention_mask=None if bool(mask.all()) else mask,
        lengths=lengths,
        io_pos=pos("IO"),
        s1_pos=pos("S1"),
        s2_pos=pos("S2"),
        end_pos=torch.full((len(rows),), tokens.shape[1] - 1),
        io_tokens=torch.tensor([name_ids[r[1]] for r in rows]),
        s_tokens=torch.tensor([name_ids[r[2]] for r in rows]),
        prepend_bos=prepend_bos,
        seed=seed,
    )


def ioi_dataset(
    n_prompts: int = 100,
    *,
    kind: str = "mixed",
    templates: Sequence[int] | None = None,
    seed: int = 0,
    prepend_bos: bool = False,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    tokenizer: Tokenizer | None = None,
) -> IOIDataset:
    """`n_prompts` IOI prompts, each from a template drawn uniformly at random.

    `kind` is "BABA", "ABBA" or "mixed" (both orders); `templates` restricts to some of
    the 15 templates (indices into BABA_TEMPLATES; with "mixed", both orders of each).
    The same seed gives the same prompts.
    """
    if n_prompts < 1:
        raise GPT2LabError(f"n_prompts must be at least 1, got {n_prompts}")
    if kind not in ("BABA", "ABBA", "mixed"):
        raise GPT2LabError(f"kind must be 'BABA', 'ABBA' or 'mixed', got {kind!r}")
    chosen = list(range(len(BABA_TEMPLATES))) if templates is None else list(templates)
    if not chosen or any(not 0 <= t < len(BABA_TEMPLATES) for t in chosen):
        raise GPT2LabError(f"templates are indices in 0..{len(BABA_TEMPLATES) - 1}, got {chosen}")
    pool = {
        "BABA": [BABA_TEMPLATES[t] for t in chosen],
        "ABBA": [ABBA_TEMPLATES[t] for t in chosen],
    }
    all_templates = pool["BABA"] + pool["ABBA"] if kind == "mixed" else pool[kind]
    if len(set(names)) < 5:
        raise GPT2LabError(
            "IOI needs at least 5 different names (two per prompt, three more for ABC)"
        )
    names, places, objects = sorted(set(names)), list(places), list(objects)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        t = rng.randrange(len(all_templates))
        io, s = rng.sample(names, 2)
        rows.append((t, io, s, s, rng.choice(places), rng.choice(objects)))
    return build(rows, all_templates, prepend_bos, seed, tokenizer)


# ---- evaluation and ablation ---------------------------------------------------------
def run_ioi(
    model: GPT2, dataset: IOIDataset, hooks: Sequence[tuple[str, Callable]] = ()
) -> torch.Tensor:
    """Logits of the dataset's prompts, with `hooks` attached."""
    tokens = dataset.tokens.to(model.device)
    mask = None if dataset.attention_mask is None else dataset.attention_mask.to(model.device)
    with torch.no_grad(), model.hooks(hooks):
        return model(tokens, attention_mask=mask)


def ioi_score(
    model: GPT2, dataset: IOIDataset, hooks: Sequence[tuple[str, Callable]] = ()
) -> dict[str, float]:
    """Mean logit difference IO - S at the end, and the share of prompts preferring IO
    (GPT-2 small in the paper: 3.56 and 99.3%)."""
    diff = dataset.logit_diff(run_ioi(model, dataset, hooks), per_prompt=True)
    return {"logit_diff": float(diff.mean()), "io_preferred": float((diff > 0).float().mean())}


def parse_heads(heads: Sequence[Any], model: GPT2) -> list[tuple[int, int]]:
    out = []
    for h in heads:
        if isinstance(h, str) and re.fullmatch(r"\d+\.\d+", h):
            h = tuple(int(x) for x in h.split("."))
        if not (isinstance(h, tuple) and len(h) == 2):
            raise GPT2LabError(f"a head is 'L.H' or (layer, head), got {h!r}")
        layer, head = int(h[0]), int(h[1])
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise GPT2LabError(
                f"head {layer}.{head} is not in this model ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)"
            )
        out.append((layer, head))
    return out


def mean_ablation_hooks(
    model: GPT2,
    dataset: IOIDataset,
    heads: Sequence[Any],
    reference: IOIDataset | None = None,
) -> list[tuple[str, Callable]]:
    """Hooks that replace each listed head's output (hook_z) on `dataset`'s prompts by
    its mean over the `reference` prompts of the same template (default: the ABC set),
    position by position, as in the paper. Use them with `run_ioi`/`ioi_score` or
    `model.hooks(...)` on exactly `dataset.tokens`.
    """
    chosen = parse_heads(heads, model)
    reference = dataset.abc() if reference is None else reference
    layers = sorted({layer for layer, _ in chosen})
    names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    ref_tokens = reference.tokens.to(model.device)
    ref_mask = (
        None if reference.attention_mask is None else reference.attention_mask.to(model.device)
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(ref_tokens, attention_mask=ref_mask, names_filter=names)

    groups = []  # (rows in dataset, length, {layer: mean z [length, head, d_head]})
    for template in sorted({dataset.template_of(i) for i in range(len(dataset))}):
        rows = [i for i in range(len(dataset)) if dataset.template_of(i) == template]
        ref_rows = [i for i in range(len(reference)) if reference.template_of(i) == template]
        if not ref_rows:
            raise GPT2LabError(f"the reference set has no prompt of template {template!r}")
        length = int(dataset.lengths[rows[0]])
        if {int(reference.lengths[i]) for i in ref_rows} != {length}:
            raise GPT2LabError(
                f"reference prompts of template {template!r} differ in length from the dataset's"
            )
        means = {
            layer: cache[f"blocks.{layer}.attn.hook_z"][ref_rows, -length:].mean(0)
            for layer in layers
        }
        groups.append((torch.tensor(rows), length, means))

    def hook_for(layer: int, layer_heads: list[int]) -> Callable:
        def ablate(z: torch.Tensor, hook) -> torch.Tensor:
            if z.shape[0] != len(dataset):
                raise GPT2LabError(
                    f"mean-ablation hooks are for the dataset's {len(dataset)} prompts, got a batch of {z.shape[0]}"
                )
            z = z.clone()
            for rows, length, means in groups:
                rows = rows.to(z.device)
                for h in layer_heads:
                    z[rows, -length:, h] = means[layer][:, h].to(z.dtype)
            return z

        return ablate

    return [
        (
            f"blocks.{layer}.attn.hook_z",
            hook_for(layer, [h for layer_, h in chosen if layer_ == layer]),
        )
        for layer in layers
    ]


__all__ = [
    "ABBA_TEMPLATES",
    "BABA_TEMPLATES",
    "IOIDataset",
    "NAMES",
    "OBJECTS",
    "PLACES",
    "ioi_dataset",
    "ioi_score",
    "mean_ablation_hooks",
    "run_ioi",
]
