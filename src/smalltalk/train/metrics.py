"""Training logs: a tqdm bar (loss, lr, tokens/s, ETA), ``<run_dir>/metrics.jsonl`` and TensorBoard.

metrics.jsonl holds one JSON object per logged step::

    {"step": 120, "loss": 4.31, "lr": 0.0029, "grad_norm": 0.8, "tokens": 122880, "flops": 1.2e12,
     "tokens_per_s": 5200.0, "elapsed_s": 23.6, "val_loss": 4.5, "val_ppl": 90.0, "val_bpb": 1.9}

(val_* only on evaluation steps). On resume from step N, lines with step > N are dropped first, so
the file always describes one consistent trajectory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .layout import TrainerDir


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: drop it
        if record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class MetricsLogger:
    """Writes only when `enabled` (rank 0); safe to call on every rank."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, start_step: int = 0, total_steps: int = 0,
                 progress: bool | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = TrainerDir(run_dir).metrics
        self._bar = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        from tqdm.auto import tqdm

        # progress=None: a bar on terminals; in logs (stderr not a terminal) a plain line every tenth of the run,
        # so a long stage inside `smalltalk run` never goes silent. progress=False: neither.
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                         disable=(not tty) if progress is None else not progress)
        self._lines = progress is None and not tty
        self._total, self._every = total_steps, max(1, total_steps // 10)
        self._start_step, self._t0 = start_step, time.perf_counter()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}",
                                        value, record["step"])

    def progress(self, step: int, **postfix: Any) -> None:
        if self._bar is None:
            return
        if self._lines and (step % self._every == 0 or step == self._total):
            rate = (step - self._start_step) / max(time.perf_counter() - self._t0, 1e-9)
            shown = " ".join(f"{k} {_short(v)}" for k, v in postfix.items() if v)
            print(f"step {step}/{self._total} {shown} ({rate:.2f} steps/s)", file=sys.stderr, flush=True)
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                              refresh=False)
        self._bar.update(step - self._bar.n)  # update() (not assigning n) keeps tqdm's rate and ETA right

    def write(self, message: str) -> None:
        """A one-line message that does not break the bar (rank 0 only)."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        self.enabled = False


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
