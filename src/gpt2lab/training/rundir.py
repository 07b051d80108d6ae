"""The files of a training run in `train.out_dir`, and the promises made about them.

    out_dir/checkpoints/step_0000500.pt          full training state (torch zip file)
    out_dir/checkpoints/step_0000500.pt.sha256   its sha256, in `sha256sum -c` format
    out_dir/log.jsonl, report.json, best/, final/, tensorboard/

- A checkpoint is written to `*.tmp`, fsynced, hashed, and renamed: a kill leaves the
  previous checkpoints intact, a failed write (full disk) removes its temporary file,
  and stale `*.tmp` files of killed runs are removed when the next run starts.
- A checkpoint is verified before it is unpickled: the sha256 recorded at write time
  (torch.load does not check the zip CRCs, so a flipped block in the middle would
  otherwise load as garbage weights), or, for a checkpoint without a `.sha256` file,
  every zip entry's CRC. A damaged, truncated or empty file, or one missing keys,
  is a `CheckpointError` naming the file; the trainer falls back to the previous
  checkpoint only when asked to (`--fallback`), moving the damaged one aside.
- An out_dir belongs to one run. A new run refuses an out_dir holding another run's
  files unless told to `--overwrite` them (only the files listed above are removed),
  and `--resume` refuses a checkpoint whose trajectory settings differ from the
  configuration given (`run_identity`), saying what differs. The learning-rate
  schedule (`schedule`) is compared apart: the trainer accepts a change of it when
  told to (`--new-schedule`), never any other difference.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import GPT2LabError, first_line

CKPT_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# Everything of an old run that `--overwrite` removes (besides checkpoints/).
RUN_FILES = ("log.jsonl", "report.json")
RUN_DIRS = ("final", "best", "tensorboard")


class CheckpointError(GPT2LabError):
    """A step checkpoint that cannot be used: empty, truncated, corrupt or incomplete."""


def os_error_message(e: OSError) -> str:
    """'path: reason' for an OSError, the way `ls` or `cp` would say it."""
    reason = e.strerror or first_line(e)
    return f"{e.filename}: {reason}" if e.filename else reason


# ---- listing ---------------------------------------------------------------------------
def step_of(path: Path) -> int | None:
    match = _STEP_FILE.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's step checkpoints, oldest first, ordered by step number (not by name:
    step_10000000.pt sorts before step_9999999.pt as a string)."""
    ckpt_dir = Path(out_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if step_of(p) is not None and p.is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ---- writing -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically with its sha256 beside it.

    Order: data to path.tmp (fsynced), hash, sidecar, rename. A kill at any point
    leaves either no new checkpoint or a complete one whose recorded hash matches;
    a replaced checkpoint whose rename never happened fails its (new) hash and is
    therefore never mistaken for a good one. The temporary file is removed when the
    write fails (a full disk must not stay full)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        _write_bytes_atomic(_sidecar(path), f"{digest}  {path.name}\n".encode())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        reason = os_error_message(e) if isinstance(e, OSError) else first_line(e)
        raise GPT2LabError(f"cannot write checkpoint {path} ({reason})") from None
    except BaseException:  # a KeyboardInterrupt: clean up, then let it through
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def prune(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (by step number); return them."""
    if keep < 1:
        raise GPT2LabError(f"checkpoint.keep must be at least 1, got {keep}")
    old = checkpoints(out_dir)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
    return old


def remove_stale_files(out_dir: Path) -> list[Path]:
    """Remove what killed or failed writes left behind: `*.tmp` files, and `.sha256`
    files whose checkpoint is gone. Returns what was removed."""
    ckpt_dir = Path(out_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp") and p.is_file()]
    stale += [
        p
        for p in ckpt_dir.glob("step_*.pt.sha256")
        if not p.with_name(p.name.removesuffix(".sha256")).exists()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    if (Path(out_dir) / "log.jsonl.tmp").is_file():
        (Path(out_dir) / "log.jsonl.tmp").unlink()
    return stale


# ---- reading -----------------------------------------------------------------------------
def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` holds exactly the bytes that were written."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({os_error_message(e)})") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write never finished")
    sidecar = _sidecar(path)
    if sidecar.is_file():
        try:
            recorded = sidecar.read_text(errors="replace").split(maxsplit=1)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint {path}: its checksum file cannot be read ({os_error_message(e)})"
            ) from None
        if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
            raise CheckpointError(f"checkpoint {path}: its checksum file {sidecar} is unreadable")
        try:
            actual = _sha256(path)
        except OSError as e:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({os_error_message(e)})"
            ) from None
        if actual != recorded[0]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its sha256 differs from the one recorded "
                f"when it was written ({sidecar.name})"
            )
        return
    # No recorded hash (a checkpoint written before they were): check the zip CRCs.
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, a damaged header, a short read, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({first_line(e)})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {bad} fails its CRC check")


# key -> the type(s) it must have
_STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizer": dict,
    "step": int,
    "best_val": (float, int),
    "rng": dict,
    "model_config": dict,
    "train_config": dict,
    "ln_sigmas": dict,
}


def load_state(path: Path) -> dict:
    """Verify, unpickle (weights only) and check the structure of a step checkpoint."""
    verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} is not a gpt2lab training checkpoint (it holds a "
            f"{type(state).__name__}, not a dict)"
        )
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(map(repr, missing))}"
        )
    for key, kind in _STATE_KEYS.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            want = kind.__name__ if isinstance(kind, type) else kind[0].__name__
            raise CheckpointError(
                f"checkpoint {path}: {key!r} is a {type(value).__name__}, expected a {want}"
            )
    if state["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: 'step' is negative ({state['step']})")
    return state


def quarantine(path: Path) -> Path:
    """Move a damaged checkpoint aside (kept for inspection, never resumed from)."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    _sidecar(path).unlink(missing_ok=True)
    return target


# ---- run identity --------------------------------------------------------------------------
# Settings that may change on --resume: they do not change the weights' trajectory.
MAY_CHANGE = {"train.out_dir", "train.device", "train.compile",
              "train.nonfinite", "train.nonfinite_limit", "eval.every", "eval.iters",
              "checkpoint.every", "checkpoint.keep", "log.every", "log.tensorboard",
              "log.progress"}  # fmt: skip
# The learning-rate schedule (optim.lr_at): compared by `schedule`, not in the identity,
# because a resume may change it when asked to (`--new-schedule`): extending a run
# (a larger max_steps, which stretches the cosine decay) is a common reason to resume.
SCHEDULE = ("train.max_steps", "train.warmup_steps", "train.lr", "train.min_lr")
# Paths compared by what they hold instead (see run_identity).
BY_CONTENT = {"data.dir", "model.init_from"}


def manifest_digest(data_dir: str | Path) -> str | None:
    """What a prepared dataset is, independent of where it is: the sha256 of its
    manifest (shard names, token counts, documents), or None when there is none."""
    try:
        return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def weights_digest(model: torch.nn.Module) -> str:
    """What a model's weights are, independent of the folder, file format or preset name
    they were loaded from: the sha256 of every tensor's name, dtype, shape and bytes.
    About a second per GB, once per start, and only for fine-tuning (`init_from`)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def run_identity(
    train_config: dict[str, Any], world: int, content: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """The settings that determine a run's trajectory, flat ('section.key' -> value).

    The data and the starting weights count by what they are, not where they are:
    `data.dir` and `model.init_from` are left out, and `content` adds their digests
    ('data.manifest_sha256': `manifest_digest`, 'model.init_weights_sha256':
    `weights_digest`, None when training from scratch), so an identical dataset or base
    model moved to another folder still resumes. A checkpoint written before these were
    recorded has no `content`: its data and weights are then not compared (a key only one
    side has is never a difference).

    Micro-batches per step are counted over all processes (grad_accum x world), so a
    run started on 2 processes may resume on 1 with double accumulation."""
    flat = {
        f"{section}.{key}": value
        for section, table in train_config.items()
        if isinstance(table, dict)
        for key, value in table.items()
    }
    identity = {k: v for k, v in flat.items() if k not in MAY_CHANGE | BY_CONTENT | set(SCHEDULE)}
    identity.update(content or {})
    accum = identity.pop("train.grad_accum", 1)
    identity["train.grad_accum*processes"] = accum * world
    return identity


def schedule(train_config: dict[str, Any]) -> dict[str, Any]:
    """The learning-rate schedule's settings ('train.max_steps', ...) of a run's saved
    or current configuration, min_lr as used (-1 means lr / 10). A key a configuration
    lacks is left out (and so never counts as a change)."""
    train = train_config.get("train") if isinstance(train_config.get("train"), dict) else {}
    found = {
        f"train.{k}": train[k] for k in (key.split(".", 1)[1] for key in SCHEDULE) if k in train
    }
    lr, min_lr = found.get("train.lr"), found.get("train.min_lr")
    if isinstance(lr, float) and isinstance(min_lr, float) and min_lr < 0:
        found["train.min_lr"] = lr / 10
    return found


def schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key saved -> current' for each setting of two `schedule`s that differs, numbers
    as a person would write them (3e-04, not 0.00030000000000000003)."""

    def shown(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else repr(value)

    keys = [k for k in SCHEDULE if k in saved and k in current and saved[k] != current[k]]
    return [f"{k} {shown(saved[k])} -> {shown(current[k])}" for k in keys]


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key saved -> current' for every trajectory setting that differs."""

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return a == b or (math.isnan(a) and math.isnan(b))
        return a == b

    # A key only one side has is a setting one gpt2lab version lacks: not a difference.
    keys = sorted(set(saved) & set(current))
    return [f"{k} {saved[k]!r} -> {current[k]!r}" for k in keys if not same(saved[k], current[k])]


# ---- the out_dir ---------------------------------------------------------------------------
def prepare_out_dir(out_dir: Path) -> None:
    """Create out_dir/checkpoints and make sure files can be written there, so an
    unusable out_dir fails before any work, in one line."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GPT2LabError(f"train.out_dir {out_dir} is a file, not a folder")
    try:
        (out_dir / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir / CKPT_DIR):
            pass
    except OSError as e:
        raise GPT2LabError(
            f"train.out_dir {out_dir} is not writable ({os_error_message(e)})"
        ) from None


def previous_run_files(out_dir: Path) -> list[Path]:
    """gpt2lab's files of an earlier run in out_dir (what --overwrite would remove).
    Temporary files of killed writes do not count: they are removed in any case."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / n for n in (*RUN_FILES, *RUN_DIRS) if (out_dir / n).exists()]
    ckpt_dir = out_dir / CKPT_DIR
    if ckpt_dir.is_dir():
        found += sorted(
            p
            for p in ckpt_dir.iterdir()
            if p.name.startswith("step_") and p.name.endswith((".pt", ".sha256", ".corrupt"))
        )
    return found


def remove_run_files(out_dir: Path) -> list[Path]:
    """--overwrite: remove the previous run's files, and nothing else."""
    removed = previous_run_files(out_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def truncate_log(out_dir: Path, step: int) -> int:
    """Drop log.jsonl records of steps after the checkpoint of `step` (their metrics and
    notes, and a torn last line), so a resumed run, which computes those steps again,
    does not log them twice. Every record, note or metrics, carries the step it belongs
    to: step k's record and the notes written while computing step k (a skipped
    non-finite update, an LN-removal site switched at its start) say k, and all are
    written before the checkpoint of k, so everything with step <= `step` is kept.
    Atomic: the log is rewritten and renamed. Returns the number of lines dropped."""
    log = out_dir / "log.jsonl"
    if not log.is_file():
        return 0
    kept, dropped = [], 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = record["step"]
            keep = isinstance(at, int) and at <= step
        except (ValueError, TypeError, KeyError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _write_bytes_atomic(log, "".join(line + "\n" for line in kept).encode())
    return dropped
