"""The training loop: nanoGPT's, plus exact resume, recipes and multi-process runs.

One step = `grad_accum` micro-batches (per process) -> clip -> AdamW step. Everything
a step depends on is a function of the step number or is saved in the checkpoint
(weights, optimizer moments, RNG states, LN-removal scales), so a run killed at any
moment and resumed with `--resume` ends with bit-identical weights. Checkpoints are
written to a temporary file and renamed, so a kill during a write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load as load_checkpoint
from ..checkpoint import save as save_model
from ..config import GPT2Config
from ..errors import GPT2LabError
from ..model import GPT2
from . import distributed, recipes
from .config import TrainConfig
from .data import TokenShards
from .loss import cross_entropy
from .optim import lr_at, make_optimizer

CKPT_DIR = "checkpoints"


# ---- building the model -------------------------------------------------------------
def build_model(cfg: TrainConfig, device: torch.device) -> GPT2:
    m = cfg.model
    if m.init_from:
        model = load_checkpoint(m.init_from, dtype="float32", device=device)
        if model.cfg.ln_free and cfg.train.recipe == "ln-free":
            raise GPT2LabError("ln-free: the checkpoint has no LayerNorms left to remove")
        return model.train()
    base = GPT2Config.preset(m.preset) if m.preset else GPT2Config()
    dims = {k: getattr(m, k) for k in ("n_layers", "d_model", "n_heads", "n_ctx") if getattr(m, k)}
    model_cfg = base.with_(**dims, d_mlp=4 * dims.get("d_model", base.d_model))
    model = GPT2(model_cfg).init_weights(seed=cfg.train.seed)
    return model.to(device).train()


# ---- checkpoints ------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / CKPT_DIR).glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def _rng_state() -> dict:
    """RNG states as tensors and plain tuples, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPT2LabError(
            f"checkpoint {path} cannot be read ({str(e).strip().splitlines()[0]})"
        ) from None


# ---- the loop ------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        t = cfg.train
        self.ctx = distributed.setup(t.device)
        self.out = Path(t.out_dir)
        torch.manual_seed(t.seed + self.ctx.rank)
        if t.dtype == "float16" and self.ctx.device.type != "cuda":
            raise GPT2LabError("train.dtype float16 needs a CUDA device; use bfloat16 on the CPU")

        self.model = build_model(cfg, self.ctx.device)
        self.train_data = TokenShards(cfg.data.dir, "train", self.model.cfg.d_vocab)
        val = TokenShards(cfg.data.dir, "val", self.model.cfg.d_vocab)
        self.val_data = val if val.n_tokens > t.seq_len + 1 else None
        if t.seq_len > self.model.cfg.n_ctx:
            raise GPT2LabError(
                f"train.seq_len {t.seq_len} exceeds the model's context {self.model.cfg.n_ctx}"
            )
        self.trainable = recipes.select_parameters(self.model, cfg)

        self.sigmas: dict[str, float] = {}
        self.schedule: dict[str, int] = {}
        if t.recipe == "ln-free":
            self.schedule = recipes.ln_schedule(self.model, cfg)

        self.optimizer = make_optimizer(self.model, cfg, self.ctx.device)
        self.step = 0
        self.best_val = math.inf
        self.report: dict = {}
        if resume:
            self._resume()
        elif t.recipe == "ln-free":
            calib = [
                self.train_data.batch(t.batch_size, t.seq_len, t.seed + 1, i)[0]
                for i in range(t.ln_free_calib_batches)
            ]
            self.sigmas = recipes.measure_ln_scales(
                self.model, [x.to(self.ctx.device) for x in calib]
            )

        self.net = self.model
        if t.compile:
            self.net = torch.compile(self.model)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(
                self.net,
                device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
            )
        self.autocast = (
            torch.autocast(self.ctx.device.type, dtype=getattr(torch, t.dtype))
            if t.dtype != "float32"
            else nullcontext()
        )
        self.scaler = torch.amp.GradScaler("cuda") if t.dtype == "float16" else None

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "rng": _rng_state(),
            "model_config": self.model.cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "ln_sigmas": self.sigmas,
            "report": self.report,
        }

    def _resume(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            raise GPT2LabError(f"--resume: no checkpoint in {self.out / CKPT_DIR}")
        state = _load_state(path)
        if state["model_config"] != self.model.cfg.to_dict():
            theirs = {
                k: v
                for k, v in state["model_config"].items()
                if self.model.cfg.to_dict().get(k) != v
            }
            raise GPT2LabError(f"--resume: {path} was trained with another model shape ({theirs})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best_val = state["step"], state["best_val"]
        self.sigmas, self.report = state["ln_sigmas"], state.get("report", {})
        _set_rng_state(state["rng"])  # (LN-removal sites are re-applied by the loop from the step)

    def save_checkpoint(self) -> None:
        ckpt_dir = self.out / CKPT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(self._state(), ckpt_dir / f"step_{self.step:07d}.pt")
        for old in sorted(ckpt_dir.glob("step_*.pt"))[: -self.cfg.checkpoint.keep]:
            old.unlink()

    # -- measuring --------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, net=None) -> torch.Tensor:
        with self.autocast:
            logits = (net or self.net)(x.to(self.ctx.device))
        return cross_entropy(logits, y.to(self.ctx.device))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None:
            return None
        t = self.cfg.train
        self.model.eval()
        losses = [
            self.loss(
                *self.val_data.batch(t.batch_size, t.seq_len, t.seed + 2, i), net=self.model
            ).item()
            for i in range(self.cfg.eval.iters)
        ]
        self.model.train()
        return sum(losses) / len(losses)

    def flops_per_token(self) -> float:
        """6N for the weights (forward + backward) plus the attention scores, as in nanoGPT's MFU."""
        c = self.model.cfg
        n = sum(p.numel() for p in self.model.parameters()) - c.n_ctx * c.d_model
        return 6 * n + 12 * c.n_layers * c.d_model * self.cfg.train.seq_len

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> Path:
        t, ctx = self.cfg.train, self.ctx
        log = _Log(self.out, self.cfg, enabled=ctx.is_main, start=self.step)
        if self.step == 0 and ctx.is_main:
            self.report["val_loss_start"] = self.evaluate()
        peak = _peak_flops(ctx.device, t.dtype)
        tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * ctx.world
        while self.step < t.max_steps:
            started = time.perf_counter()
            if self.schedule:
                for site in recipes.apply_ln_schedule(
                    self.model, self.sigmas, self.schedule, self.step
                ):
                    log.note(
                        self.step,
                        f"ln-free: {site} now divides by its fixed scale {self.sigmas[site]:.4f}",
                    )
            lr = lr_at(self.step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(t.grad_accum):
                index = (self.step * ctx.world + ctx.rank) * t.grad_accum + micro
                x, y = self.train_data.batch(t.batch_size, t.seq_len, t.seed, index)
                sync = micro == t.grad_accum - 1 or not ctx.enabled
                with nullcontext() if sync else self.net.no_sync():
                    loss = self.loss(x, y) / t.grad_accum
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += loss.item()
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], t.grad_clip
                )
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

            elapsed = time.perf_counter() - started
            tok_s = tokens_per_step / elapsed
            record = {"step": self.step, "loss": total, "lr": lr, "tokens_per_s": tok_s,
                      "mfu": tok_s * self.flops_per_token() / (peak * ctx.world)}  # fmt: skip
            if (
                ctx.is_main
                and self.cfg.eval.every
                and (self.step % self.cfg.eval.every == 0 or self.step == t.max_steps)
            ):
                record["val_loss"] = val = self.evaluate()
                if val is not None and val < self.best_val:
                    self.best_val = val
                    save_model(self.model, self.out / "best")
            if (
                self.step % self.cfg.log.every == 0
                or self.step == t.max_steps
                or "val_loss" in record
            ):
                log.write(record)
            if ctx.is_main and (
                self.step % self.cfg.checkpoint.every == 0 or self.step == t.max_steps
            ):
                self.save_checkpoint()

        final = self.out / "final"
        if ctx.is_main:
            if t.recipe == "ln-free":
                recipes.fold_ln_scales(self.model)
                self.report["val_loss_end"] = self.evaluate()
                log.note(
                    self.step,
                    f"ln-free: held-out loss {self.report['val_loss_start']} -> {self.report['val_loss_end']}",
                )
            save_model(self.model, final)
            (self.out / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        log.close()
        distributed.teardown(ctx)
        return final


def _peak_flops(device: torch.device, dtype: str) -> float:
    """The device's measured matmul speed: the denominator of MFU.

    CPUs have no single datasheet peak (it depends on the vector units, clocks and the
    dtype's kernel), so MFU here is relative to a large square matmul, best of 5, at
    start: a busy machine at that moment inflates every MFU of the run."""
    dt = (
        torch.bfloat16
        if dtype == "bfloat16"
        else torch.float16
        if dtype == "float16"
        else torch.float32
    )
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dt)
    a @ a  # the first call also builds the kernel (oneDNN primitives for bf16 on a CPU)
    best = math.inf
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class _Log:
    """JSONL log (appended across resumes), optional TensorBoard, and a progress bar."""

    def __init__(self, out: Path, cfg: TrainConfig, *, enabled: bool, start: int):
        self.enabled = enabled
        self.bar = self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "a")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.note(start, "tensorboard is not installed; logging to log.jsonl only")
        if cfg.log.progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.description}"))  # fmt: skip
            self.task = self.bar.add_task("", total=cfg.train.max_steps, completed=start)
            self.bar.start()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar:
            desc = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
            if record.get("val_loss") is not None:
                desc += f"  val {record['val_loss']:.4f}"
            self.bar.update(self.task, completed=record["step"], description=desc)

    def note(self, step: int, message: str) -> None:
        if self.enabled:
            self.file.write(json.dumps({"step": step, "note": message}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            if self.bar:
                self.bar.stop()
            if self.tb:
                self.tb.close()
            self.file.close()


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the directory of the final model (HF layout)."""
    return Trainer(cfg, resume=resume).train()
