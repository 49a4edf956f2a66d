"""Batched log-likelihood of target tokens given a context, within a fixed context window.

A request "log p(target | context)" becomes one or more *windows*: token inputs of at most
`max_len` tokens whose last `len(targets)` next-token predictions are scored. The windows follow
lm-eval's conventions exactly:

- context + target fits (len <= max_len + 1): one window, ``(context + target)[-(max_len + 1):][:-1]``,
  which is lm-eval's Hugging Face model; a context too long for the window loses its *oldest* tokens
  (left truncation).
- target longer than the window: the target is cut into chunks of `max_len` tokens, each scored with
  the most context that fits (lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``, used
  for ``loglikelihood_rolling``); every target token is predicted exactly once. (lm-eval's HF model
  refuses this case; here it is the same rolling rule with a real context instead of EOS.)

`score_windows` runs windows of one model in batches: rows sorted by length (longest first, so a
batch pads little), right-padded - causal attention means padding after a row's last token never
changes that row's logits. Log-softmax is taken in float32 on the scored positions only.
Shapes: N windows, B rows in a batch, T padded length, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.transformer import Transformer


@dataclass(frozen=True)
class Window:
    """Inputs of one forward pass whose last ``len(targets)`` predictions are scored."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]


def make_windows(context: Sequence[int], target: Sequence[int], max_len: int) -> list[Window]:
    """Windows that score every token of `target` once, given `context` (>= 1 token), in order."""
    if not context:
        raise ValueError("make_windows needs at least one context token (use EOS for an empty context)")
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    full = list(context) + list(target)
    start = len(context)  # index in `full` of the first target token
    windows = []
    for a in range(start, len(full), max_len):
        b = min(a + max_len, len(full))  # this window scores full[a:b]
        s = max(0, b - 1 - max_len)  # inputs full[s:b-1] predict full[s+1:b]
        windows.append(Window(tuple(full[s:b - 1]), tuple(full[a:b])))
    return windows


@torch.inference_mode()
def score_windows(model: Transformer, windows: Sequence[Window], *, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """(sum of target log-probs in nats, whether every target token is the argmax) per window."""
    device = torch.device(device)
    results: list[tuple[float, bool] | None] = [None] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        T = len(windows[rows[0]].inputs)
        idx = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T) right-padded inputs
        row_of, pos_of, tgt = [], [], []  # one entry per scored position
        for r, i in enumerate(rows):
            w = windows[i]
            idx[r, :len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.long)
            n = len(w.targets)
            row_of += [r] * n
            pos_of += range(len(w.inputs) - n, len(w.inputs))
            tgt += w.targets
        with autocast:
            logits = model(idx.to(device))  # (B, T, V)
        picked = logits[torch.tensor(row_of, device=device), torch.tensor(pos_of, device=device)].float()  # (P, V)
        targets = torch.tensor(tgt, dtype=torch.long, device=device)  # (P,)
        logp = torch.log_softmax(picked, dim=-1).gather(1, targets[:, None])[:, 0].double().cpu()  # (P,)
        greedy = (picked.argmax(dim=-1) == targets).cpu()  # (P,)
        offset = 0
        for i in rows:
            n = len(windows[i].targets)
            results[i] = (float(logp[offset:offset + n].sum()), bool(greedy[offset:offset + n].all()))
            offset += n
    return results  # type: ignore[return-value]
