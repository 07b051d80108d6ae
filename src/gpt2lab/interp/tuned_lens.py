"""The tuned lens (Belrose et al. 2023): a logit lens with one learned affine map per layer.

The logit lens assumes that every layer already speaks the output layer's "language";
early layers do not (their residual stream is dominated by the embedding, and features
drift in basis and scale across depth). The tuned lens learns, for each row l, a
translator h -> h + A_l h + b_l trained to make the decoded distribution match the
model's final one: minimise KL(final || lens) over a corpus. A and b start at zero, so
an untrained tuned lens *is* the logit lens, and weight decay pulls towards it.

The last row (the final residual stream) has no translator: decoding it already gives
the model's output, KL 0, so the identity is its optimum and training could only add
noise. Training follows the reference recipe: SGD with Nesterov momentum 0.9 (the
learning rate scaled by 1 - momentum so that 1.0 is a good value), weight decay 1e-3,
gradients clipped to norm 1, a linear decay to zero; AdamW (with a warm-up) is the
alternative. The model is frozen throughout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GPT2LabError
from .lens import (
    LensResult,
    final_norm,
    lens_kl,
    residual_stack,
    run_lens,
    unembed_residual,
    unembedding,
)

if TYPE_CHECKING:
    from ..model import GPT2

FORMAT = "gpt2lab-tuned-lens"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZERS = ("sgd", "adamw")


class TunedLens(nn.Module):
    """One affine translator per block input (rows 0 .. n_layers - 1) of `model`.

    `lens.apply(prompt)` gives the same `LensResult` as `logit_lens`; `lens.fit(data)`
    trains; `lens.save(dir)` / `TunedLens.load(dir, model)` store it.
    """

    def __init__(self, model: GPT2):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: never saved or trained
        d = model.cfg.d_model
        self.translators = nn.ModuleList(nn.Linear(d, d) for _ in range(model.cfg.n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.to(model.device)
        self.info: dict[str, Any] = {}  # how it was trained; saved in config.json

    # ---- using it ------------------------------------------------------------------
    def translate(self, resid: torch.Tensor, row: int) -> torch.Tensor:
        """h + A h + b for row `row` (float32 inside); the last row passes through."""
        if row == len(self.translators):
            return resid
        t = self.translators[row]
        h = resid.to(t.weight.dtype)
        return (h + t(h)).to(resid.dtype)

    def forward(self, resid: torch.Tensor, row: int) -> torch.Tensor:
        """Logits the tuned lens reads from residual stream `resid` of row `row`."""
        return unembed_residual(self.model, self.translate(resid, row))

    def apply(
        self,
        prompt: Any,
        *,
        target: Any = None,
        k: int = 5,
        prepend_bos: bool = False,
        keep_logprobs: bool = False,
    ) -> LensResult:
        """The tuned lens over one prompt; the same fields as `logit_lens`."""
        return run_lens(
            self.model, prompt, self.translate, target=target, k=k, prepend_bos=prepend_bos,
            keep_logprobs=keep_logprobs, name="tuned lens",
        )  # fmt: skip

    def kl(self, data: Any, **options: Any) -> torch.Tensor:
        """Mean KL(output || tuned lens) per row over `data` (see `lens_kl`)."""
        options.setdefault("label", "tuned lens KL")
        return lens_kl(self.model, data, self.translate, **options)

    # ---- training --------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        *,
        steps: int = 250,
        tokens_per_step: int = 4096,
        seq_len: int = 128,
        micro_batch: int = 8,
        optimizer: str = "sgd",
        lr: float | None = None,
        weight_decay: float = 1e-3,
        seed: int = 0,
        bf16: bool | None = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Train the translators on `data` (token ids, a text file, or a shards folder's
        train split); returns the mean KL per step and row [steps, n_layers], in nats.

        Each step draws `tokens_per_step` tokens as random windows of `seq_len` (a
        function of `seed` and the step only) and runs them `micro_batch` windows at a
        time. `lr` defaults to 1.0 for SGD (scaled by 1 - momentum) and 1e-3 for AdamW.
        `bf16` runs the lens's unembedding in bfloat16 (float32 softmax), as the reference
        does on GPUs: the [tokens, vocab] matmuls are nearly all the cost. The default uses it
        on CUDA and on CPUs with native bfloat16.

        Progress (with the step's mean train KL): by default (`progress=None`) a bar when
        stderr is a terminal; True also writes periodic lines to a log; False nothing.
        """
        from ..progress import progress_bar
        from .lens_data import token_source

        model, L = self.model, len(self.translators)
        for name, value in (("steps", steps), ("tokens_per_step", tokens_per_step),
                            ("seq_len", seq_len), ("micro_batch", micro_batch)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GPT2LabError(f"{name} must be a positive integer, got {value!r}")
        if seq_len > model.cfg.n_ctx:
            raise GPT2LabError(f"seq_len {seq_len} is longer than the context ({model.cfg.n_ctx})")
        source = token_source(model, data, split="train")
        if bf16 is None:
            bf16 = _fast_bf16(model.device)
        W, b = (t.detach() if t is not None else None for t in unembedding(model))
        if bf16:  # the [tokens, vocab] matmuls are nearly all the cost
            W, b = W.bfloat16(), (b.bfloat16() if b is not None else None)
        rows = max(1, tokens_per_step // seq_len)
        params = list(self.parameters())
        opt, schedule, lr_used = _optimizer(params, optimizer, lr, weight_decay, steps)
        history = torch.zeros(steps, L)

        bar = progress_bar(steps, "tuned lens", progress, unit="steps")
        with _frozen(model), bar as advance:
            for step in range(steps):
                inputs, _ = source.batch(rows, seq_len, seed, step)
                for chunk in inputs.split(micro_batch):
                    with torch.no_grad():
                        resid, logits = residual_stack(model, chunk.to(model.device))
                        final = logits.float().log_softmax(-1).flatten(0, 1)
                        p = final.exp()
                        entropy = -(p.flatten() @ final.flatten()).item() / len(p)
                    weight = chunk.shape[0] / rows  # so the step's loss is a mean over rows
                    for row in range(L):  # one row at a time: one [tokens, vocab] block in memory
                        x = final_norm(model, self.translate(resid[row], row).flatten(0, 1))
                        lens_logits = F.linear(x.to(W.dtype), W, b)
                        # KL(p || q) = cross-entropy(p, q) - H(p); H(p) has no gradient
                        loss = _SoftCrossEntropy.apply(lens_logits, p) * weight
                        loss.backward()
                        history[step, row] += loss.item() - entropy * weight
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
                advance(1, train_KL=history[step].mean().item())
        self.info = {
            "steps": steps, "tokens_per_step": rows * seq_len, "seq_len": seq_len,
            "optimizer": optimizer, "lr": lr_used, "weight_decay": weight_decay,
            "seed": seed, "bf16": bf16, "final_train_kl": [round(x, 5) for x in history[-1].tolist()],
        }  # fmt: skip
        return history

    # ---- storage -------------------------------------------------------------------
    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write `path/params.safetensors` (the translators) and `path/config.json`
        (shapes, training record and any `extra` such as the model's name)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / PARAMS_FILE), metadata={"format": FORMAT})
        cfg = self.model.cfg
        config = {
            "format": FORMAT, "version": 1, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab, "training": self.info, **extra,
        }  # fmt: skip
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: GPT2) -> TunedLens:
        """A tuned lens saved by `save`, for `model` (its sizes must match)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_file() and path.name in (PARAMS_FILE, CONFIG_FILE):
            path = path.parent
        params, config_file = path / PARAMS_FILE, path / CONFIG_FILE
        if not (params.is_file() and config_file.is_file()):
            raise GPT2LabError(
                f"no tuned lens at {path}: expected {PARAMS_FILE} and {CONFIG_FILE} there "
                "(train one with `gpt2lab lens-train`)"
            )
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GPT2LabError(f"{config_file} is not valid JSON") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise GPT2LabError(f"{config_file} does not describe a gpt2lab tuned lens")
        cfg = model.cfg
        want = {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab}
        got = {k: config.get(k) for k in want}
        if got != want:
            raise GPT2LabError(
                f"tuned lens {path} was trained for a model with {got}, but this model has {want}"
            )
        try:
            state = load_file(str(params))
        except (SafetensorError, OSError) as e:
            raise GPT2LabError(f"{params} is not a readable safetensors file ({e})") from None
        lens = cls(model)
        try:
            lens.load_state_dict(state)
        except RuntimeError:
            raise GPT2LabError(f"{params} does not hold this model's translators") from None
        lens.to(model.device)
        lens.info = config.get("training") or {}
        return lens


def train_tuned_lens(model: GPT2, data: Any, **options: Any) -> TunedLens:
    """A new tuned lens for `model`, trained on `data` (see `TunedLens.fit`)."""
    lens = TunedLens(model)
    lens.fit(data, **options)
    return lens


def _optimizer(params, name: str, lr: float | None, weight_decay: float, steps: int):
    """The reference recipe's optimizers, each with a linear decay to zero; also returns
    the nominal learning rate."""
    momentum = 0.9
    if lr is not None and not lr > 0:
        raise GPT2LabError(f"lr must be positive, got {lr}")
    if name == "sgd":
        # PyTorch's momentum sums gradients (an effective lr of lr / (1 - momentum));
        # scaling by 1 - momentum makes lr=1.0 the natural default, as tuned-lens does.
        lr = 1.0 if lr is None else lr
        opt = torch.optim.SGD(
            params, lr=lr * (1 - momentum), momentum=momentum, nesterov=True,
            weight_decay=weight_decay,
        )  # fmt: skip
        warmup = 0
    elif name == "adamw":
        lr = 1e-3 if lr is None else lr
        opt = torch.optim.AdamW(
            params, lr=lr, betas=(momentum, 0.999),
            weight_decay=weight_decay,
        )  # fmt: skip
        warmup = steps // 5  # Adam does badly without a warm-up here
    else:
        raise GPT2LabError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), lr


class _SoftCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [n, vocab] against target probabilities p [n, vocab].

    `F.cross_entropy` with probability targets does the same in about twice as many
    passes over the [n, vocab] block; those passes, not the matmuls, dominated a
    training step on CPU. The gradient is (softmax(logits) - p) / n.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logq = logits.to(p.dtype).log_softmax(-1)
        ctx.save_for_backward(logq, p)
        ctx.dtype = logits.dtype
        return -(p.flatten() @ logq.flatten()) / len(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logq, p = ctx.saved_tensors
        dlogits = logq.exp_().sub_(p).mul_(grad / len(p))  # logq is not needed again
        return dlogits.to(ctx.dtype), None


def _fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 here (CUDA, or a CPU with bf16 instructions)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def _frozen(model: GPT2) -> Iterator[None]:
    """No gradients for the model's weights (they would cost as much as the lens's own)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
