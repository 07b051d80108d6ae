"""Research recipes layered on the plain trainer.

- Parameter selection (`train.only` / `train.freeze`, fnmatch patterns over gpt2lab's
  parameter names such as `wte.weight` or `blocks.*.mlp.*`), and the embeddings-only
  recipe: relearn the token (optionally position) embeddings for a new language with
  every block frozen.
- LayerNorm removal ("ln-free"): measure each LayerNorm's average scale on a few
  batches, then, while fine-tuning, replace the LayerNorms one at a time (every
  `ln_free_gap` steps from `ln_free_start`: each layer's ln2, then each ln1, then
  ln_final) by centring and division by that fixed scale. At the end the scales are
  folded into the LayerNorm weights and the model is saved with `ln_free = true`, so
  its forward pass contains no normalisation by a live standard deviation.
  (The published schedule splits ln1 into its Q/K and V uses; gpt2lab's blocks share
  one ln1, so it is replaced as one site.)
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch

from ..errors import GPT2LabError
from ..model import GPT2, LayerNorm
from .config import TrainConfig


def select_parameters(model: GPT2, cfg: TrainConfig) -> list[str]:
    """Set requires_grad from train.only / train.freeze / the recipe; return trainable names."""
    t = cfg.train
    only = list(t.only)
    if t.recipe == "embeddings-only":
        only = ["wte.weight"] + (["wpe.weight"] if t.train_wpe else [])
    names = [n for n, _ in model.named_parameters()]
    for label, patterns in (("train.only", only), ("train.freeze", t.freeze)):
        for pattern in patterns:
            if not any(fnmatch(n, pattern) for n in names):
                raise GPT2LabError(
                    f"{label} pattern {pattern!r} matches no parameter (e.g. {names[0]}, {names[-1]})"
                )
    trainable = []
    for name, p in model.named_parameters():
        keep = (not only or any(fnmatch(name, pat) for pat in only)) and not any(
            fnmatch(name, pat) for pat in t.freeze
        )
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


# ---- LayerNorm removal ------------------------------------------------------------------
def ln_sites(model: GPT2) -> list[str]:
    """LayerNorms in the order they are removed."""
    n = model.cfg.n_layers
    return (
        [f"blocks.{i}.ln2" for i in range(n)] + [f"blocks.{i}.ln1" for i in range(n)] + ["ln_final"]
    )


def ln_schedule(model: GPT2, cfg: TrainConfig) -> dict[str, int]:
    """Step at which each LayerNorm site is replaced."""
    t = cfg.train
    sites = ln_sites(model)
    last = t.ln_free_start + (len(sites) - 1) * t.ln_free_gap
    if last >= t.max_steps:
        raise GPT2LabError(
            f"ln-free: the last of {len(sites)} LayerNorms is replaced at step {last}, "
            f"but train.max_steps is {t.max_steps}; raise max_steps or lower ln_free_start / ln_free_gap"
        )
    return {site: t.ln_free_start + i * t.ln_free_gap for i, site in enumerate(sites)}


@torch.no_grad()
def measure_ln_scales(model: GPT2, batches: list[torch.Tensor]) -> dict[str, float]:
    """Average live scale sqrt(var + eps) of every LayerNorm over the given token batches."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def record(scale: torch.Tensor, hook) -> None:
        site = hook.name.removesuffix(".hook_scale")
        sums[site] = sums.get(site, 0.0) + float(scale.float().sum())
        counts[site] = counts.get(site, 0) + scale.numel()

    with model.hooks([(lambda name: name.endswith("hook_scale"), record)]):
        for tokens in batches:
            model(tokens)
    return {site: sums[site] / counts[site] for site in ln_sites(model)}


def apply_ln_schedule(
    model: GPT2, sigmas: dict[str, float], schedule: dict[str, int], step: int
) -> list[str]:
    """Fix the scale of every site whose time has come; return the sites fixed by this call."""
    changed = []
    for site, at in schedule.items():
        ln: LayerNorm = model.get_submodule(site)
        if step >= at and ln.fixed_scale is None:
            ln.fixed_scale = sigmas[site]
            changed.append(site)
    return changed


@torch.no_grad()
def fold_ln_scales(model: GPT2) -> None:
    """Fold each fixed scale into its LayerNorm's weight and bias: x/s*w + b == x*(w/s) + b."""
    for site in ln_sites(model):
        ln: LayerNorm = model.get_submodule(site)
        if ln.fixed_scale is None:
            raise GPT2LabError(
                f"ln-free: {site} still normalises by its live std; the schedule did not finish"
            )
        ln.weight.div_(ln.fixed_scale)
        ln.fixed_scale = 1.0
    model.cfg = model.cfg.with_(ln_free=True)
