"""Multi-process training under torchrun: DDP over gloo (CPU) or nccl (CUDA).

Each process draws different micro-batches from the same deterministic stream, so N
processes with accumulation k compute exactly the update of one process with
accumulation N * k (see `TokenShards.batch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import parse_device
from ..errors import GPT2LabError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: str | None = None) -> int:
    """A torchrun variable as an int; a missing or malformed one is a clear error."""
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise GPT2LabError(
            f"environment variable {name}={raw!r} is not an integer (launch with torchrun)"
        ) from None
    if value < 0:
        raise GPT2LabError(f"environment variable {name}={raw!r} must not be negative")
    return value


def setup(device: str) -> DistContext:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world = _env_int("WORLD_SIZE", "1")
    dev = parse_device(device)
    if world <= 1:
        return DistContext(device=dev)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, device=dev)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
