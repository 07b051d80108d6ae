"""Training under faults: damaged checkpoints, reused out_dirs, NaN/inf losses, bad
settings, full or unusable disks, pruning, stale temporary files and the log on resume.

Every run here is the same tiny model (2 layers, d_model 32, the real vocabulary) on a
small corpus, 4 steps with a checkpoint after each. `reference` is the uninterrupted run;
`interrupted` is a copy of it as a run killed after the checkpoint of step 3 would leave
it (step 4's checkpoint, the final model and the report gone, step 4 still in the log).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt2lab as gl
from gpt2lab.checkpoint import save as save_model
from gpt2lab.model import GPT2
from gpt2lab.training import rundir, trainer
from gpt2lab.training.config import load_config
from gpt2lab.training.data import TokenStream, prepare
from gpt2lab.training.optim import lr_at

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters.\n"
)
BASE = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_ctx=64",
        "log.progress=false", "eval.iters=2", "eval.every=0", "train.seq_len=16",
        "train.batch_size=2", "train.max_steps=4", "train.warmup_steps=2", "train.lr=3e-3",
        "checkpoint.every=1", "checkpoint.keep=4", "log.every=1"]  # fmt: skip
STEP3 = "step_0000003.pt"


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """MFU's reference matmul (about a second per run) is irrelevant to these tests."""
    monkeypatch.setattr(trainer, "_peak_flops", lambda *args: 1e12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("faults_src")
    for i in range(6):
        (src / f"doc{i}.txt").write_text(TEXT * (i + 2))
    out = tmp_path_factory.mktemp("faults_corpus")
    prepare([src], out, val_fraction=0.2, seed=0, progress=False)
    return out


def settings(out: Path, corpus: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.dir='{corpus}'", f"train.out_dir='{out}'", *extra]


def config(out: Path, corpus: Path, *extra: str):
    return load_config(None, settings(out, corpus, *extra))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def log_records(out: Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "_peak_flops", lambda *args: 1e12)
    try:
        trainer.train(config(out, corpus))
    finally:
        mp.undo()
    return out


def interrupt(out: Path) -> Path:
    """A finished 4-step run as a kill after the checkpoint of step 3 would leave it."""
    for name in ("step_0000004.pt", "step_0000004.pt.sha256"):
        (out / "checkpoints" / name).unlink()
    shutil.rmtree(out / "final")
    (out / "report.json").unlink()
    return out


@pytest.fixture
def interrupted(tmp_path, reference) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return interrupt(out)


# ---- the CLI, in process (the same handler as `gpt2lab`, without a new interpreter) -------
def cli(capsys, config_file: Path, *args: str, sets: list[str] = ()) -> tuple[int, str, str]:
    from gpt2lab.cli import main

    argv = ["train", str(config_file), *[a for s in sets for a in ("--set", s)], *args]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def empty_toml(tmp_path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text("")
    return path


# ---- damaged checkpoints ------------------------------------------------------------------
def _garbage(n: int) -> bytes:
    return np.random.default_rng(0).bytes(n)


def _overwrite(at: str, size: int):
    def corrupt(path: Path) -> None:
        data = bytearray(path.read_bytes())
        start = {"start": 0, "middle": len(data) // 2, "end": len(data) - size}[at]
        data[start : start + size] = _garbage(size)
        path.write_bytes(bytes(data))

    return corrupt


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _without_checksum(corrupt):
    """A checkpoint without its .sha256 (as written by an older gpt2lab): zip CRCs only."""

    def apply(path: Path) -> None:
        corrupt(path)
        (path.parent / (path.name + ".sha256")).unlink()

    return apply


def _rewritten(change):
    """A checkpoint that is an intact file (its checksum matches) but a wrong state."""

    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        rundir.save_checkpoint(change(state), path)

    return apply


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _set(key, value):
    return lambda state: {**state, key: value}


def _bad_weights(state):
    model = dict(state["model"])
    model["wte.weight"] = torch.zeros(3, 3)
    return {**state, "model": model}


DAMAGE = {
    "start": _overwrite("start", 64),
    "middle-4KB": _overwrite("middle", 4096),
    "end": _overwrite("end", 64),
    "one-bit": _flip_bit,
    "truncated": _truncate,
    "empty": _empty,
    "start-crc-only": _without_checksum(_overwrite("start", 64)),
    "middle-crc-only": _without_checksum(_overwrite("middle", 4096)),
    "end-crc-only": _without_checksum(_overwrite("end", 64)),
    "truncated-crc-only": _without_checksum(_truncate),
    "missing-key": _rewritten(_drop("optimizer")),
    "wrong-type": _rewritten(_set("step", "3")),
    "not-a-dict": _rewritten(lambda state: torch.zeros(3)),
    "wrong-weights": _rewritten(_bad_weights),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_named_then_fallback_resumes_bit_identical(
    damage, interrupted, reference, corpus, capsys
):
    DAMAGE[damage](interrupted / "checkpoints" / STEP3)
    cfg = config(interrupted, corpus)
    with pytest.raises(gl.GPT2LabError, match="--fallback") as error:
        trainer.train(cfg, resume=True)
    message = str(error.value)
    assert STEP3 in message and "\n" not in message
    assert (interrupted / "checkpoints" / STEP3).exists()  # nothing moved without being asked

    capsys.readouterr()
    trainer.train(cfg, resume=True, fallback=True)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("gpt2lab: warning: ") and STEP3 in warning[0]
    assert (interrupted / "checkpoints" / (STEP3 + ".corrupt")).exists()
    assert_same_weights(interrupted, reference)
    notes = [r["note"] for r in log_records(interrupted) if "note" in r]
    assert any(STEP3 in note and "corrupt" in note for note in notes), notes


def test_checkpoint_of_an_older_gpt2lab_still_resumes(interrupted, reference, corpus):
    """No .sha256 beside it (zip CRCs are checked instead) and no recorded identity
    (it is derived from the saved train_config): resumes, bit-identical."""
    path = interrupted / "checkpoints" / STEP3
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("identity", "nonfinite_streak")}, path)
    (interrupted / "checkpoints" / (STEP3 + ".sha256")).unlink()
    trainer.train(config(interrupted, corpus), resume=True)
    assert_same_weights(interrupted, reference)


def test_fallback_with_no_good_checkpoint_left(interrupted, corpus):
    for path in rundir.checkpoints(interrupted):
        _truncate(path)
    with pytest.raises(gl.GPT2LabError, match="no usable checkpoint left"):
        trainer.train(config(interrupted, corpus), resume=True, fallback=True)
    assert len(list((interrupted / "checkpoints").glob("*.corrupt"))) == 3


@pytest.mark.parametrize("damage", ["empty", "middle-4KB", "missing-key"])
def test_cli_resume_of_a_damaged_checkpoint_is_one_line(
    damage, interrupted, corpus, empty_toml, capsys
):
    DAMAGE[damage](interrupted / "checkpoints" / STEP3)
    code, _, err = cli(capsys, empty_toml, "--resume", sets=settings(interrupted, corpus))
    assert_one_line_error(code, err, STEP3, "--fallback")


def test_cli_damaged_checkpoint_in_a_real_process(interrupted, corpus, empty_toml):
    _empty(interrupted / "checkpoints" / STEP3)
    args = [sys.executable, "-m", "gpt2lab", "train", str(empty_toml), "--resume"]
    for item in settings(interrupted, corpus):
        args += ["--set", item]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr, STEP3, "empty (0 bytes)")


# ---- run identity in out_dir ------------------------------------------------------------------
def test_new_run_refuses_another_runs_out_dir(interrupted, corpus, empty_toml, capsys):
    (interrupted / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(interrupted) for p in interrupted.rglob("*"))
    code, _, err = cli(capsys, empty_toml, sets=settings(interrupted, corpus))
    assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    assert sorted(p.relative_to(interrupted) for p in interrupted.rglob("*")) == before


def test_overwrite_removes_only_the_old_runs_files(interrupted, corpus, empty_toml, capsys):
    (interrupted / "notes.txt").write_text("mine")
    (interrupted / "data").mkdir()
    # the old run reached step 3; the new one stops at 2, so by name the old ones would win
    new = settings(interrupted, corpus, "train.max_steps=2", "checkpoint.keep=1")
    code, out, err = cli(capsys, empty_toml, "--overwrite", sets=new)
    assert code == 0, err
    assert [p.name for p in rundir.checkpoints(interrupted)] == ["step_0000002.pt"]
    assert (interrupted / "notes.txt").read_text() == "mine" and (interrupted / "data").is_dir()
    assert [r["step"] for r in log_records(interrupted) if "loss" in r] == [1, 2]
    assert rundir.load_state(rundir.latest_checkpoint(interrupted))["step"] == 2


@pytest.mark.parametrize(
    "change",
    ["train.seed=7", "train.batch_size=3", "train.seq_len=24", "train.grad_accum=2",
     "train.weight_decay=0.0", "train.beta2=0.99", "train.grad_clip=0.5",
     "train.dtype='bfloat16'", "train.freeze=['wpe.weight']"],
)  # fmt: skip
def test_resume_refuses_other_trajectory_settings(change, interrupted, corpus):
    key = change.split("=")[0]
    for new_schedule in (False, True):  # --new-schedule allows only the schedule to change
        with pytest.raises(gl.GPT2LabError, match="belongs to a run with other settings") as error:
            trainer.train(config(interrupted, corpus, change), resume=True, new_schedule=new_schedule)  # fmt: skip
        assert key in str(error.value) and STEP3 in str(error.value)


@pytest.mark.parametrize(
    "change, shown",
    [("train.max_steps=5", "train.max_steps 4 -> 5"),
     ("train.max_steps=3", "train.max_steps 4 -> 3"),
     ("train.warmup_steps=3", "train.warmup_steps 2 -> 3"),
     ("train.lr=1e-3", "train.lr 0.003 -> 0.001; train.min_lr 0.0003 -> 0.0001"),
     ("train.min_lr=0.0", "train.min_lr 0.0003 -> 0")],
)  # fmt: skip
def test_resume_refuses_a_changed_schedule_unless_told(change, shown, interrupted, corpus):
    """A longer run (or another lr) silently reshaped the cosine schedule of the steps
    still to come; now it takes --new-schedule, which says what it continues with."""
    with pytest.raises(gl.GPT2LabError, match="--new-schedule") as error:
        trainer.train(config(interrupted, corpus, change), resume=True)
    message = str(error.value)
    assert shown in message and STEP3 in message and "(step 3)" in message, message
    assert "belongs to a run with other settings" not in message
    assert rundir.latest_checkpoint(interrupted).name == STEP3  # nothing was trained

    cfg = config(interrupted, corpus, change)
    trainer.train(cfg, resume=True, new_schedule=True)
    records = log_records(interrupted)
    assert {"step": 3, "note": f"--new-schedule: continuing with {shown}"} in records
    steps = [r for r in records if "lr" in r]
    # steps 1-3 kept the old schedule; those after follow the new one
    old = config(interrupted, corpus)
    assert [r["lr"] for r in steps[:3]] == [lr_at(i, old) for i in range(3)]
    assert [r["lr"] for r in steps[3:]] == [lr_at(i, cfg) for i in range(3, cfg.train.max_steps)]
    if cfg.train.max_steps > 3:  # the next resume needs no flag: the checkpoints now
        trainer.train(cfg, resume=True)  # hold the new schedule


def test_resume_with_the_same_schedule_needs_no_flag_and_says_where_it_resumed(
    interrupted, reference, corpus, empty_toml, capsys
):
    code, out, err = cli(capsys, empty_toml, "--resume", sets=settings(interrupted, corpus))
    assert code == 0, err
    line = f"train: resumed from {interrupted / 'checkpoints' / STEP3} (step 3 of 4)"
    assert line in out.splitlines(), out
    assert {"step": 3, "note": line.removeprefix("train: ")} in log_records(interrupted)
    assert_same_weights(interrupted, reference)


def test_resume_takes_the_same_data_from_another_folder(interrupted, reference, corpus, tmp_path):
    """The data counts by what it is (its manifest), not where it is."""
    moved = tmp_path / "moved" / "data"
    shutil.copytree(corpus, moved)
    trainer.train(config(interrupted, moved), resume=True)
    assert_same_weights(interrupted, reference)


def test_resume_refuses_other_data(interrupted, corpus, tmp_path):
    src = tmp_path / "other_src"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text(TEXT.upper() * (i + 2))
    other = tmp_path / "other_data"
    prepare([src], other, val_fraction=0.2, seed=0, progress=False)
    with pytest.raises(gl.GPT2LabError, match="data.manifest_sha256") as error:
        trainer.train(config(interrupted, other), resume=True)
    assert "data.dir" not in str(error.value)


def test_resume_compares_the_starting_weights_not_their_folder(tmp_path, corpus):
    """Fine-tuning: init_from counts by the weights it holds. The same weights in another
    folder resume bit-identically; other weights, or none (from scratch), are refused."""

    def base(folder: str, seed: int) -> Path:
        model = GPT2(config(tmp_path, corpus).model_config()).init_weights(seed=seed)
        save_model(model, tmp_path / folder)
        return tmp_path / folder

    first = base("base", seed=0)
    reference, run = tmp_path / "reference", tmp_path / "run"
    for out in (reference, run):
        trainer.train(config(out, corpus, f"model.init_from='{first}'"))
    interrupt(run)
    moved = first.rename(tmp_path / "moved")
    trainer.train(config(run, corpus, f"model.init_from='{moved}'"), resume=True)
    assert_same_weights(run, reference)

    interrupt(run)
    for init in (f"model.init_from='{base('other', seed=1)}'", "model.init_from=''"):
        with pytest.raises(gl.GPT2LabError, match="model.init_weights_sha256"):
            trainer.train(config(run, corpus, init), resume=True)


def test_resume_allows_cadence_changes_and_stays_bit_identical(interrupted, reference, corpus):
    cfg = config(interrupted, corpus, "eval.every=2", "log.every=3", "checkpoint.every=2",
                 "checkpoint.keep=1", "eval.iters=1")  # fmt: skip
    trainer.train(cfg, resume=True)
    assert_same_weights(interrupted, reference)


def test_resume_new_schedule_extends_a_run_from_the_cli(interrupted, corpus, empty_toml, capsys):
    longer = settings(interrupted, corpus, "train.max_steps=6")
    code, _, err = cli(capsys, empty_toml, "--resume", sets=longer)
    assert_one_line_error(code, err, "train.max_steps 4 -> 6", "--new-schedule")
    code, out, err = cli(capsys, empty_toml, "--resume", "--new-schedule", sets=longer)
    assert code == 0, err
    assert "train: --new-schedule: continuing with train.max_steps 4 -> 6" in out.splitlines()
    assert rundir.load_state(rundir.latest_checkpoint(interrupted))["step"] == 6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--overwrite", "--resume"], "give one"),
        (["--fallback"], "only applies with --resume"),
        (["--new-schedule"], "only applies with --resume"),
    ],
)
def test_contradictory_flags(flags, message, tmp_path, corpus, empty_toml, capsys):
    code, _, err = cli(capsys, empty_toml, *flags, sets=settings(tmp_path / "run", corpus))
    assert_one_line_error(code, err, message)


# ---- non-finite losses and gradients ------------------------------------------------------------
class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison(monkeypatch, steps: set[int], kind: str = "nan") -> None:
    """Make the training loss of the given steps NaN, or finite with an inf gradient."""
    real = trainer.cross_entropy
    calls = {"n": 0}

    def cross_entropy(logits, targets):
        loss = real(logits, targets)
        if not torch.is_grad_enabled():  # an evaluation, not a training step
            return loss
        calls["n"] += 1
        if calls["n"] in steps:
            return loss * float("nan") if kind == "nan" else _InfGradient.apply(loss)
        return loss

    monkeypatch.setattr(trainer, "cross_entropy", cross_entropy)


@pytest.mark.parametrize(
    "kind, grad_clip, needle",
    [("nan", "1.0", "loss nan"), ("inf-grad", "1.0", "gradient norm"),
     ("inf-grad", "0.0", "gradient norm")],
)  # fmt: skip
def test_nonfinite_step_stops_and_names_it(kind, grad_clip, needle, tmp_path, corpus, monkeypatch):
    poison(monkeypatch, {3}, kind)
    out = tmp_path / "run"
    with pytest.raises(gl.GPT2LabError, match="step 3: .*not finite") as error:
        trainer.train(config(out, corpus, f"train.grad_clip={grad_clip}"))
    assert needle in str(error.value)
    assert not (out / "final").exists()
    assert [p.name for p in rundir.checkpoints(out)] == ["step_0000001.pt", "step_0000002.pt"]
    state = rundir.load_state(out / "checkpoints" / "step_0000002.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert any("not finite" in r.get("note", "") for r in log_records(out))


def test_skip_leaves_the_weights_untouched_and_continues(tmp_path, corpus, monkeypatch):
    poison(monkeypatch, {2, 3})
    out = tmp_path / "run"
    trainer.train(config(out, corpus, "train.nonfinite='skip'", "train.nonfinite_limit=3"))
    records = {r["step"]: r for r in log_records(out) if "loss" in r}
    assert [s for s, r in records.items() if r.get("skipped")] == [2, 3]
    assert records[2]["loss"] is None and np.isfinite(records[4]["loss"])
    one, three = (rundir.load_state(out / "checkpoints" / f"step_000000{i}.pt") for i in (1, 3))
    for name, w in one["model"].items():
        assert torch.equal(w, three["model"][name]), name  # no update at steps 2 and 3
    assert not torch.equal(three["model"]["wte.weight"], weights(out)["transformer.wte.weight"])


def test_skip_under_a_grad_scaler(tmp_path, corpus, monkeypatch):
    """float16 runs (CUDA only) step through a GradScaler, whose unscale_ must be closed
    by an update even when the step is skipped; checked here with the CPU scaler."""
    poison(monkeypatch, {2})
    run = trainer.Trainer(config(tmp_path, corpus, "train.nonfinite='skip'"))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    run.train()
    assert run.scaler.get_scale() == 8.0  # the skipped step halved the scale
    records = {r["step"]: r for r in log_records(tmp_path) if "loss" in r}
    assert records[2].get("skipped") and not records[3].get("skipped")


def test_skip_stops_after_the_limit_in_a_row(tmp_path, corpus, monkeypatch):
    poison(monkeypatch, {2, 3})
    with pytest.raises(gl.GPT2LabError, match="step 3: 2 non-finite steps in a row"):
        trainer.train(config(tmp_path, corpus, "train.nonfinite='skip'", "train.nonfinite_limit=2"))
    assert not (tmp_path / "final").exists()


NOTED_RUNS = {
    # (settings, poisoned steps): a run whose log gets notes while it trains
    "skip": (["train.nonfinite='skip'", "train.nonfinite_limit=3"], {2, 3}),
    "ln-free": (["train.recipe='ln-free'", "train.ln_free_start=1", "train.ln_free_gap=1",
                 "train.max_steps=6"], set()),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(NOTED_RUNS))
def test_a_resumed_run_logs_every_note_exactly_once(kind, tmp_path, corpus, monkeypatch):
    """Killed while computing step 4, after the checkpoint of step 3 (a skipped step in
    the "skip" run; LN-removal sites switched at steps 2, 3 and 4 in the "ln-free" one),
    then resumed: the log holds each note and metrics record of the uninterrupted run
    once, at the same step, and the weights are bit-identical."""
    extra, poisoned = NOTED_RUNS[kind]
    clean_loss = trainer.cross_entropy
    monkeypatch.setattr(trainer, "cross_entropy", clean_loss)
    poison(monkeypatch, poisoned)
    trainer.train(config(tmp_path / "reference", corpus, *extra))

    real_step = trainer.Trainer._forward_backward

    def killed_in_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    monkeypatch.setattr(trainer, "cross_entropy", clean_loss)
    poison(monkeypatch, poisoned)  # the resumed run computes step 4 only: call 4, clean
    monkeypatch.setattr(trainer.Trainer, "_forward_backward", killed_in_step_4)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(out, corpus, *extra))
    monkeypatch.setattr(trainer.Trainer, "_forward_backward", real_step)
    trainer.train(config(out, corpus, *extra), resume=True)

    def notes(run: Path) -> list[tuple[int, str]]:
        return [(r["step"], r["note"]) for r in log_records(run)
                if "note" in r and not r["note"].startswith("resumed")]  # fmt: skip

    def steps(run: Path) -> list[int]:
        return [r["step"] for r in log_records(run) if "loss" in r]

    expected = notes(tmp_path / "reference")
    wanted = {"skip": ["update skipped"] * 2, "ln-free": ["ln-free: "] * 5 + ["held-out loss"]}
    found = [w for w, (_, note) in zip(wanted[kind], expected, strict=True) if w in note]
    assert found == wanted[kind]  # the reference logged the notes this test is about
    assert notes(out) == expected
    assert steps(out) == steps(tmp_path / "reference") == list(range(1, len(steps(out)) + 1))
    assert_same_weights(out, tmp_path / "reference")


def test_cli_huge_learning_rate_exits_1_without_a_model(tmp_path, corpus, empty_toml, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus, "train.lr=1e30"))
    assert_one_line_error(code, err, "finite")
    assert not (out / "final").exists() and not (out / "best").exists()
    for path in rundir.checkpoints(out):
        state = rundir.load_state(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), path


def test_weights_are_checked_before_every_save(tmp_path, corpus, monkeypatch):
    """A finite loss with an update that overflows the weights is still never saved."""
    real_update = trainer.Trainer._update

    def overflowing_update(self):
        real_update(self)
        if self.step == 1:  # the update that produces step 2
            with torch.no_grad():
                self.model.wte.weight[0, 0] = float("inf")

    monkeypatch.setattr(trainer.Trainer, "_update", overflowing_update)
    out = tmp_path / "run"
    with pytest.raises(gl.GPT2LabError, match="step 2: the weights are no longer finite"):
        trainer.train(config(out, corpus, "train.max_steps=2"))
    assert [p.name for p in rundir.checkpoints(out)] == ["step_0000001.pt"]
    assert not (out / "final").exists()


# ---- device reads: one per step, one per finite-weights check ------------------------------
@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value into Python (on a GPU, each is a device sync) made
    by the trainer itself: reads inside the model's forward and the data's batch
    sampling, which look at host tensors only, are not counted."""
    reads, quiet = [], [0]

    def counted(name, real):
        def read(self, *args, **kwargs):
            if not quiet[0]:
                reads.append(name)
            return real(self, *args, **kwargs)

        return read

    def uncounted(real):
        def call(*args, **kwargs):
            quiet[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                quiet[0] -= 1

        return call

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(GPT2, "forward", uncounted(GPT2.forward))
    monkeypatch.setattr(TokenStream, "batch", uncounted(TokenStream.batch))
    return reads


@pytest.mark.parametrize("grad_clip", ["1.0", "0.0"])
def test_a_step_reads_the_device_once(grad_clip, tmp_path, corpus, host_reads):
    """Three micro-batches' losses and the gradient norm come back in one read, and
    the loss is the float64 sum of the float32 micro-batch losses, as logged before."""
    run = trainer.Trainer(
        config(tmp_path, corpus, "train.grad_accum=3", f"train.grad_clip={grad_clip}")
    )
    host_reads.clear()
    loss, norm, finite = run._read_step(run._forward_backward(), run._grad_norm())
    assert host_reads == ["tolist"]
    assert finite and norm > 0
    with torch.no_grad():  # no update was made: the same losses, read one by one
        batches = [run.train_data.batch(2, 16, run.cfg.train.seed, i) for i in range(3)]
        assert loss == sum((run.loss(x, y) / 3).item() for x, y in batches)


def test_the_finite_weights_check_reads_the_device_once(tmp_path, corpus, host_reads):
    run = trainer.Trainer(config(tmp_path, corpus))
    with torch.no_grad():
        run.model.blocks[0].attn.c_attn.weight[0, 0] = 1e30  # finite, though its 2-norm is not
    host_reads.clear()
    run._check_weights_finite()
    assert len(host_reads) == 1
    for value in (float("nan"), float("-inf")):
        with torch.no_grad():
            run.model.blocks[1].mlp.c_fc.bias[3] = value
        with pytest.raises(
            gl.GPT2LabError, match=r"no longer finite \(blocks\.1\.mlp\.c_fc\.bias\)"
        ):
            run._check_weights_finite()


DDP_POISON = """
import os, sys
from gpt2lab.cli import main
from gpt2lab.training import trainer

real, calls = trainer.cross_entropy, [0]

def cross_entropy(logits, targets):  # step 2's loss is NaN on rank 1 only; gradients finite
    loss = real(logits, targets)
    calls[0] += logits.requires_grad
    return loss + float("nan") if calls[0] == 2 and os.environ["RANK"] == "1" else loss

trainer.cross_entropy = cross_entropy
trainer._peak_flops = lambda *args: 1e12
main(sys.argv[1:])
"""


def test_a_nonfinite_loss_on_one_process_skips_the_step_on_all(tmp_path, corpus, empty_toml):
    """The processes agree through one all_reduce per step: rank 0, whose loss and
    gradients are finite, skips the update too and says why."""
    script = tmp_path / "poisoned.py"
    script.write_text(DDP_POISON)
    sets = settings(tmp_path / "ddp", corpus, "train.nonfinite='skip'", "checkpoint.every=100")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(script), "train", str(empty_toml)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(torchrun + [a for s in sets for a in ("--set", s)], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    records = {r["step"]: r for r in log_records(tmp_path / "ddp") if "loss" in r}
    assert [s for s, r in records.items() if r.get("skipped")] == [2]
    (note,) = [r["note"] for r in log_records(tmp_path / "ddp") if "note" in r]
    assert "here, not finite on another process" in note and "update skipped" in note
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "ddp").values())


# ---- settings out of range: refused before any work ----------------------------------------------
BAD_SETTINGS = [
    ("train.lr=inf", "train.lr must be a finite number > 0"),
    ("train.lr=nan", "train.lr must be a finite number > 0"),
    ("train.lr=1e999", "train.lr must be a finite number > 0"),
    ("train.lr=0", "train.lr must be a finite number > 0"),
    ("train.lr=-1e-3", "train.lr must be a finite number > 0"),
    ("train.min_lr=inf", "train.min_lr must be"),
    ("train.min_lr=-2", "train.min_lr must be"),
    ("train.beta1=2", "train.beta1 must be in [0, 1)"),
    ("train.beta1=1", "train.beta1 must be in [0, 1)"),
    ("train.beta2=-0.1", "train.beta2 must be in [0, 1)"),
    ("train.beta2=nan", "train.beta2 must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay must be"),
    ("train.grad_clip=-1", "train.grad_clip must be"),
    ("train.grad_clip=inf", "train.grad_clip must be"),
    ("train.warmup_steps=-1", "train.warmup_steps must be at least 0"),
    ("train.batch_size=0", "train.batch_size must be at least 1"),
    ("train.seq_len=0", "train.seq_len must be at least 1"),
    ("train.seq_len=65", "exceeds the model's context 64"),
    ("train.grad_accum=0", "train.grad_accum must be at least 1"),
    ("train.max_steps=-5", "train.max_steps must be at least 1"),
    ("train.seed=-1", "train.seed must be"),
    ("train.seed=4294967296", "train.seed must be"),
    ("train.seed=1.5", "train.seed must be an integer"),
    ("train.batch_size=true", "train.batch_size must be an integer"),
    ("train.nonfinite='ignore'", "train.nonfinite must be 'stop' or 'skip'"),
    ("train.nonfinite_limit=0", "train.nonfinite_limit must be at least 1"),
    ("train.ln_free_start=-1", "train.ln_free_start must be at least 0"),
    ("train.ln_free_gap=-1", "train.ln_free_gap must be at least 0"),
    ("train.ln_free_calib_batches=0", "train.ln_free_calib_batches must be at least 1"),
    ("train.dtype='float64'", "train.dtype must be"),
    ("train.out_dir=''", "train.out_dir must be a folder path"),
    ("eval.every=-1", "eval.every must be at least 0"),
    ("eval.iters=0", "eval.iters must be at least 1"),
    ("checkpoint.every=0", "checkpoint.every must be at least 1"),
    ("checkpoint.keep=0", "checkpoint.keep must be at least 1"),
    ("checkpoint.keep=-1", "checkpoint.keep must be at least 1"),
    ("log.every=0", "log.every must be at least 1"),
    ("model.n_layers=-2", "model.n_layers must be at least 0"),
    ("model.n_heads=3", "divisible"),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_any_work(
    setting, message, tmp_path, corpus, empty_toml, capsys
):
    out = tmp_path / "run"
    with pytest.raises(gl.GPT2LabError, match="config: ") as error:
        config(out, corpus, setting)
    assert message in str(error.value)
    code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus, setting))
    assert_one_line_error(code, err, message)
    assert not out.exists()


# ---- OS errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [(lambda p: p.mkdir(), "is a directory"),
     (lambda p: p.write_bytes(b"\xff\xfe\x00\x81binary"), "not UTF-8"),
     (lambda p: p.write_bytes(b"\x00\x01\x02\x03"), "not valid TOML")],
)  # fmt: skip
def test_unusable_config_file(make, message, tmp_path, capsys):
    path = tmp_path / "run.toml"
    make(path)
    code, _, err = cli(capsys, path)
    assert_one_line_error(code, err, str(path), message)


@pytest.mark.parametrize(
    "make_out, message",
    [(lambda p: (p.write_text("x"), p)[1], "is a file"),
     (lambda p: (p.write_text("x"), p / "sub")[1], "not writable")],
)  # fmt: skip
def test_unusable_out_dir(make_out, message, tmp_path, corpus, empty_toml, capsys):
    out = make_out(tmp_path / "out")
    code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus))
    assert_one_line_error(code, err, message)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes to read-only folders")  # fmt: skip
def test_read_only_out_dir(tmp_path, corpus, empty_toml, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus))
    finally:
        out.chmod(0o700)
    assert_one_line_error(code, err, "not writable")


def test_full_disk_during_a_checkpoint_write(tmp_path, corpus, monkeypatch, capsys, empty_toml):
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    out = tmp_path / "run"
    code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus))
    assert_one_line_error(code, err, "step_0000002.pt", "No space left on device")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000001.pt",
        "step_0000001.pt.sha256",
    ]  # no .tmp left behind, the previous checkpoint intact
    rundir.verify(out / "checkpoints" / "step_0000001.pt")


def test_full_disk_when_saving_the_final_model(tmp_path, corpus, monkeypatch, capsys, empty_toml):
    def full(model, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(trainer, "save_model", full)
    out = tmp_path / "run"
    code, _, err = cli(capsys, empty_toml, sets=settings(out, corpus, "train.max_steps=1"))
    assert_one_line_error(code, err, str(out / "final"), "No space left on device")


# ---- pruning, stale files, the log --------------------------------------------------------------
def test_keep_prunes_to_the_newest_by_step_number(tmp_path, corpus):
    out = tmp_path / "run"
    trainer.train(config(out, corpus, "checkpoint.keep=2"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000003.pt", "step_0000003.pt.sha256", "step_0000004.pt", "step_0000004.pt.sha256"]  # fmt: skip


def test_checkpoints_are_ordered_by_number_not_name(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for step in (9_999_999, 10_000_000, 2):
        (ckpt / f"step_{step:07d}.pt").write_bytes(b"x")
    (ckpt / "step_x.pt").write_bytes(b"x")  # not a step checkpoint
    assert rundir.latest_checkpoint(tmp_path).name == "step_10000000.pt"
    assert [p.name for p in rundir.prune(tmp_path, 1)] == ["step_0000002.pt", "step_9999999.pt"]
    with pytest.raises(gl.GPT2LabError, match="at least 1"):
        rundir.prune(tmp_path, 0)


def test_stale_temporary_files_are_removed_on_resume(interrupted, reference, corpus):
    ckpt = interrupted / "checkpoints"
    stale = [ckpt / "step_0000004.pt.tmp", ckpt / "step_0000004.pt.sha256.tmp",
             ckpt / "step_0000009.pt.sha256", interrupted / "log.jsonl.tmp"]  # fmt: skip
    for path in stale:
        path.write_bytes(b"half a write")
    trainer.train(config(interrupted, corpus), resume=True)
    assert not any(path.exists() for path in stale)
    assert_same_weights(interrupted, reference)


def test_stale_temporary_files_alone_do_not_make_a_run(tmp_path, corpus):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_0000002.pt.tmp").write_bytes(b"half a write")
    trainer.train(config(out, corpus, "train.max_steps=1"))
    assert not (out / "checkpoints" / "step_0000002.pt.tmp").exists()


def test_log_has_no_duplicate_records_after_resume(interrupted, reference, corpus):
    with open(interrupted / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a torn last line from the kill
    trainer.train(config(interrupted, corpus), resume=True)
    ours = [(r["step"], r["loss"]) for r in log_records(interrupted) if "loss" in r]
    theirs = [(r["step"], r["loss"]) for r in log_records(reference) if "loss" in r]
    assert [step for step, _ in ours] == [1, 2, 3, 4]
    assert ours == theirs


def test_resume_without_a_checkpoint(tmp_path, corpus):
    with pytest.raises(gl.GPT2LabError, match="no checkpoint"):
        trainer.train(config(tmp_path / "nothing", corpus), resume=True)


@pytest.mark.parametrize(
    "env, message",
    [({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' is not an integer"),
     ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK='one' is not an integer"),
     ({"WORLD_SIZE": "2"}, "RANK=None is not an integer")],
)  # fmt: skip
def test_malformed_torchrun_environment(
    env, message, tmp_path, corpus, empty_toml, capsys, monkeypatch
):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, empty_toml, sets=settings(tmp_path / "run", corpus))
    assert_one_line_error(code, err, message)


def test_a_batch_bigger_than_memory_is_refused_before_allocating(tmp_path, corpus):
    with pytest.raises(gl.GPT2LabError, match="train.batch_size 1000000000 x seq_len 16 needs"):
        trainer.train(config(tmp_path / "run", corpus, "train.batch_size=1000000000"))
