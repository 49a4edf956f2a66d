"""Progress of a long loop: a tqdm bar on a terminal, a plain line every few seconds everywhere else.

A log file, CI or `nohup` gets readable lines ("prepare cpu: 12.3M B (1.02M B/s)") instead of tqdm's carriage-return
updates, which pile hundreds of redraws into one log line. Training has its own per-step lines
(train/metrics.py); this is for every other stage (prepare, evaluation, text scoring, lm-eval requests).
"""

from __future__ import annotations

import sys
import time


def progress(*, desc: str, total: float | None = None, unit: str = "it", enabled: bool = True,
             unit_scale: bool = False, every_s: float = 5.0):
    """An object with tqdm's `update(n)`, `set_postfix(...)`, `close()`: a bar when stderr is a terminal, else
    `Lines`; nothing at all when not `enabled`."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=False, file=sys.stderr)
    return Lines(desc, total, unit, every_s, enabled=enabled, unit_scale=unit_scale)


def _scaled(value: float, scale: bool) -> str:
    if not scale:
        return f"{value:,.0f}"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


class Lines:
    """Plain progress lines on stderr, at most one per `every_s` seconds, and a last one on close."""

    def __init__(self, desc: str, total: float | None, unit: str, every_s: float, *, enabled: bool = True,
                 unit_scale: bool = False):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit.strip(), every_s
        self.enabled, self.unit_scale = enabled, unit_scale
        self.n = 0.0
        self._t0 = self._last = time.perf_counter()
        self._postfix = ""

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **kwargs) -> None:
        items = {**(values or {}), **kwargs}
        self._postfix = " ".join(f"{k} {v}" for k, v in items.items())

    def _print(self, now: float) -> None:
        if not self.enabled:
            return
        done = _scaled(self.n, self.unit_scale) + (f"/{_scaled(self.total, self.unit_scale)}" if self.total else "")
        rate = self.n / max(now - self._t0, 1e-9)
        extra = f" {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {done} {self.unit} ({_scaled(rate, self.unit_scale)} {self.unit}/s){extra}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n and time.perf_counter() - self._t0 >= self.every_s:
            self._print(time.perf_counter())  # a final line only for loops long enough to have printed

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
