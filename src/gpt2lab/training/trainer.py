"""The training loop: nanoGPT's, plus exact resume, recipes and multi-process runs.

One step = `grad_accum` micro-batches (per process) -> clip -> AdamW step. Everything
a step depends on is a function of the step number or is saved in the checkpoint
(weights, optimizer moments, RNG states, LN-removal scales), so a run killed at any
moment and resumed with `--resume` ends with bit-identical weights.

What the trainer promises about faults (see `rundir` for the files):

- Checkpoints are written atomically with a sha256 beside them and verified before
  they are loaded; a damaged one is an error naming the file. `fallback=True`
  (`gpt2lab train --resume --fallback`) moves damaged checkpoints aside as
  `*.corrupt` and resumes from the newest good one instead; never without being asked.
- A new run refuses an out_dir that holds another run's files unless
  `overwrite=True` (`--overwrite`, which removes only gpt2lab's files of the old run);
  `--resume` refuses a checkpoint made with other trajectory settings (seed, data,
  batch, sequence length, ...) and names what differs. A changed learning-rate
  schedule (max_steps, warmup_steps, lr, min_lr) is refused too unless
  `new_schedule=True` (`--new-schedule`): a larger max_steps stretches the cosine
  decay of every step still to come, which is what extending a run means but should
  not happen by accident.
- A non-finite loss or gradient norm never reaches the weights. With
  `train.nonfinite = "stop"` (the default) the run stops with an error naming the
  step; with `"skip"` the update is skipped and the run stops after
  `train.nonfinite_limit` non-finite steps in a row. Weights are checked to be
  finite before every save, so no run ends successfully with a NaN model.
- OS errors (a read-only or full out_dir, an out_dir that is a file) are one-line
  `GPT2LabError`s.
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
from ..errors import GPT2LabError, one_line
from ..model import GPT2
from ..progress import format_duration, format_rate
from . import distributed, recipes, rundir
from .config import TrainConfig
from .console import Console
from .data import TokenShards
from .loss import cross_entropy
from .optim import lr_at, make_optimizer

CKPT_DIR = rundir.CKPT_DIR
latest_checkpoint = rundir.latest_checkpoint
_load_state = rundir.load_state


# ---- building the model -------------------------------------------------------------
def build_model(cfg: TrainConfig, device: torch.device) -> GPT2:
    m = cfg.model
    if m.init_from:
        model = load_checkpoint(m.init_from, dtype="float32", device=device)
        if model.cfg.ln_free and cfg.train.recipe == "ln-free":
            raise GPT2LabError("ln-free: the checkpoint has no LayerNorms left to remove")
        return model.train()
    model = GPT2(cfg.model_config()).init_weights(seed=cfg.train.seed)
    return model.to(device).train()


# ---- checkpoints ------------------------------------------------------------------------
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


# ---- the loop ------------------------------------------------------------------------------
class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        fallback: bool = False,
        overwrite: bool = False,
        new_schedule: bool = False,
        console: Console | None = None,
    ):
        started = time.perf_counter()
        if fallback and not resume:
            raise GPT2LabError("--fallback only applies with --resume")
        if new_schedule and not resume:
            raise GPT2LabError("--new-schedule only applies with --resume")
        if overwrite and resume:
            raise GPT2LabError(
                "--overwrite starts a new run over the old one and --resume continues it: give one"
            )
        self.cfg = cfg
        t = cfg.train
        self.ctx = distributed.setup(t.device)
        self.console = console or Console(enabled=self.ctx.is_main, progress=cfg.log.progress)
        self.out = Path(t.out_dir)
        self.notes: list[tuple[int, str]] = []  # written to log.jsonl once it is open
        old_run = self._check_out_dir(resume, overwrite) if self.ctx.is_main else []
        torch.manual_seed(t.seed + self.ctx.rank)
        if t.dtype == "float16" and self.ctx.device.type != "cuda":
            raise GPT2LabError("train.dtype float16 needs a CUDA device; use bfloat16 on the CPU")

        self.console.phase(_building(cfg, self.ctx.device))
        self.model = build_model(cfg, self.ctx.device)
        # What the run starts from, by content (before anything touches the weights).
        init = rundir.weights_digest(self.model) if cfg.model.init_from else None
        content = {
            "data.manifest_sha256": rundir.manifest_digest(cfg.data.dir),
            "model.init_weights_sha256": init,
        }
        self.train_data = TokenShards(cfg.data.dir, "train", self.model.cfg.d_vocab)
        val = TokenShards(cfg.data.dir, "val", self.model.cfg.d_vocab)
        self.val_data = val if val.n_tokens > t.seq_len + 1 else None
        n_params = sum(p.numel() for p in self.model.parameters())
        self.console.phase(
            f"{n_params / 1e6:.2f}M parameters on {self.ctx.device} ({t.dtype}); {cfg.data.dir}: "
            f"train {self.train_data.n_tokens:,} tokens, val {val.n_tokens:,} tokens"
        )
        if self.val_data is None and cfg.eval.every:
            self.console.warn(
                f"the val split of {cfg.data.dir} has {val.n_tokens:,} tokens, fewer than one "
                f"window of {t.seq_len + 1}: this run evaluates nothing and saves no best/ "
                "(prepare the data again with a --val-fraction > 0; fewer than 20 documents "
                "are then split by tokens)"
            )
        if t.seq_len > self.model.cfg.n_ctx:
            raise GPT2LabError(
                f"train.seq_len {t.seq_len} exceeds the model's context {self.model.cfg.n_ctx}"
            )
        _check_fits_in_memory(self.model, cfg, self.ctx.device)
        self.trainable = recipes.select_parameters(self.model, cfg)
        self.identity = rundir.run_identity(cfg.to_dict(), self.ctx.world, content)

        self.sigmas: dict[str, float] = {}
        self.schedule: dict[str, int] = {}
        if t.recipe == "ln-free":
            self.schedule = recipes.ln_schedule(self.model, cfg)

        self.optimizer = make_optimizer(self.model, cfg, self.ctx.device)
        self.step = 0
        self.best_val = math.inf
        self.best_step: int | None = None
        self.nonfinite_streak = 0  # non-finite steps in a row (train.nonfinite = "skip")
        self.report: dict = {}
        # Time spent by this process (from here) and by the sessions before a resume
        # (from the checkpoint's report), for report.json.
        self.started = started
        self.train_seconds = 0.0  # in training steps only, this session
        self.time_before = {"wall_time_s": 0.0, "train_time_s": 0.0}
        if resume:
            self._resume(fallback, new_schedule)
        elif t.recipe == "ln-free":
            calib = [
                self.train_data.batch(t.batch_size, t.seq_len, t.seed + 1, i)[0]
                for i in range(t.ln_free_calib_batches)
            ]
            self.sigmas = recipes.measure_ln_scales(
                self.model, [x.to(self.ctx.device) for x in calib]
            )
        if old_run:  # --overwrite, now that the new run's set-up has succeeded
            rundir.remove_run_files(self.out)
            self.notes.append((0, f"--overwrite: removed {len(old_run)} files of the previous run"))

        self.net = self.model
        if t.compile:
            self.net = torch.compile(self.model)
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # No device_ids: DDP would then move the inputs to the GPU itself, and the
            # model's check of the token ids would run there (a device sync); see `loss`.
            self.net = DDP(self.net)
        self.autocast = (
            torch.autocast(self.ctx.device.type, dtype=getattr(torch, t.dtype))
            if t.dtype != "float32"
            else nullcontext()
        )
        self.scaler = torch.amp.GradScaler("cuda") if t.dtype == "float16" else None

    # -- the out_dir -------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool, overwrite: bool) -> list[Path]:
        """Refuse an out_dir that holds another run (unless --overwrite or --resume), make
        sure it is writable, and clear what killed writes left. Returns the old run's
        files that --overwrite will remove once the new run's set-up has succeeded."""
        old_run = [] if resume else rundir.previous_run_files(self.out)
        if old_run and not overwrite:
            shown = ", ".join(str(p.relative_to(self.out)) for p in old_run[:3])
            more = f" and {len(old_run) - 3} more" if len(old_run) > 3 else ""
            raise GPT2LabError(
                f"train.out_dir {self.out} already holds a run ({shown}{more}); "
                "continue it with --resume, replace it with --overwrite, or choose another train.out_dir"
            )
        rundir.prepare_out_dir(self.out)
        stale = rundir.remove_stale_files(self.out)
        if stale:
            self.notes.append((0, f"removed {len(stale)} stale temporary files from killed writes"))
        return old_run

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "rng": _rng_state(),
            "model_config": self.model.cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "identity": self.identity,
            "nonfinite_streak": self.nonfinite_streak,
            "ln_sigmas": self.sigmas,
            "report": {**self.report, **self._times()},
        }

    def _times(self) -> dict:
        """Seconds spent so far, over every session of the run up to this step."""
        return {
            "wall_time_s": self.time_before["wall_time_s"] + time.perf_counter() - self.started,
            "train_time_s": self.time_before["train_time_s"] + self.train_seconds,
        }

    def _resume(self, fallback: bool, new_schedule: bool) -> None:
        """Continue from the newest usable checkpoint. A damaged one is an error, or with
        `fallback` is moved aside and the previous one tried; a checkpoint of another
        run (other shape or trajectory settings) is always an error, and one with another
        learning-rate schedule is one unless `new_schedule`."""
        candidates = rundir.checkpoints(self.out)[::-1]
        if not candidates:
            raise GPT2LabError(f"--resume: no checkpoint in {self.out / CKPT_DIR}")
        notes: list[str] = []  # logged at the step resumed from, once it is known
        for path in candidates:
            try:
                state = rundir.load_state(path)
                self._check_same_run(state, path)
                changed = self._check_schedule(state, path, new_schedule)
                self._restore(state, path)
            except rundir.CheckpointError as e:
                if not fallback:
                    raise GPT2LabError(
                        f"{e}; resume with --fallback to continue from the previous good checkpoint"
                    ) from None
                notes += self._set_aside(path, e)
                continue
            if self.ctx.is_main:
                # Notes of this resume belong to the step it continues from, so a later
                # resume from the same checkpoint keeps them (see rundir.truncate_log).
                dropped = rundir.truncate_log(self.out, self.step)
                if dropped:
                    notes.append(f"resumed: dropped {dropped} log records after step {self.step}")  # fmt: skip
                resumed = f"resumed from {path} (step {self.step} of {self.cfg.train.max_steps})"
                notes.append(resumed)
                self.console.say(resumed)
                if changed:
                    message = f"--new-schedule: continuing with {'; '.join(changed)}"
                    notes.append(message)
                    self.console.say(message)
                self.notes += [(self.step, message) for message in notes]
            return
        raise GPT2LabError(
            f"--resume --fallback: no usable checkpoint left in {self.out / CKPT_DIR} "
            "(the damaged ones were moved aside as *.corrupt)"
        )

    def _set_aside(self, path: Path, error: Exception) -> list[str]:
        """--fallback: keep a damaged checkpoint for inspection, out of the way of resume.
        Returns the note for the log ([] on the processes that only skip it)."""
        if not self.ctx.is_main:
            return []  # the main process moves it; the others just skip it
        moved = rundir.quarantine(path)
        message = f"{error}; moved it to {moved.name} and trying the previous checkpoint"
        self.console.warn(message)
        return [message]

    def _check_same_run(self, state: dict, path: Path) -> None:
        if state["model_config"] != self.model.cfg.to_dict():
            mine = self.model.cfg.to_dict()
            theirs = {k: v for k, v in state["model_config"].items() if mine.get(k) != v}
            raise GPT2LabError(f"--resume: {path} was trained with another model shape ({theirs})")
        saved = state.get("identity")
        if not isinstance(saved, dict):
            # Written before checkpoints recorded their identity: derived from the saved
            # settings, without the data's and weights' digests (those are not compared).
            saved = rundir.run_identity(state["train_config"], self.ctx.world)
        differences = rundir.identity_differences(saved, self.identity)
        if differences:
            raise GPT2LabError(
                f"--resume: {path} belongs to a run with other settings ({'; '.join(differences)}); "
                "resume with the same settings (only device, nonfinite and the "
                "eval/log/checkpoint cadence may change; the learning-rate schedule with "
                "--new-schedule) or start a new run in another train.out_dir"
            )

    def _check_schedule(self, state: dict, path: Path, new_schedule: bool) -> list[str]:
        """The learning-rate schedule's changes against the checkpoint ('key a -> b'): an
        error unless `new_schedule`, which continues with the new schedule."""
        changed = rundir.schedule_changes(
            rundir.schedule(state["train_config"]), rundir.schedule(self.cfg.to_dict())
        )
        if changed and not new_schedule:
            raise GPT2LabError(
                f"--resume: the configuration changes the learning-rate schedule of {path} "
                f"(step {state['step']}): {'; '.join(changed)}, which changes the learning rate "
                "of every step still to come; add --new-schedule to continue with the new "
                "schedule, or resume with the checkpoint's settings"
            )
        return changed

    def _restore(self, state: dict, path: Path) -> None:
        """Load a verified checkpoint into the model, optimizer and RNGs."""
        parts = [
            ("the weights", lambda: self.model.load_state_dict(state["model"])),
            ("the optimizer state", lambda: self.optimizer.load_state_dict(state["optimizer"])),
            ("the random-number states", lambda: _set_rng_state(state["rng"])),
        ]
        for what, load in parts:
            try:
                load()
            except Exception as e:
                raise rundir.CheckpointError(
                    f"checkpoint {path}: {what} cannot be restored ({one_line(e, 300)})"
                ) from None
        self.step, self.best_val = state["step"], float(state["best_val"])
        self.best_step = state.get("best_step")
        self.sigmas, self.report = state["ln_sigmas"], dict(state.get("report", {}))
        for key in self.time_before:  # kept apart: this session's time is added on saving
            value = self.report.pop(key, 0.0)
            self.time_before[key] = value if isinstance(value, float) else 0.0
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        if self.schedule and self.step > 0:
            # LN-removal sites switched before this step: their notes are in the log
            # already (kept by truncate_log), so they are re-applied here without one.
            recipes.apply_ln_schedule(self.model, self.sigmas, self.schedule, self.step - 1)

    def save_checkpoint(self) -> None:
        self._check_weights_finite()
        ckpt_dir = self.out / CKPT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        rundir.save_checkpoint(self._state(), ckpt_dir / f"step_{self.step:07d}.pt")
        rundir.prune(self.out, self.cfg.checkpoint.keep)

    def _check_weights_finite(self) -> None:
        """No NaN/inf weights are ever saved (a finite but huge update can overflow them).

        One reduction over all parameters and one device sync, not one per parameter:
        each parameter's largest |value| (the inf-norm is finite exactly when every
        element is, and unlike the 2-norm it cannot overflow on finite weights). Which
        parameter is bad is looked up only when one is."""
        named = [(name, p.detach()) for name, p in self.model.named_parameters() if p.numel()]
        peaks = torch._foreach_norm([p for _, p in named], math.inf)
        if torch.isfinite(torch.stack([peak.float() for peak in peaks])).all():
            return
        bad = next(
            name for (name, _), peak in zip(named, peaks, strict=True) if not torch.isfinite(peak)
        )
        raise GPT2LabError(
            f"step {self.step}: the weights are no longer finite ({bad}); stopped "
            "without saving them. Lower train.lr and start again (--overwrite)"
        )

    # -- measuring --------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, net=None) -> torch.Tensor:
        """Mean next-token loss of a batch drawn on the host.

        The inputs stay on the host: the model checks their ids there and moves them
        itself, where a check on the device would cost a device sync. The targets are
        sent without waiting for the copy (non_blocking), for the same reason."""
        with self.autocast:
            logits = (net or self.net)(x)
        return cross_entropy(logits, y.to(self.ctx.device, non_blocking=True))

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

    # -- one step ------------------------------------------------------------------------------
    def _forward_backward(self) -> list[torch.Tensor]:
        """Accumulate the gradients of this step's micro-batches; return their losses
        (each divided by grad_accum), left on the device: `_read_step` reads them."""
        t, ctx = self.cfg.train, self.ctx
        losses = []
        for micro in range(t.grad_accum):
            index = (self.step * ctx.world + ctx.rank) * t.grad_accum + micro
            x, y = self.train_data.batch(t.batch_size, t.seq_len, t.seed, index)
            sync = micro == t.grad_accum - 1 or not ctx.enabled
            with nullcontext() if sync else self.net.no_sync():
                loss = self.loss(x, y) / t.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            losses.append(loss.detach())
        return losses

    def _grad_norm(self) -> torch.Tensor | None:
        """The gradients' global norm (a device tensor, not read here), clipped to
        train.grad_clip when that is > 0.

        None under a float16 GradScaler: there inf gradients are expected now and then,
        and the scaler itself skips those steps."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            return None if self.scaler else norm
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if self.scaler or not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _read_step(
        self, losses: list[torch.Tensor], norm: torch.Tensor | None
    ) -> tuple[float, float | None, bool]:
        """The step's loss, its gradient norm, and whether it may update the weights
        (every process agrees).

        The loss and the norm are read from the device together: one sync per step (a
        GPU runs ahead of the Python loop until then), and under DDP one all_reduce of a
        single "not finite here" flag, travelling in the same read. The loss is summed
        on the host in float64, as the losses are logged."""
        read_back = losses if norm is None else [*losses, norm]
        values = torch.stack([v.float() for v in read_back])
        if self.ctx.enabled:
            import torch.distributed as dist

            flag = (~torch.isfinite(values)).any().float().reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            values = torch.cat([values, flag])
        read = values.tolist()
        loss = sum(read[: len(losses)])
        grad_norm = None if norm is None else read[len(losses)]
        if self.ctx.enabled:
            return loss, grad_norm, read[-1] == 0.0
        return loss, grad_norm, math.isfinite(loss) and (norm is None or math.isfinite(grad_norm))

    def _update(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _nonfinite(self, loss: float, norm: float | None, log: _Log) -> None:
        """A step whose loss or gradient is NaN/inf: stop (the default), or skip its
        update and stop only after train.nonfinite_limit of them in a row."""
        t = self.cfg.train
        step = self.step + 1
        what = f"loss {loss}" + ("" if norm is None else f", gradient norm {norm}")
        if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
            what += " here, not finite on another process"
        self.nonfinite_streak += 1
        if self.scaler:
            self.scaler.update()  # the scaler's unscale_ must be closed by an update
        if t.nonfinite == "skip" and self.nonfinite_streak < t.nonfinite_limit:
            log.note(
                step, f"non-finite step ({what}): update skipped ({self.nonfinite_streak} in a row)"
            )
            return
        latest = latest_checkpoint(self.out)
        since = f"; the last checkpoint is {latest}" if latest else ""
        if t.nonfinite == "skip":
            message = (
                f"step {step}: {self.nonfinite_streak} non-finite steps in a row ({what}; "
                f"train.nonfinite_limit = {t.nonfinite_limit}); stopped{since}"
            )
        else:
            message = (
                f"step {step}: the training loss or gradient is not finite ({what}); stopped "
                f"before the update{since}. Check the data, lower train.lr and start again "
                "(--overwrite), or --resume with train.nonfinite = 'skip'"
            )
        log.note(step, message)
        raise GPT2LabError(message)

    # -- the loop ------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum * self.ctx.world

    def train(self) -> Path:
        ctx = self.ctx
        log = _Log(self.out, self.cfg, enabled=ctx.is_main, start=self.step)
        try:
            for step, message in self.notes:
                log.note(step, message)
            if self.step == 0 and ctx.is_main and self.val_data is not None:
                e, t = self.cfg.eval, self.cfg.train
                self.console.phase(
                    f"first evaluation ({e.iters} batches of {t.batch_size} x {t.seq_len} tokens)"
                )
                self.report["val_loss_start"] = self.evaluate()
                self.console.phase(f"val loss at step 0: {self.report['val_loss_start']:.4f}")
            self._loop(log)
            return self._finish(log)
        finally:
            self.console.close()
            log.close()
            distributed.teardown(ctx)

    def _loop(self, log: _Log) -> None:
        t, ctx = self.cfg.train, self.ctx
        if self.step < t.max_steps:
            self.report.pop("val_loss_final", None)  # of a shorter schedule (--new-schedule)
            self.console.phase("measuring the device's matmul speed (the reference of MFU)")
        peak = _peak_flops(ctx.device, t.dtype)
        tokens_per_step = self.tokens_per_step
        self.console.start(self.step, t.max_steps)
        while self.step < t.max_steps:
            started = time.perf_counter()
            if self.schedule:
                for site in recipes.apply_ln_schedule(
                    self.model, self.sigmas, self.schedule, self.step
                ):
                    log.note(  # at the step it belongs to: the first one computed with it
                        self.step + 1,
                        f"ln-free: {site} now divides by its fixed scale {self.sigmas[site]:.4f}",
                    )
            lr = lr_at(self.step, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            losses = self._forward_backward()
            loss, norm, finite = self._read_step(losses, self._grad_norm())
            if finite:
                self._update()
                self.nonfinite_streak = 0
            else:
                self._nonfinite(loss, norm, log)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

            elapsed = time.perf_counter() - started
            self.train_seconds += elapsed
            tok_s = tokens_per_step / elapsed
            record = {"step": self.step, "loss": loss if finite else None, "lr": lr, "tokens_per_s": tok_s,
                      "mfu": tok_s * self.flops_per_token() / (peak * ctx.world)}  # fmt: skip
            if not finite:
                record["skipped"] = True
            self._after_step(record, log)
        self.console.close()  # the bar ends here, above the summary line

    def _after_step(self, record: dict, log: _Log) -> None:
        """Evaluate, log and checkpoint on their cadences."""
        t, ctx = self.cfg.train, self.ctx
        last = self.step == t.max_steps
        if ctx.is_main and self.cfg.eval.every and (self.step % self.cfg.eval.every == 0 or last):
            record["val_loss"] = val = self.evaluate()
            if val is not None and val < self.best_val:
                self._check_weights_finite()
                self.best_val, self.best_step = val, self.step
                save_model(self.model, self.out / "best")
            if last:
                self.report["val_loss_final"] = val
        if self.step % self.cfg.log.every == 0 or last or "val_loss" in record:
            log.write(record)
        self.console.step(record)
        if ctx.is_main and (self.step % self.cfg.checkpoint.every == 0 or last):
            self.save_checkpoint()

    def _finish(self, log: _Log) -> Path:
        final = self.out / "final"
        if self.ctx.is_main:
            if self.cfg.train.recipe == "ln-free":
                recipes.fold_ln_scales(self.model)
                self.report["val_loss_end"] = self.evaluate()
                log.note(
                    self.step,
                    f"ln-free: held-out loss {self.report.get('val_loss_start')} -> {self.report['val_loss_end']}",
                )
            self._check_weights_finite()
            save_model(self.model, final)
            report = self._final_report(final)
            (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            self.console.say(_summary(report))
        return final

    def _final_report(self, final: Path) -> dict:
        """report.json: the held-out losses (start, final, best and its step), how much
        was trained (steps, tokens), how long it took over every session of the run, and
        where the models are. A loss is null when the run has no val split."""
        t = self.cfg.train
        times = self._times()
        tokens = self.step * self.tokens_per_step
        speed = tokens / times["train_time_s"] if times["train_time_s"] else None
        best = self.out / "best" if math.isfinite(self.best_val) else None
        return {
            "val_loss_start": self.report.get("val_loss_start"),
            "val_loss_final": self.report.get("val_loss_final"),
            "val_loss_best": self.best_val if best else None,
            "best_step": self.best_step if best else None,
            **{k: v for k, v in self.report.items() if k == "val_loss_end"},  # ln-free
            "steps": self.step,
            "tokens_seen": tokens,
            "wall_time_s": round(times["wall_time_s"], 3),
            "train_time_s": round(times["train_time_s"], 3),
            "tokens_per_s": None if speed is None else round(speed, 1),
            "device": str(self.ctx.device),
            "dtype": t.dtype,
            "processes": self.ctx.world,
            "final": str(final),
            "best": str(best) if best else None,
        }


def _memory_bytes(device: torch.device) -> int | None:
    """The device's total memory (physical RAM for the CPU), or None when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def _check_fits_in_memory(model: GPT2, cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a batch that cannot fit before allocating it (the kernel's OOM killer gives
    no message). A lower bound only: fp32 weights, gradients and two AdamW moments
    (16 bytes a parameter) plus one micro-batch's float32 logits."""
    total = _memory_bytes(device)
    if total is None:
        return
    t = cfg.train
    params = sum(p.numel() for p in model.parameters())
    logits = t.batch_size * t.seq_len * model.cfg.d_vocab * 4
    need = 16 * params + logits
    if need > total:
        raise GPT2LabError(
            f"train.batch_size {t.batch_size} x seq_len {t.seq_len} needs at least "
            f"{need / 2**30:.1f} GiB ({logits / 2**30:.1f} GiB of logits per micro-batch), "
            f"more than the {total / 2**30:.1f} GiB of {device}; lower train.batch_size and "
            "raise train.grad_accum"
        )


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
    """JSONL log (appended across resumes) and optional TensorBoard; what is shown on
    the terminal while the run goes is `Console`'s."""

    def __init__(self, out: Path, cfg: TrainConfig, *, enabled: bool, start: int):
        self.enabled = enabled
        self.tb = None
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

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def note(self, step: int, message: str) -> None:
        if self.enabled:
            self.file.write(json.dumps({"step": step, "note": message}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            if self.tb:
                self.tb.close()
            self.file.close()


def _building(cfg: TrainConfig, device: torch.device) -> str:
    """The line announcing the model's construction (loading a big one takes a while)."""
    m = cfg.model
    if m.init_from:
        return f"loading {m.init_from} to fine-tune, on {device}"
    c = cfg.model_config()
    shape = f"{c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, context {c.n_ctx}"
    name = f"{m.preset}: " if m.preset else ""
    return f"building the model ({name}{shape}) on {device}"


def _summary(report: dict) -> str:
    """The run's last line: how much, how fast, how good, and where the models are."""
    tokens = report["tokens_seen"]
    speed = f", {format_rate(report['tokens_per_s'])} tok/s" if report["tokens_per_s"] else ""
    line = (
        f"done: {report['steps']} steps, {tokens:,} tokens in "
        f"{format_duration(report['wall_time_s'])}{speed}"
    )
    if report["val_loss_final"] is not None:
        line += f"; val loss {report['val_loss_final']:.4f}"
    if report["val_loss_best"] is not None:
        line += f" (best {report['val_loss_best']:.4f} at step {report['best_step']})"
    line += f"; final model in {report['final']}"
    if report["best"]:
        line += f", best in {report['best']}"
    return line


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    fallback: bool = False,
    overwrite: bool = False,
    new_schedule: bool = False,
    console: Console | None = None,
) -> Path:
    """Run (or resume) a training run; returns the directory of the final model (HF layout).

    resume: continue from the newest checkpoint in train.out_dir (it must belong to a
        run with the same trajectory settings).
    fallback: with resume, move damaged checkpoints aside (`*.corrupt`) and continue
        from the newest good one, instead of stopping with an error.
    overwrite: start a new run in an out_dir that holds another run, removing that
        run's checkpoints, log, report and final/best models (nothing else).
    new_schedule: with resume, accept a learning-rate schedule (max_steps,
        warmup_steps, lr, min_lr) other than the checkpoint's, and continue with it.
    console: where progress goes (default: stdout, a bar on a terminal, plain lines
        otherwise; see `console.Console`)."""
    try:
        trainer = Trainer(
            cfg, resume=resume, fallback=fallback, overwrite=overwrite,
            new_schedule=new_schedule, console=console,
        )  # fmt: skip
        return trainer.train()
    except OSError as e:  # a full or read-only disk mid-run, a vanished file, ...
        raise GPT2LabError(rundir.os_error_message(e)) from None
