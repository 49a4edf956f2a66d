"""Data parallelism when launched with ``torchrun`` (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA.

The model code stays single-device; the trainer wraps it in DDP from the outside (torchtitan
style). Each rank takes a disjoint slice of every global batch, gradients are averaged by DDP,
and only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankRole:
    """`enabled` / `is_main` for anything with `rank` and `world_size` (trainer ranks, EM workers)."""

    rank: int
    world_size: int

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


@dataclass(frozen=True)
class DistInfo(RankRole):
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def resolve_device(name: str | torch.device, info: DistInfo | None = None) -> torch.device:
    """"auto" -> cuda (this rank's local GPU under torchrun) when available, else cpu; a torch.device as is."""
    if isinstance(name, torch.device):
        return name
    info = info or DistInfo()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        from ..errors import SmallTalkError

        if not torch.cuda.is_available():
            raise SmallTalkError(f"device={name!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def init_distributed(device_name: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment; a no-op (rank 0 of 1) otherwise.

    `timeout_s`: how long a collective waits for the other ranks before failing (None: torch's default).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        device = resolve_device(device_name, info)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return info


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (keeps ranks from waiting on a failed one)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
