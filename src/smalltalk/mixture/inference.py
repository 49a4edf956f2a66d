"""Serving a mixture: route a prompt by its prefix, then let the chosen expert answer (paper Eq. 4-8).

    mixture = Mixture.load("runs/quickstart/bundle")
    route = mixture.route("def fibonacci(n):")          # Route(expert=2, scores=[...], ...)
    out = mixture.generate("def fibonacci(n):", max_new_tokens=40, seed=0)
    out.route.expert, out.result.text

Routing rule. The score of router e is the log-likelihood of the routing window under it,
sum_s log p(x_{s+1} | x_{1:s}; theta^{r,e}), and the prompt goes to argmax_e (uniform prior,
Eq. 6-7; no balancing at inference). Ties go to the lower expert index.

The routing window of a text prompt is its first M-hat tokens (default: the M the routers were
trained with), preceded by EOS: every document in the packed training stream follows an EOS, so
EOS is the context a document's first token was seen in, and even a one-token prompt gets a real
score; a prompt that already starts with EOS (as lm-eval sends an empty context) keeps that one
boundary. A prompt shorter than M-hat uses all its tokens. A prompt with no tokens goes to the
bundle's fallback expert (the one with the largest training share). Token sequences taken from
packed data (evaluation) are routed on their first M-hat tokens as they are, exactly as the
sharding stage routed the training data.

Long prompts. Routing reads only the first M-hat tokens, so any length routes. Generation keeps
the *last* max_seq_len tokens of an over-long prompt (left truncation, reported in
`result.prompt_truncated`); pass ``on_long_prompt="error"`` to refuse instead.

Memory. Routers are small and all E are loaded on the first route. Experts load lazily, each the
first time a prompt is routed to it, into an LRU cache of `max_loaded_experts` models (default 1:
only the routers and the chosen expert are in memory). Each expert's weights are checked against the
sha256 in bundle.json when loaded, so a corrupt or missing expert is reported by name while the
routers and the other experts keep working.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenizer import load_tokenizer
from ..errors import SmallTalkError
from ..model.io import WEIGHTS_FILE, load_model_dir, sha256_file
from ..model.transformer import Transformer
from ..routing import rule
from ..routing.score import StackedRouters
from ..train.distributed import resolve_device  # noqa: F401  (re-exported: the one place a device is resolved)
from .bundle import BundleInfo, read_bundle

LONG_PROMPT_POLICIES = ("truncate", "error")


@dataclass
class Route:
    """The routing decision for one prompt."""

    expert: int
    scores: np.ndarray
    """(E,) log-likelihood (nats) of the routing window under each router; zeros for a fallback."""
    num_tokens: int
    """Prompt tokens the decision used (<= M-hat); 0 means the fallback rule chose the expert."""
    prompt_tokens: int
    """Tokens in the whole prompt."""
    fallback: bool = False

    @property
    def posterior(self) -> np.ndarray:
        """(E,) p(e | prefix) with a uniform prior (Eq. 4-6): softmax of the scores."""
        return rule.posterior(self.scores)

    def to_dict(self) -> dict:
        return {"expert": self.expert, "fallback": self.fallback, "num_tokens": self.num_tokens,
                "prompt_tokens": self.prompt_tokens, "scores": [float(s) for s in self.scores],
                "posterior": [float(p) for p in self.posterior]}


@dataclass
class MixtureGeneration:
    route: Route
    result: object
    """A `smalltalk.model.generate.GenerationResult` from the chosen expert."""


@torch.no_grad()
def token_logprobs(model: Transformer, tokens: np.ndarray | torch.Tensor, *, lengths: Sequence[int] | None = None,
                   batch_size: int = 32, device: torch.device | str = "cpu", on_batch=None) -> np.ndarray:
    """log p(x_{s+1} | x_{1:s}) of every next token: tokens (N, T) -> float32 (N, T - 1).

    With `lengths` (N,), row n is real only up to lengths[n] (right padding); entries past it are 0.
    """
    device = torch.device(device)
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    N, T = tokens.shape
    out = np.zeros((N, max(T - 1, 0)), dtype=np.float32)
    if T < 2 or N == 0:
        return out
    dtype = torch.bfloat16 if device.type == "cuda" else None
    for start in range(0, N, batch_size):
        batch = tokens[start:start + batch_size].to(device)  # (B, T)
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            logits = model(batch[:, :-1])  # (B, T-1, V)
        logp = -F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T-1)
        out[start:start + len(batch)] = logp.cpu().numpy()
        if on_batch is not None:
            on_batch(len(batch))
    if lengths is not None:
        keep = np.arange(T - 1)[None, :] < (np.asarray(lengths)[:, None] - 1)  # (N, T-1)
        out = np.where(keep, out, 0.0).astype(np.float32)
    return out


def router_token_logprobs(routers: StackedRouters, tokens: np.ndarray, *, batch_size: int = 64,
                          on_batch=None) -> np.ndarray:
    """log p(x_{s+1} | x_{1:s}) under each of the E routers: tokens (N, T) -> float32 (N, E, T - 1)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    N, T = tokens.shape
    out = np.zeros((N, routers.num_routers, max(T - 1, 0)), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, N, batch_size):
            idx = tokens[start:start + batch_size].to(routers.device)  # (B, T)
            out[start:start + len(idx)] = routers.token_log_probs(idx).permute(1, 0, 2).cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))
    return out


def router_scores(routers: StackedRouters, tokens: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Log-likelihood of each right-padded row's first lengths[n] tokens under each router: (N, E) float64."""
    return rule.masked_scores(router_token_logprobs(routers, tokens), lengths)  # Eq. 8


class Mixture:
    """A loaded bundle: E routers in memory, experts loaded on demand (bounded LRU cache)."""

    def __init__(self, info: BundleInfo, *, device: str | torch.device = "cpu", max_loaded_experts: int = 1,
                 verify: bool = True):
        if max_loaded_experts < 1:
            raise SmallTalkError(f"max_loaded_experts={max_loaded_experts} must be >= 1")
        self.info = info
        self.device = resolve_device(device)
        self.max_loaded_experts = max_loaded_experts
        self.verify = verify
        self._routers: StackedRouters | None = None
        self._experts: OrderedDict[int, Transformer] = OrderedDict()
        self.tokenizer = load_tokenizer(info.tokenizer_file)
        self.eos_id = self.tokenizer.eos_id

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "Mixture":
        return cls(read_bundle(path), **kwargs)

    @property
    def num_experts(self) -> int:
        return self.info.num_experts

    @property
    def loaded_experts(self) -> list[int]:
        """Experts currently in memory, least recently used first."""
        return list(self._experts)

    # -- models -------------------------------------------------------------------------------------

    @property
    def routers(self) -> StackedRouters:
        """All E routers, stacked for one batched forward (routing/score.py)."""
        if self._routers is None:
            problems = self.info.router_problems()
            if problems:
                raise SmallTalkError(f"bundle {self.info.root}: cannot route, {problems[0]}; rebuild the bundle")
            models = [self._load(entry.dir, entry.weights_sha256, f"router {entry.index}")
                      for entry in self.info.routers]
            self._routers = StackedRouters(models, device=self.device)
        return self._routers

    def expert(self, e: int) -> Transformer:
        """Expert `e`, loading it (and evicting the least recently used one) when needed."""
        if not 0 <= e < self.num_experts:
            raise SmallTalkError(f"expert {e} does not exist; the bundle has experts 0..{self.num_experts - 1}")
        if e in self._experts:
            self._experts.move_to_end(e)
            return self._experts[e]
        entry = self.info.experts[e]
        model = self._load(entry.dir, entry.weights_sha256, f"expert {e}")
        while len(self._experts) >= self.max_loaded_experts:
            self._experts.popitem(last=False)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._experts[e] = model
        return model

    def _load(self, directory: Path, sha: str | None, what: str) -> Transformer:
        root = self.info.root
        weights = directory / WEIGHTS_FILE
        hint = f"re-train {what} and rebuild the bundle (`smalltalk run` redoes missing stages)"
        if not weights.is_file():
            raise SmallTalkError(f"bundle {root}: {what} is missing ({weights} not found); {hint}")
        digest = sha256_file(weights) if self.verify else None  # hashed once: bundle.json and config.json
        if sha and digest and digest != sha:
            raise SmallTalkError(f"bundle {root}: {what} is corrupt ({weights} does not match the sha256 in "
                                 f"bundle.json); {hint}")
        try:
            model, _ = load_model_dir(directory, device=self.device, verify=self.verify, weights_sha256=digest)
        except SmallTalkError as err:
            raise SmallTalkError(f"bundle {root}: {what} cannot be loaded: {err}") from None
        return model

    def status(self, verify: bool = False) -> list[dict]:
        """Per expert: training share, whether its files are present (and, with `verify`, match their
        sha256 in bundle.json), whether it is loaded. Reads no weights into memory."""
        out = []
        for x in self.info.experts:
            problem = self.info.expert_problem(x.index, verify)
            out.append({"expert": x.index, "dir": str(x.dir), "train_share": x.train_share, "problem": problem,
                        "loaded": x.index in self._experts})
        return out

    # -- routing ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the bundle's tokenizer (no BOS/EOS; a literal "<eos>" stays text)."""
        return self.tokenizer.encode(text)

    def check_prefix_len(self, prefix_len: int | None) -> int:
        """M-hat: `prefix_len` or the bundle's M; with the EOS boundary the window must fit the routers' context."""
        m = self.info.prefix_len if prefix_len is None else prefix_len
        return rule.check_prefix_len(m, {"the routers' context (with its EOS)": self.routers.config.max_seq_len},
                                     offset=1)

    def route_ids(self, prompts: Sequence[Sequence[int]], prefix_len: int | None = None) -> list[Route]:
        """Route prompts given as token ids (see the module docstring for the rule)."""
        m = self.check_prefix_len(prefix_len)
        routes: list[Route | None] = [None] * len(prompts)
        windows, rows = [], []
        for i, ids in enumerate(prompts):
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
            if bad:
                raise SmallTalkError(f"prompt {i}: token id {bad[0]} outside the vocabulary (size "
                                     f"{self.info.vocab_size}); encode prompts with the bundle's tokenizer")
            window = rule.prompt_window(ids, self.eos_id, m)
            if not window:  # no routing evidence: the fallback expert
                routes[i] = Route(self.info.fallback_expert, np.zeros(self.num_experts), 0, len(ids), fallback=True)
                continue
            windows.append(window)
            rows.append((i, len(ids)))
        if windows:
            width = max(len(w) for w in windows)
            padded = np.zeros((len(windows), width), dtype=np.int64)  # (N, 1 + min(len, M-hat)), right padded
            for n, w in enumerate(windows):
                padded[n, :len(w)] = w
            scores = router_scores(self.routers, padded, [len(w) for w in windows])  # (N, E), Eq. 8
            best = rule.route(scores)  # Eq. 7
            for n, (i, total) in enumerate(rows):
                routes[i] = Route(int(best[n]), scores[n], len(windows[n]) - 1, total)
        return routes  # type: ignore[return-value]

    def route(self, prompt: str | Sequence[int], prefix_len: int | None = None) -> Route:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.route_ids([ids], prefix_len)[0]

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 100, *, prefix_len: int | None = None,
                 expert: int | None = None, on_long_prompt: str = "truncate", **kwargs) -> MixtureGeneration:
        """Route `prompt` (unless `expert` forces one) and continue it with the chosen expert.

        Extra keyword arguments go to `smalltalk.model.generate.generate` (temperature, top_k, top_p,
        stop, seed, greedy, ...).
        """
        from ..model.generate import generate

        if on_long_prompt not in LONG_PROMPT_POLICIES:
            raise SmallTalkError(f"on_long_prompt={on_long_prompt!r}; choose one of {', '.join(LONG_PROMPT_POLICIES)}")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if expert is None:
            route = self.route_ids([ids], prefix_len)[0]
        else:
            if not 0 <= expert < self.num_experts:
                raise SmallTalkError(f"expert={expert} does not exist; the bundle has experts 0..{self.num_experts - 1}")
            route = Route(expert, np.zeros(self.num_experts), 0, len(ids))
        model = self.expert(route.expert)
        if on_long_prompt == "error" and len(ids) > model.config.max_seq_len:
            raise SmallTalkError(f"prompt has {len(ids)} tokens, more than the experts' context "
                                 f"({model.config.max_seq_len}); shorten it or use on_long_prompt='truncate'")
        result = generate(model, self.tokenizer, ids, max_new_tokens, eos_id=self.eos_id, **kwargs)
        return MixtureGeneration(route, result)
