"""`smalltalk serve` as a child process on a loopback port: for scripts, benchmarks and tests.

    with ServerProcess("runs/quickstart/bundle", "--max-batch-size", "16", log_dir=Path("logs")) as s:
        httpx.post(f"{s.v1}/completions", json={"prompt": "Hello", "max_tokens": 8})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..errors import SmallTalkError

START_TIMEOUT_S = 180  # only catches a server that never comes up; a busy machine is slower, not stuck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`smalltalk serve PATH ARGS...` on a free port; `.url` is its http://127.0.0.1:PORT."""

    def __init__(self, path: str | os.PathLike, *args: str, log_dir: str | os.PathLike, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "smalltalk", "serve", str(path), "--port", str(self.port), "--threads",
               str(threads), "--log-level", "warning", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("SMALLTALK_API_KEY", None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SmallTalkError(f"server exited with {self.proc.returncode}: {self._tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SmallTalkError(f"server did not come up in {START_TIMEOUT_S} s: {self._tail()}")

    def _tail(self) -> str:
        return " | ".join(self.log.read_text().splitlines()[-5:])

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def terminate(self) -> int:
        """SIGTERM (in-flight requests finish), then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, by name with labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
