"""The ``smalltalk`` model for lm-evaluation-harness: a mixture bundle (routed per request) or one model.

    python -m smalltalk.evaluation.lm_eval_cli --model smalltalk \\
        --model_args bundle=runs/x/bundle,prefix_len=32 --tasks blimp_offline --device cpu --batch_size 32
    python -m smalltalk.evaluation.lm_eval_cli --model smalltalk --model_args model=runs/x/dense/model ...

Importing this module registers the class under the name ``smalltalk`` (lm-eval 0.4 has no plugin
entry point for models, so something must import it first: the CLI wrapper above, or
``smalltalk eval-downstream``, or your own script).

Model arguments: ``bundle=PATH`` (a mixture bundle, or a run directory holding ``bundle/``) or
``model=PATH`` (a model directory: an expert or the dense baseline), ``prefix_len`` (M-hat, routing
tokens; default the bundle's M), ``max_length`` (use a shorter window than the model's),
``max_gen_toks`` (default 256), ``max_loaded_experts`` (experts kept in memory, default 1),
``empty_context`` (``sequence`` or ``fallback``, below), ``seed`` (for sampled generation), plus
lm-eval's ``batch_size`` and ``device``.

Routing (paper §2, Eq. 4-8). Every request is routed on its own, by the first M-hat tokens of what is
known before the answer - its context - so requests of one task can go to different experts. Then
all requests are grouped by expert and each expert scores its group in batches. Precisely:

- loglikelihood(context, continuation): routed by the context. With an empty context (BLiMP, where
  each sentence is scored on its own) the scored sentence is the whole sequence, so by default it is
  routed by its own prefix - the mixture's probability of a sequence, as in the perplexity evaluation
  (so the two sentences of a BLiMP pair may be scored by different experts). With the model argument
  ``empty_context=fallback`` such requests go to the bundle's fallback expert instead (the strict
  reading: no context, no routing evidence).
- loglikelihood_rolling(text): routed by the text's prefix; every window of it uses that expert.
- generate_until(context): routed by the context; an empty context goes to the bundle's fallback
  expert (no routing evidence: the expert with the largest training share).

Token conventions (as lm-eval's Hugging Face model). No special token is added to a non-empty
context; trailing spaces of a context move to the continuation. An empty context is replaced by EOS,
the document boundary every training document followed. A context + continuation longer than the
window is left-truncated (the oldest context tokens go); a continuation longer than the whole window
is scored in rolling windows (see `scoring.py`) instead of failing. ``generate_until`` keeps the last
``max(max_length - max_gen_toks, max_length // 2)`` context tokens, greedy unless the task asks to
sample, and stops at EOS, at a stop sequence, or after ``max_gen_toks`` tokens - with no stop
sequence it simply runs to EOS or ``max_gen_toks``; past the window the oldest half is dropped
(`smalltalk.model.generate`).

`routing_counts` records, per task, how many requests each expert received.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from ..progress import progress

from ..errors import SmallTalkError
from ..model.generate import decode, encode, generate_batch
from .backend import open_models
from .scoring import make_windows, score_windows

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
EMPTY_CONTEXT_RULES = ("sequence", "fallback")
SCORE_CHUNK = 2048  # windows per progress-bar update


def _ensure_builtin_models_registered() -> None:
    # lm-eval fills its registry with the built-in models (hf, vllm, ...) lazily, only when the registry
    # is empty at the first lookup; registering ours first would hide them, so load them now.
    import lm_eval.models  # noqa: F401


_ensure_builtin_models_registered()


def _batch_size(value: Any) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise SmallTalkError(f"batch_size={value!r} must be a positive integer or 'auto'") from None
    if size < 1:
        raise SmallTalkError(f"batch_size={value!r} must be a positive integer or 'auto'")
    return size


@register_model("smalltalk")
class SmallTalkLM(TemplateLM):
    backend = "causal"

    def __init__(self, bundle: str | None = None, model: str | None = None, prefix_len: int | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 max_loaded_experts: int = 1, empty_context: str = "sequence", seed: int = 1234, **unknown: Any):
        super().__init__()
        if unknown:
            raise SmallTalkError(f"unknown smalltalk model argument(s) {sorted(unknown)}; known: bundle, model, "
                                 "prefix_len, max_length, max_gen_toks, max_loaded_experts, empty_context, seed, batch_size, "
                                 "device")
        if empty_context not in EMPTY_CONTEXT_RULES:
            raise SmallTalkError(f"empty_context={empty_context!r}; choose one of {', '.join(EMPTY_CONTEXT_RULES)}")
        self.empty_context = empty_context
        self.batch_size = _batch_size(batch_size)
        for name, value in (("max_gen_toks", max_gen_toks), ("max_loaded_experts", max_loaded_experts)):
            if not (isinstance(value, int) and value >= 1):
                raise SmallTalkError(f"{name}={value!r} must be a positive integer")
        self.max_gen_toks = max_gen_toks
        self.models = open_models(bundle=bundle, model=model, prefix_len=prefix_len, device=device,
                                      max_loaded_experts=max_loaded_experts)
        self._device = self.models.device
        window = self.models.max_len
        if max_length is not None and not (isinstance(max_length, int) and 2 <= max_length <= window):
            raise SmallTalkError(f"max_length={max_length!r} must be an integer in [2, {window}] (the model's window)")
        self._max_length = max_length or window
        self.seed = int(seed)
        self.tokenizer = self.models.tokenizer
        self.routing_counts: dict[str, Counter] = defaultdict(Counter)
        """task name -> Counter(expert index -> number of requests routed to it)."""

    # -- TemplateLM plumbing --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.models.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"smalltalk:{self.models.path}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode(self.tokenizer, string)

    def tok_decode(self, tokens: list[int]) -> str:
        return decode(self.tokenizer, tokens)

    def get_model_info(self) -> dict:
        return {"smalltalk": {**self.models.describe(), "empty_context": self.empty_context},
                "batch_size": self.batch_size, "max_length": self.max_length}

    # -- routing --------------------------------------------------------------------------------------

    def _route(self, requests: list[Instance], sequences: list[list[int]]) -> list[int]:
        """Expert per request; identical routing sequences (the choices of one question) are routed once."""
        unique = list(dict.fromkeys(tuple(s) for s in sequences))
        experts = dict(zip(unique, (r.expert for r in self.models.route([list(u) for u in unique]))))
        chosen = [experts[tuple(s)] for s in sequences]
        for req, e in zip(requests, chosen):
            self.routing_counts[req.task_name or "unknown"][e] += 1
        return chosen

    # -- scoring --------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]], experts: list[int],
               disable_tqdm: bool = False, desc: str = "") -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (context, continuation) pair, each on its expert."""
        results = [(0.0, True)] * len(pairs)  # an empty continuation has probability 1
        by_expert: dict[int, list[tuple[int, Any]]] = defaultdict(list)
        for i, (context, continuation) in enumerate(pairs):
            for w in make_windows(context or [self.eot_token_id], continuation, self.max_length):
                by_expert[experts[i]].append((i, w))
        bar = progress(total=sum(map(len, by_expert.values())), desc=desc, unit="req", enabled=not disable_tqdm)
        sums: dict[int, list] = {}
        for e in sorted(by_expert):
            model = self.models.expert(e)
            items = by_expert[e]
            for start in range(0, len(items), SCORE_CHUNK):
                chunk = items[start:start + SCORE_CHUNK]
                scored = score_windows(model, [w for _, w in chunk], batch_size=self.batch_size,
                                       device=self.device)
                for (i, _), (logp, greedy) in zip(chunk, scored):
                    total = sums.setdefault(i, [0.0, True])
                    total[0] += logp
                    total[1] = total[1] and greedy
                bar.update(len(chunk))
        bar.close()
        for i, (logp, greedy) in sums.items():
            results[i] = (logp, greedy)
        return results

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs, route_seqs = [], []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation)
                ctx = [self.eot_token_id]
                # The scored text is the whole sequence (default), or no evidence -> the fallback expert.
                route_seq = cont if self.empty_context == "sequence" else []
            else:
                ctx, cont = self._encode_pair(context, continuation)
                ctx = ctx or [self.eot_token_id]  # a whitespace-only context
                route_seq = ctx
            pairs.append((ctx, cont))
            route_seqs.append(route_seq)
        results = self._score(pairs, self._route(requests, route_seqs), disable_tqdm, "loglikelihood")
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # TemplateLM's abstract hook, for callers that pass pre-tokenized ((ctx, cont), ctx_ids, cont_ids);
        # without Instances there is no task name, and each pair is routed by its context.
        fake = [Instance("loglikelihood", {}, args, i, ("tokens", i, 1)) for i, (args, _, _) in enumerate(requests)]
        pairs = [(list(ctx) or [self.eot_token_id], list(cont)) for _, ctx, cont in requests]
        return self._score(pairs, self._route(fake, [p[0] for p in pairs]), disable_tqdm, "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0]) for req in requests]
        experts = self._route(requests, docs)
        results = self._score([([self.eot_token_id], d) for d in docs], experts, disable_tqdm,
                              "loglikelihood_rolling")
        out = []
        for req, (logp, _) in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, logp)
            out.append(logp)
        return out

    # -- generation -----------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        contexts, settings = [], []
        for req in requests:
            context, gen_kwargs = req.args
            if not isinstance(gen_kwargs, dict):
                raise SmallTalkError(f"generate_until request {req.task_name}/{req.doc_id}: generation kwargs must "
                                     f"be a dict, got {type(gen_kwargs).__name__}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            settings.append((tuple(until), int(kwargs["max_gen_toks"]), sample,
                             float(kwargs.get("temperature") or 0), kwargs.get("top_k"), kwargs.get("top_p")))
            contexts.append(self.tok_encode(context))
        experts = self._route(requests, contexts)

        # Group by expert (one model in memory at a time) and generation settings, longest prompt first.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (e, s) in enumerate(zip(experts, settings)):
            groups[(e, s)].append(i)
        outputs: list[str | None] = [None] * len(requests)
        bar = progress(total=len(requests), desc="generate_until", unit="req", enabled=not disable_tqdm)
        for (e, (until, max_gen, sample, temperature, top_k, top_p)), idx in sorted(groups.items(),
                                                                                  key=lambda kv: kv[0][0]):
            model = self.models.expert(e)
            keep = max(self.max_length - max_gen, self.max_length // 2)
            idx.sort(key=lambda i: -len(contexts[i]))
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                prompts = [contexts[i][-keep:] for i in batch]  # [] -> generate starts from EOS
                results = generate_batch(model, self.tokenizer, prompts, max_gen, greedy=not sample,
                                         temperature=temperature if sample else 1.0, top_k=top_k, top_p=top_p,
                                         stop=list(until), seed=self.seed + start if sample else None,
                                         eos_id=self.eot_token_id)
                for i, r in zip(batch, results):
                    outputs[i] = r.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
                bar.update(len(batch))
        bar.close()
        return outputs  # type: ignore[return-value]
