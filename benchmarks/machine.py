"""The `## Machine` section every benchmark prints, so its figures can be compared."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_machine(*extra: str) -> None:
    """CPU, threads, library versions, then any `extra` lines and the load average."""
    import transformers

    import gpt2lab

    print("## Machine\n")
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"- torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"- torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"- gpt2lab {gpt2lab.__version__}, Python {platform.python_version()}")
    for line in extra:
        print(f"- {line}")
    try:
        load = os.getloadavg()
        print(
            f"- load average (1, 5, 15 min) at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        )
    except OSError:
        pass
