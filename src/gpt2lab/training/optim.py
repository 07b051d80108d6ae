"""AdamW with weight decay on matrices only, and the warmup + cosine schedule.

Biases, LayerNorm parameters (1-D) are not decayed, as in GPT-2 / nanoGPT; the
embeddings are matrices and are decayed. The learning rate is a pure function of the
step, so a resumed run follows the same schedule without storing a scheduler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import GPT2LabError
from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - cfg.min_lr)


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GPT2LabError("no parameter is trainable: check train.only / train.freeze")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise GPT2LabError(
                "optimizer adamw8bit needs a CUDA device (bitsandbytes); use adamw on the CPU"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise GPT2LabError(
                "optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type in ("cpu", "cuda")
    )
