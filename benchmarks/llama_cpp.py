"""llama.cpp as a benchmark peer: its own timers (llama-bench, llama-batched-bench) run
on GGUFs that gpt2lab's writer made from the very weights gpt2lab is timed on.

Each call is one process doing one measured repetition after llama.cpp's own warm-up;
the time reported is llama.cpp's (model loading and process start are not counted), so
calls can be interleaved with gpt2lab's rounds like any other variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

# gpt2lab dtype -> the GGUF type at the same precision
SAME_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}


def find_llama_bench(path: str) -> Path:
    """llama-bench from a path to it, its bin/ folder or the build folder above bin/."""
    p = Path(path).expanduser()
    for candidate in (p, p / "llama-bench", p / "bin" / "llama-bench"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(
        f"no llama-bench at {path} (build one with scripts/build_llama_cpp.sh; then pass "
        "build/llama.cpp)"
    )


def _gcc_major() -> int | None:
    try:
        out = subprocess.run(["gcc", "-dumpversion"], capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def repack_setting(bench: Path) -> tuple[bool, str]:
    """(repacking on?, why). llama.cpp #26954: on AMX CPUs a build made with GCC 12
    crashes in the repacked q8_0 prefill, so repacking is switched off there
    (scripts/build_llama_cpp.sh leaves a REPACK_OFF marker when it built that way)."""
    if (bench.parent.parent / "REPACK_OFF").exists():
        return False, "--repack 0: the build script found an AMX CPU and GCC 12 (llama.cpp #26954)"
    try:
        amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    if amx and _gcc_major() == 12:
        return False, "--repack 0: AMX CPU and GCC 12 here (llama.cpp #26954)"
    return True, "repacking on (llama.cpp's default; no AMX with GCC 12 here)"


class LlamaCpp:
    def __init__(self, bench: Path, threads: int):
        self.bench = bench
        batched = bench.parent / "llama-batched-bench"
        self.batched = batched if batched.is_file() else None
        self.threads = threads
        self.repack, self.repack_note = repack_setting(bench)

    def _run(self, args: list[str]) -> str:
        run = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"{Path(args[0]).name} failed ({run.returncode}): {' | '.join(tail)}")
        return run.stdout

    def bench_times(self, model: Path, prompt: int, new: int) -> dict[str, float]:
        """Seconds of one repetition each: `pp` (prefill `prompt` tokens), `tg` (decode
        `new` tokens one at a time) and `pg` (the two in one sequence, as gpt2lab's
        generate call does)."""
        args = [str(self.bench), "-m", str(model), "-p", str(prompt), "-n", str(new),
                "-pg", f"{prompt},{new}", "-r", "1", "-t", str(self.threads), "-o", "jsonl"]  # fmt: skip
        if not self.repack:
            args += ["--repack", "0"]
        out = {}
        for line in self._run(args).splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            p, g = rec["n_prompt"], rec["n_gen"]
            key = "pg" if p and g else ("pp" if p else "tg")
            out[key] = rec["samples_ns"][0] / 1e9
        return out

    def batched_time(self, model: Path, prompt: int, new: int, batch: int) -> float | None:
        """Seconds for `batch` sequences: prefill `prompt` tokens each, then `new` tokens
        each decoded together (llama-batched-bench's T = T_PP + T_TG)."""
        if self.batched is None:
            return None
        args = [str(self.batched), "-m", str(model), "-npp", str(prompt), "-ntg", str(new),
                "-npl", str(batch), "-c", str(batch * (prompt + new)), "-t", str(self.threads)]  # fmt: skip
        if not self.repack:
            args.append("--no-repack")
        for line in self._run(args).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
                return float(cells[8])  # T s
        raise SystemExit("llama-batched-bench printed no result row")


def gguf_read_bytes(path: Path) -> int:
    """Bytes a decoding step reads from a GGUF: every tensor but position_embd (one row
    is looked up); token_embd is read whole as the tied output matrix."""
    from gpt2lab.gguf_io import open_gguf

    f = open_gguf(path)
    return sum(nbytes for name, (_, _, _, nbytes) in f.tensors.items()
               if name != "position_embd.weight")  # fmt: skip
