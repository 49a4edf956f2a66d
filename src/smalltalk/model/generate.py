"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop strings, batched prompts.

    result = generate(model, tokenizer, "Once upon a time", max_new_tokens=50, top_k=40, seed=0)
    result.text, result.token_ids, result.finish_reason        # "eos" | "stop" | "length"

With the cache the prompt is run once (prefill) and then one token per step attends to the
cached keys and values; `use_cache=False` re-runs the whole window every step (same tokens,
for checking and benchmarking).

Context window. The model sees at most `max_seq_len` tokens. A longer prompt is left-truncated
to its last `max_seq_len` tokens (`GenerationResult.prompt_truncated`). When prompt plus
generated tokens would overflow the window, the oldest tokens are dropped so that the last
`max_seq_len // 2` remain, and the cache is rebuilt from them (one prefill per half window).
The same rule applies without the cache, so both paths produce the same tokens.

Batches. `generate_batch` left-pads prompts of different lengths and masks the padding, so each
row's logits are those of the row run alone (up to float rounding): with RoPE only relative
positions matter. Each row keeps its own context window (the rule above), and a row that
finishes leaves the batch, so a row's tokens do not depend on its neighbours.

Tokenizer: smalltalk's `TextTokenizer` (`smalltalk.data.tokenizer.load_tokenizer`), an HF
`tokenizers.Tokenizer` or a `transformers` tokenizer. Prompts are encoded without special tokens; an empty prompt starts from EOS (the document boundary the model saw in
training), i.e. unconditional generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SmallTalkError
from .stacked import StackedExperts
from .transformer import Transformer

# Special-token spellings tried, in order, when the tokenizer does not say its EOS id
# (the same order as smalltalk.data.tokenizer).
REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an incomplete UTF-8 character
EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "[EOS]")


@dataclass
class GenerationResult:
    text: str
    """Decoded continuation (without the prompt), EOS removed, cut before the first stop string; a character
    whose UTF-8 bytes were not all generated is left out (`token_ids` has them)."""
    token_ids: list[int]
    """Generated token ids, EOS excluded; with a stop string, up to the token that completed it."""
    finish_reason: str
    """"eos" (model emitted EOS), "stop" (a stop string appeared) or "length" (max_new_tokens reached)."""
    prompt_ids: list[int] = field(default_factory=list)
    """Prompt tokens actually fed to the model (after left truncation)."""
    prompt_truncated: bool = False
    """True when the prompt was longer than the context and lost its oldest tokens."""


def generate(model: Transformer, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 100, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop: Sequence[str] | None = None, seed: int | None = None, greedy: bool = False,
             use_cache: bool = True, eos_id: int | None = None, ignore_eos: bool = False) -> GenerationResult:
    """Continue one prompt (text, or a list of token ids). See the module docstring for the rules.

    `temperature=0` is greedy; `top_k` keeps the k most likely tokens, `top_p` the smallest set whose
    probability reaches p (both after temperature). `seed` fixes sampling (None: torch's global RNG).
    `eos_id` defaults to the tokenizer's EOS token; `ignore_eos` keeps generating past it.
    """
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop=stop, seed=seed, greedy=greedy, use_cache=use_cache, eos_id=eos_id,
                          ignore_eos=ignore_eos)[0]


@torch.inference_mode()
def generate_batch(model: Transformer, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 100,
                   *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   stop: Sequence[str] | None = None, seed: int | None = None, greedy: bool = False,
                   use_cache: bool = True, eos_id: int | None = None,
                   ignore_eos: bool = False) -> list[GenerationResult]:
    """Continue several prompts together (one forward per step for the whole batch).

    With `seed`, every row samples from its own generator seeded with `seed`, so a row's tokens are
    those it would get alone.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, stop)
    if isinstance(prompts, str) or not len(prompts):
        raise SmallTalkError("generate_batch: prompts must be a non-empty list of strings or token-id lists")
    eos_id = eos_token_id(tokenizer) if eos_id is None else eos_id
    stop = [s for s in (stop or []) if s]
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed)
    rows = [_prompt_ids(tokenizer, p, eos_id, model.config.vocab_size) for p in prompts]
    decoder = BatchDecoder(model, rows, [sampling] * len(rows), use_cache=use_cache)

    B = len(rows)
    new_ids: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    texts: list[str | None] = [None] * B
    for _ in range(max_new_tokens):
        for b, token, _logits in decoder.step():
            if token == eos_id and not ignore_eos:
                reasons[b] = "eos"
                decoder.finish(b)
                continue
            new_ids[b].append(token)
            if stop:
                texts[b], hit = _cut_at_stop(decode(tokenizer, new_ids[b]), stop)
                if hit:
                    reasons[b] = "stop"
                    decoder.finish(b)
        if not decoder.active:
            break

    results = []
    for b in range(B):
        text = texts[b] if texts[b] is not None else decode(tokenizer, new_ids[b])
        text = text.rstrip(REPLACEMENT)  # the last token may end inside a UTF-8 character: drop the half
        results.append(GenerationResult(text=text, token_ids=new_ids[b], finish_reason=reasons[b] or "length",
                                        prompt_ids=decoder.prompts[b], prompt_truncated=decoder.truncated[b]))
    return results


@dataclass(frozen=True)
class Sampling:
    """How one row picks its next token (see `sample_next`); `seed` gives the row its own generator."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class BatchDecoder:
    """Step-wise batched decoding with a KV cache: each `step()` gives every active row one token.

    Rows are left-padded and masked, so a row's logits are those of the row run alone (up to float
    rounding). The caller decides when a row is done (EOS, stop string, token budget, a client gone)
    and calls `finish(row)`; the row leaves the batch, with its cache, before the next step. Each row
    keeps its own context window: past `max_seq_len` it keeps its newest half and the cache is rebuilt.

    Rows may also join between steps (`add`, continuous batching): a joining row is prefilled alone,
    left-padded to the batch's width so its cache lines up with the others' (a prompt wider than the
    batch re-pads every row and rebuilds the cache instead), and gets its first token in the same step.
    """

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling],
                 use_cache: bool = True):
        if len(prompts) != len(sampling):
            raise SmallTalkError("BatchDecoder: give one Sampling per prompt")
        self.model, self.use_cache = model, use_cache
        self.stacked = isinstance(model, StackedExperts)  # rows of several experts, one forward per step
        if self.stacked and not use_cache:
            raise SmallTalkError("BatchDecoder: stacked experts decode with the KV cache")
        self.max_len = model.config.max_seq_len
        self.device = model.device if self.stacked else next(model.parameters()).device
        self.experts: list[int] = []  # per row: its expert in a StackedExperts (0 otherwise)
        self.truncated: list[bool] = []
        self.prompts: list[list[int]] = []
        self.sampling: list[Sampling] = []
        self.generators: list[torch.Generator | None] = []
        self.windows: list[list[int]] = []  # per row: the tokens the model sees, as if alone
        self.active: list[int] = []  # rows in the batch tensors, in batch order
        self._joining: list[int] = []  # rows added since the last step, not yet prefilled
        self._finished: set[int] = set()
        self._window = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (b, W) ids, left-padded
        self._real = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (b, W) False on padding
        self._caches, self._cached = None, 0  # per-layer (k, v) of the active rows; window positions covered
        self._last: torch.Tensor | None = None  # (b,) the tokens of the last step, not yet in _window
        for p, s in zip(prompts, sampling):
            self.add(p, s)

    def add(self, prompt: Sequence[int], sampling: Sampling, expert: int = 0) -> int:
        """A new row (its index); it is prefilled and gets its first token at the next `step()`. `expert`: the
        row's expert when the model is a `StackedExperts`."""
        ids = [int(t) for t in prompt][-self.max_len:]
        if not ids:
            raise SmallTalkError("BatchDecoder: every prompt needs at least one token (start from EOS)")
        row = len(self.windows)
        self.truncated.append(len(prompt) > self.max_len)
        self.prompts.append(ids)
        self.sampling.append(sampling)
        self.generators.append(torch.Generator(device=self.device).manual_seed(sampling.seed)
                               if sampling.seed is not None else None)
        self.windows.append(list(ids))
        self.experts.append(int(expert))
        self._joining.append(row)
        return row

    @property
    def rows(self) -> list[int]:
        """Rows that will take a token at the next step (decoding or joining, not finished)."""
        return [b for b in self.active + self._joining if b not in self._finished]

    def finish(self, row: int) -> None:
        """Row `row` takes no more tokens; it leaves the batch before the next step."""
        if row in self.active or row in self._joining:
            self._finished.add(row)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int, torch.Tensor]]:
        """One token for each active row: [(row, token id, logits (V,) it was drawn from)]."""
        self._advance()
        joining = [b for b in self._joining if b not in self._finished]
        self._joining = []
        if not self.active and not joining:
            return []
        if joining and (not self.use_cache or not self.active
                        or max(len(self.windows[b]) for b in joining) > self._window.shape[1]):
            # Too wide to line up with the batch (or nothing to line up with): re-pad every row.
            self.active += joining
            self._window, self._real = _pad_left([self.windows[b] for b in self.active], self.device)
            self._caches, self._cached = None, 0
            joining = []
        logits = self._forward(self._window, self._real, self._cached)  # (b, V)
        if joining:  # each new row alone, padded to the batch's width: its cache lines up with the others'
            window, real = _pad_left([self.windows[b] for b in joining], self.device, width=self._window.shape[1])
            new_logits, new_caches = self._prefill(window, real, joining)
            self._caches = [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(self._caches, new_caches)]
            self._window, self._real = torch.cat([self._window, window]), torch.cat([self._real, real])
            self.active += joining
            logits = torch.cat([logits, new_logits])
        if not bool(torch.isfinite(logits).all()):
            raise SmallTalkError("the model produced NaN or infinite logits; its weights are damaged or it diverged")
        next_ids = self._sample(logits)  # (b,)
        self._last = next_ids
        out = []
        for i, (b, token) in enumerate(zip(self.active, next_ids.tolist())):
            self.windows[b].append(token)
            out.append((b, token, logits[i]))
        return out

    def _forward(self, window: torch.Tensor, real: torch.Tensor, cached: int) -> torch.Tensor:
        """Last-position logits (b, V) of the batch, feeding the positions the cache does not cover yet."""
        if not self.use_cache:
            return self.model(window, attention_mask=None if bool(real.all()) else real, last_only=True)[:, -1]
        logits, self._caches = self._run(window[:, cached:], real, cached, self._caches, self.active)
        self._cached = window.shape[1]
        return logits

    def _prefill(self, window: torch.Tensor, real: torch.Tensor, rows: list[int]):
        """(last-position logits (b, V), caches) of new rows run from an empty cache."""
        return self._run(window, real, 0, None, rows)

    def _run(self, new: torch.Tensor, real: torch.Tensor, start: int, caches, rows: list[int]):
        model, kwargs = self._model_for(rows)
        logits, caches = model(new, kv_caches=caches or [None] * self.model.config.num_layers, start_pos=start,
                               attention_mask=None if bool(real.all()) else real, last_only=True, **kwargs)
        return logits[:, -1], caches

    def _model_for(self, rows: list[int]):
        """(model, extra forward arguments) for `rows`: with stacked experts, the rows' experts, or the one expert's
        own model when all rows have it (decided on the list, before any tensor is made: the common lone-row step)."""
        if not self.stacked:
            return self.model, {}
        experts = [self.experts[b] for b in rows]
        if all(e == experts[0] for e in experts):
            return self.model.models[experts[0]], {}
        return self.model, {"experts": torch.tensor(experts, dtype=torch.long, device=self.device)}

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [self.sampling[b] for b in self.active]
        if all(s.is_greedy for s in rows):
            return logits.argmax(dim=-1)
        picks = [sample_next(logits[i:i + 1], s.temperature, s.top_k, s.top_p, s.greedy, self.generators[b])
                 for i, (b, s) in enumerate(zip(self.active, rows))]
        return torch.cat(picks)

    def _advance(self) -> None:
        """Drop finished rows, then put the last step's tokens into the window (or re-pad past the context)."""
        if self._last is None:
            return
        keep = [i for i, b in enumerate(self.active) if b not in self._finished]
        if len(keep) < len(self.active):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._window, self._real, self._last = self._window[index], self._real[index], self._last[index]
            self._caches = [(k[index], v[index]) for k, v in self._caches] if self._caches else None
            self.active = [self.active[i] for i in keep]
        last, self._last = self._last, None
        if not self.active:
            return
        overflow = [b for b in self.active if len(self.windows[b]) > self.max_len]
        for b in overflow:  # this row's context is full: it keeps its newest half
            self.windows[b] = self.windows[b][-max(1, self.max_len // 2):]
        # The batch tensor is as wide as the longest row ever in it: once that row has finished, the
        # others carry its left padding, which must not push the tensor past the context either.
        if overflow or self._window.shape[1] + 1 > self.max_len:  # re-pad the rows, rebuild the cache
            self._window, self._real = _pad_left([self.windows[b] for b in self.active], self.device)
            self._caches, self._cached = None, 0
        else:
            self._window = torch.cat([self._window, last[:, None]], dim=1)
            self._real = torch.cat([self._real, torch.ones_like(self._real[:, :1])], dim=1)


def _pad_left(rows: list[list[int]], device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, W) ids left-padded with 0, (B, W) bool True on real tokens (W: the longest, or `width`)."""
    width = width or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        real[b, width - len(r):] = True
    return ids.to(device), real.to(device)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- tokenizer adapters: smalltalk's TextTokenizer, HF `tokenizers.Tokenizer`, or a `transformers` tokenizer --

def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    if hasattr(tokenizer, "eos_id"):  # smalltalk.data.tokenizer.TextTokenizer never adds specials
        return list(tokenizer.encode(text))
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def eos_token_id(tokenizer) -> int | None:
    """The tokenizer's EOS id (`eos_id` / `eos_token_id`, else the first known EOS spelling), or None."""
    for attr in ("eos_id", "eos_token_id"):
        explicit = getattr(tokenizer, attr, None)
        if isinstance(explicit, int):
            return explicit
    lookup = getattr(tokenizer, "token_to_id", None) or getattr(tokenizer, "convert_tokens_to_ids", None)
    for token in EOS_CANDIDATES:
        token_id = lookup(token) if lookup else None
        if isinstance(token_id, int) and token_id >= 0 and token_id != getattr(tokenizer, "unk_token_id", None):
            return token_id
    return None


def _prompt_ids(tokenizer, prompt, eos_id: int | None, vocab_size: int) -> list[int]:
    ids = encode(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        if eos_id is None:
            raise SmallTalkError("empty prompt and the tokenizer has no EOS token to start from; give a prompt")
        ids = [eos_id]
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise SmallTalkError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {vocab_size}); "
                             "was the prompt encoded with another tokenizer?")
    return ids


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _check_options(max_new_tokens, temperature, top_k, top_p, stop) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SmallTalkError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not temperature >= 0:
        raise SmallTalkError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SmallTalkError(f"top_k={top_k!r} must be a positive integer (or None for no top-k)")
    if top_p is not None and not 0 < top_p <= 1:
        raise SmallTalkError(f"top_p={top_p!r} must be in (0, 1] (or None for no nucleus sampling)")
    if isinstance(stop, str):
        raise SmallTalkError("stop must be a list of strings, not a single string")
