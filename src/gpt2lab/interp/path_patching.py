"""Path patching (Wang et al. 2022, "Interpretability in the Wild", the IOI paper).

Activation patching asks whether a component matters; path patching asks whether it
matters *through a given route*. The sender's activation comes from the corrupted
("new") run, but it may reach only the chosen receivers, through the residual stream:

1. cache the clean run and the corrupted run once;
2. run the clean input with the senders set to their corrupted values and every other
   component (each head's output, and each MLP's unless `freeze_mlps=False`) frozen
   to its clean value, and record the receivers' inputs (a head's query / key / value,
   an MLP's input, or the final residual stream);
3. run the clean input again, this time patching only the receivers' inputs from step
   2 and letting everything downstream of them compute freely; score the metric.

With the final residual stream as receiver, step 2 already yields the logits. Senders
are heads ("9.6" or (9, 6)), MLPs ("mlp3") or the embeddings ("embed"); receivers are
"final", heads ("9.6" for q, k and v, "9.6.q" for one of them) or MLPs ("mlp3").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from ..errors import GPT2LabError
from ..progress import progress_bar
from .patching import (
    ALL,
    Metric,
    Patch,
    PatchResult,
    Prompts,
    chunks,
    prepare_pair,
    run_patched,
    scalar,
)

if TYPE_CHECKING:
    from ..model import GPT2

NodeSpec = Union[str, tuple]


@dataclass(frozen=True)
class Node:
    """One component: a head (`layer`, `head`), an MLP (`layer`), the embeddings, or the
    final residual stream; for a head receiver, `inputs` picks among q, k and v."""

    kind: str  # "head", "mlp", "embed" or "final"
    layer: int = -1
    head: int = -1
    inputs: str = "qkv"

    def __str__(self) -> str:
        if self.kind == "head":
            return f"{self.layer}.{self.head}" + ("" if self.inputs == "qkv" else f".{self.inputs}")
        return f"mlp{self.layer}" if self.kind == "mlp" else self.kind


def parse_node(spec: NodeSpec | Node, model: GPT2, *, receiver: bool) -> Node:
    """A Node from "9.6", "9.6.q", (9, 6), (9, 6, "q"), "mlp3", "embed" or "final"."""
    if isinstance(spec, Node):
        node = spec
    elif isinstance(spec, tuple) and len(spec) in (2, 3):
        node = Node("head", int(spec[0]), int(spec[1]), spec[2] if len(spec) == 3 else "qkv")
    elif isinstance(spec, str) and spec in ("final", "logits", "resid_final"):
        node = Node("final")
    elif isinstance(spec, str) and spec == "embed":
        node = Node("embed")
    elif isinstance(spec, str) and (m := re.fullmatch(r"(?:mlp|m)(\d+)", spec)):
        node = Node("mlp", int(m.group(1)))
    elif isinstance(spec, str) and (m := re.fullmatch(r"(\d+)\.(\d+)(?:\.([qkv]+))?", spec)):
        node = Node("head", int(m.group(1)), int(m.group(2)), m.group(3) or "qkv")
    else:
        role = "receiver" if receiver else "sender"
        raise GPT2LabError(
            f"unknown {role} {spec!r}: use 'L.H' for a head, 'mlpL', "
            + ("'L.H.q' / 'L.H.k' / 'L.H.v', or 'final'" if receiver else "or 'embed'")
        )
    role = "receiver" if receiver else "sender"
    if (node.kind == "final" and not receiver) or (node.kind == "embed" and receiver):
        raise GPT2LabError(f"{node} cannot be a {role}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if node.kind in ("head", "mlp") and not 0 <= node.layer < n_layers:
        raise GPT2LabError(f"{role} {spec!r}: layer {node.layer} is not in 0..{n_layers - 1}")
    if node.kind == "head" and not 0 <= node.head < n_heads:
        raise GPT2LabError(f"{role} {spec!r}: head {node.head} is not in 0..{n_heads - 1}")
    if node.kind == "head" and (not node.inputs or set(node.inputs) - set("qkv")):
        raise GPT2LabError(f"{role} {spec!r}: head inputs are q, k and/or v")
    return node


def reaches(sender: Node, receiver: Node) -> bool:
    """Whether a path through the residual stream runs from sender to receiver."""
    if receiver.kind == "final" or sender.kind == "embed":
        return True
    if receiver.kind == "head":
        return sender.layer < receiver.layer
    return sender.layer < receiver.layer or (
        sender.kind == "head" and sender.layer == receiver.layer
    )


def receiver_hooks(node: Node, model: GPT2) -> list[tuple[str, tuple]]:
    """(hook name, index) of what a receiver reads: its q/k/v, its MLP input, or the
    residual stream after the last block."""
    if node.kind == "final":
        return [(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", ())]
    if node.kind == "mlp":
        return [(f"blocks.{node.layer}.mlp.hook_pre", ())]
    return [(f"blocks.{node.layer}.attn.hook_{x}", (ALL, node.head)) for x in node.inputs]


class PathPatcher:
    """Caches a clean/corrupted pair once, then path-patches any senders -> receivers."""

    def __init__(
        self,
        model: GPT2,
        clean: Prompts,
        corrupted: Prompts,
        metric: Metric,
        *,
        attention_mask: torch.Tensor | None = None,
        freeze_mlps: bool = True,
    ):
        self.model, self.metric, self.freeze_mlps = model, metric, freeze_mlps
        self.clean, self.corrupted, self.mask = prepare_pair(
            model, clean, corrupted, attention_mask
        )
        n_layers = model.cfg.n_layers
        names = ["hook_embed", "hook_pos_embed"]
        for layer in range(n_layers):
            names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
        with torch.no_grad():
            clean_logits, self.clean_cache = model.run_with_cache(
                self.clean, attention_mask=self.mask, names_filter=names
            )
            _, self.corr_cache = model.run_with_cache(
                self.corrupted, attention_mask=self.mask, names_filter=names
            )
        self.clean_metric = scalar(metric(clean_logits))

    def frozen_run(self, senders: Sequence[Node]) -> list[Patch]:
        """Step 2's patches: senders from the corrupted run, everything else clean."""
        patches = []
        for layer in range(self.model.cfg.n_layers):
            z, mlp = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"
            patches.append(Patch(z, (), self.clean_cache[z]))
            if self.freeze_mlps:
                patches.append(Patch(mlp, (), self.clean_cache[mlp]))
        for s in senders:
            if s.kind == "head":
                z = f"blocks.{s.layer}.attn.hook_z"
                patches.append(Patch(z, (ALL, s.head), self.corr_cache[z]))
            elif s.kind == "mlp":
                mlp = f"blocks.{s.layer}.hook_mlp_out"
                patches.append(Patch(mlp, (), self.corr_cache[mlp]))
            else:
                for name in ("hook_embed", "hook_pos_embed"):
                    patches.append(Patch(name, (), self.corr_cache[name]))
        return patches

    def run(self, sender_sets: Sequence[Sequence[Node]], receivers: Sequence[Node]) -> list[float]:
        """The metric after path patching each set of senders (one batched pass per step)."""
        model, n = self.model, self.clean.shape[0]
        reads = [hook for r in receivers for hook in receiver_hooks(r, model)]
        names = list(dict.fromkeys(name for name, _ in reads))
        final_only = all(r.kind == "final" for r in receivers)
        # with no final receiver, step 2 can stop after the last receiver's block
        any_final = any(r.kind == "final" for r in receivers)
        stop = None if any_final else max(r.layer for r in receivers) + 1
        variants = [self.frozen_run(senders) for senders in sender_sets]
        out, recorded = run_patched(
            model,
            self.clean,
            variants,
            attention_mask=self.mask,
            record=[] if final_only else names,
            stop_at_layer=stop,
        )
        if final_only:  # step 2 already produced the logits of the patched residual stream
            return [scalar(self.metric(chunk)) for chunk in chunks(out, n)]
        per_variant = {name: chunks(x, n) for name, x in recorded.items()}
        step3 = [
            [Patch(name, index, per_variant[name][i]) for name, index in reads]
            for i in range(len(sender_sets))
        ]
        logits, _ = run_patched(model, self.clean, step3, attention_mask=self.mask)
        return [scalar(self.metric(chunk)) for chunk in chunks(logits, n)]


def as_list(spec: Any) -> list:
    """One node spec or a list of them, as a list: (9, 6) is one head, not two nodes."""
    one_head = isinstance(spec, tuple) and bool(spec) and isinstance(spec[0], int)
    return [spec] if isinstance(spec, (str, Node)) or one_head else list(spec)


def path_patch(
    model: GPT2,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    senders: NodeSpec | Sequence[NodeSpec],
    receivers: NodeSpec | Sequence[NodeSpec] = "final",
    *,
    attention_mask: torch.Tensor | None = None,
    freeze_mlps: bool = True,
) -> float:
    """The metric when `senders` (patched from the corrupted run) reach only `receivers`.

    With the normalised logit difference, 1 means the path carries nothing of the
    corruption and 0 means it carries all of it. `freeze_mlps=False` lets MLPs recompute
    (so paths through MLPs count as direct, as in the IOI paper's code).
    """
    patcher = PathPatcher(
        model, clean, corrupted, metric, attention_mask=attention_mask, freeze_mlps=freeze_mlps
    )
    send = [parse_node(s, model, receiver=False) for s in as_list(senders)]
    receive = [parse_node(r, model, receiver=True) for r in as_list(receivers)]
    if not send or not receive:
        raise GPT2LabError("path patching needs at least one sender and one receiver")
    return patcher.run([send], receive)[0]


def path_patch_heads(
    model: GPT2,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    receivers: NodeSpec | Sequence[NodeSpec] = "final",
    *,
    attention_mask: torch.Tensor | None = None,
    freeze_mlps: bool = True,
    batch: int = 1,
    progress: bool = True,
) -> PatchResult:
    """Path patching with each head in turn as the sender: a [layer, head] PatchResult.

    Heads with no path to any receiver (at or after the receivers' layer) get the clean
    metric without a forward pass. `batch` senders share each forward pass.
    """
    if batch < 1:
        raise GPT2LabError(f"batch must be at least 1, got {batch}")
    receive = [parse_node(r, model, receiver=True) for r in as_list(receivers)]
    if not receive:
        raise GPT2LabError("path patching needs at least one receiver")
    patcher = PathPatcher(
        model, clean, corrupted, metric, attention_mask=attention_mask, freeze_mlps=freeze_mlps
    )
    cfg = model.cfg
    values = torch.full((cfg.n_layers, cfg.n_heads), patcher.clean_metric)
    senders = [Node("head", layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    senders = [s for s in senders if any(reaches(s, r) for r in receive)]
    with progress_bar(len(senders), "path patching", progress) as advance:
        for start in range(0, len(senders), batch):
            group = senders[start : start + batch]
            for s, v in zip(group, patcher.run([[s] for s in group], receive), strict=True):
                values[s.layer, s.head] = v
            advance(len(group))
    labels = {
        "layer": [str(i) for i in range(cfg.n_layers)],
        "head": [str(i) for i in range(cfg.n_heads)],
    }
    result = PatchResult(values, ("layer", "head"), labels, "path patching")
    result.note = "path patching: senders = each head, receivers = " + ", ".join(map(str, receive))
    return result
