"""Turning generated token ids into text a client can be sent piece by piece.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix gives
U+FFFD. `TextStream` holds text back until the character is complete, and holds back a tail that
could still become a stop string, so what was sent never has to be taken back. `finish()` returns
the rest, without a last character whose bytes never all arrived (as `generate` does).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.generate import REPLACEMENT, decode


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False
        """A stop string appeared: the text is final, cut before it."""

    def add(self, token: int) -> str:
        """Append one token; the text that became safe to send."""
        self.ids.append(int(token))
        text = decode(self.tokenizer, self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._take(self.text)
        self.text = text
        safe = text.rstrip(REPLACEMENT)
        hold = max((n for s in self.stop for n in range(1, len(s)) if safe.endswith(s[:n])), default=0)
        return self._take(safe[:len(safe) - hold])

    def finish(self) -> str:
        """Everything not sent yet."""
        return self._take(self.text.rstrip(REPLACEMENT))

    def _take(self, upto: str) -> str:
        piece = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return piece


def token_text(tokenizer, token: int) -> str:
    """One token as text, special tokens spelled out (the `tokens` of OpenAI logprobs)."""
    return tokenizer.decode([int(token)], skip_special_tokens=False)


def top_entries(tokenizer, logp: torch.Tensor, n: int) -> dict[str, float]:
    """The n most likely tokens of a (V,) log-distribution: {token text: logprob}."""
    if n <= 0:
        return {}
    values, ids = torch.topk(logp, n)
    out: dict[str, float] = {}
    for v, i in zip(values.tolist(), ids.tolist()):
        out.setdefault(token_text(tokenizer, i), float(v))
    return out


@torch.inference_mode()
def prompt_logprobs(model, tokenizer, ids: Sequence[int], n: int) -> list[tuple[float | None, dict | None]]:
    """Per prompt token: (log p(token | the tokens before it), its position's top-n); the first token has no
    context, so (None, None). `ids` must fit the model's context."""
    out: list[tuple[float | None, dict | None]] = [(None, None)]
    if len(ids) < 2:
        return out[:len(ids)]
    x = torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)
    logp = torch.log_softmax(model(x[:, :-1])[0].float(), dim=-1)  # (T-1, V)
    picked = logp.gather(1, x[0, 1:, None])[:, 0].tolist()  # (T-1,)
    for t, value in enumerate(picked):
        out.append((float(value), top_entries(tokenizer, logp[t], n) if n > 0 else None))
    return out
