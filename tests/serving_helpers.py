"""Real `smalltalk serve` processes on loopback ports, for the serving tests."""

from __future__ import annotations

from pathlib import Path

from smalltalk.serving.process import ServerProcess, free_port

__all__ = ["ServerProcess", "free_port", "rss_mb"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
