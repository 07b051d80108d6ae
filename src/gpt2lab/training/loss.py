"""Next-token cross-entropy that works in place on the logits it is given.

With GPT-2's 50257-word vocabulary the logits of a training batch are big (8 x 256
tokens: 400 MB in float32), and the stock `F.cross_entropy` allocates three more
tensors that size per step: the log-softmax, a zero-filled gradient for the NLL, and
the gradient of the log-softmax. On a CPU, first touching freshly allocated memory
costs page faults, and profiling a 6-layer model showed those passes taking a third
of the step. Here the logits are consumed instead: the forward turns them into
exp(logits - row max) in place, and the backward turns that into the gradient
softmax - one_hot, again in place. Nothing vocabulary-sized is allocated.

The caller must not use the logits afterwards (the trainer never does).
"""

from __future__ import annotations

import torch


class _InPlaceCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits [N, V] float32 (consumed), targets [N]
        target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        row_max = logits.amax(dim=1)
        exp = logits.sub_(row_max[:, None]).exp_()  # exp(x - max), in the logits' memory
        total = exp.sum(dim=1)
        loss = (row_max + total.log() - target_logit).mean()
        ctx.save_for_backward(exp, total, targets)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        exp, total, targets = ctx.saved_tensors
        n = exp.shape[0]
        # d(mean loss)/d(logits) = (softmax - one_hot) / N, written over exp
        grad = exp.mul_((grad_loss / n) / total[:, None])
        grad.scatter_add_(1, targets[:, None], (-grad_loss / n).expand(n, 1).to(grad.dtype))
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...], in float32.

    Equal to F.cross_entropy(logits.float().flatten(0, -2), targets.flatten()) but
    overwrites `logits` when they are already float32 (see the module docstring)."""
    logits = logits.float().flatten(0, -2)
    device = logits.device.type
    with torch.autocast(device, enabled=False):
        return _InPlaceCrossEntropy.apply(logits, targets.flatten())
