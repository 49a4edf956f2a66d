"""Router EM over several workers: routers split over ranks, scores are the only thing exchanged.

Under ``torchrun`` (gloo on CPU, NCCL on CUDA), router e lives on rank ``e % world_size``. Each rank
trains its own routers with no gradient communication at all; once per EM iteration every rank
scores the same sequences with its routers and one all-gather gives every rank the full (n, E)
score matrix, from which each computes the same balanced assignment (a pure function), so no
assignment needs to be sent. Without torchrun there is one worker holding all routers and no
collective (the default).

Bytes are accounted for each collective from the tensors handed to it, as a ring all-gather moves
them: a rank sends and receives (P - 1) blocks, one block being its (padded) share of the scores.
These are payload bytes (no protocol headers), the quantity App. A.4 estimates.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import SmallTalkError
from ..train.distributed import RankRole, init_distributed, resolve_device

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Workers(RankRole):
    """This process's place among the EM workers, and the bytes it has exchanged."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    """Score all-gathers done by this process (bytes_* count their payload, see the module docstring)."""

    def owned(self, num_experts: int) -> list[int]:
        """Routers this rank trains and scores with: e % world_size == rank."""
        return [e for e in range(num_experts) if e % self.world_size == self.rank]

    def owner(self, e: int) -> int:
        return e % self.world_size

    def all_gather_scores(self, local: np.ndarray, num_experts: int, dtype: str = "float32") -> np.ndarray:
        """`local` (n, len(owned)) scores of this rank's routers -> (n, E) float32 scores of all routers.

        The scores travel as `dtype`; the same rounding is applied with one worker, so the result
        does not depend on the number of workers.
        """
        torch_dtype = _TORCH_DTYPES[dtype]
        local = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(torch_dtype)  # (n, e_local)
        n = local.shape[0]
        if not self.enabled:
            return local.float().numpy()
        # Every rank owns ceil(E / P) or one fewer routers; pad so all blocks have the same shape.
        width = -(-num_experts // self.world_size)
        block = torch.zeros(n, width, dtype=torch_dtype)
        block[:, :local.shape[1]] = local
        block = block.to(self.device)
        gathered = [torch.empty_like(block) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, block)
        except RuntimeError as e:  # a peer died or the connection broke
            raise SmallTalkError(f"worker {self.rank}: score exchange failed ({str(e).splitlines()[0][:200]}); "
                                 "another worker probably died. Completed EM iterations are saved: re-run the "
                                 "same command to resume") from None
        nbytes = block.numel() * block.element_size()
        self.bytes_sent += (self.world_size - 1) * nbytes
        self.bytes_received += (self.world_size - 1) * nbytes
        self.collectives += 1
        out = np.empty((n, num_experts), dtype=np.float32)
        for r, g in enumerate(gathered):
            mine = [e for e in range(num_experts) if e % self.world_size == r]
            out[:, mine] = g[:, :len(mine)].float().cpu().numpy()
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_workers(device: str = "auto", timeout_s: float = 1800.0) -> Workers:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); else one worker."""
    info = init_distributed(device, timeout_s)
    return Workers(rank=info.rank, world_size=info.world_size, device=resolve_device(device, info))


def shutdown_workers(workers: Workers) -> None:
    if workers.enabled and dist.is_initialized():
        dist.destroy_process_group()


def install_termination_message(workers: Workers, state_hint: Callable[[], str]) -> None:
    """When torchrun stops this worker because another one failed (SIGTERM), say so in one line and exit."""
    if not workers.enabled:
        return

    def handler(signum, frame):  # noqa: ARG001
        try:
            hint = state_hint()
        except Exception:  # noqa: BLE001 - never fail while reporting a failure
            hint = "re-run the same command to resume"
        print(f"error: worker {workers.rank} stopped (signal {signum}): another worker failed. {hint}",
              file=sys.stderr, flush=True)
        os._exit(1)

    signal.signal(signal.SIGTERM, handler)
