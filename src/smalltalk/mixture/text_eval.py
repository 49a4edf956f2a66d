"""Perplexity of a mixture (and its dense baseline), or of one model, on your own text, in one call.

    evaluate_text("runs/quickstart/bundle", ["my_docs/"], dense="runs/quickstart/dense/model")

Text is read with the same readers as `prepare` (.txt/.md/.jsonl[.gz/.zst]/.parquet files, a directory,
a glob, or ``hf:NAME``), tokenized with the bundle's own tokenizer, and packed per group into sequences
of the models' context (EOS after every document, as in training); each group's last, shorter
sequence is scored too, so no text is dropped. A group is the document's ``domain`` field when it has
one, else its file name. Each sequence is routed by its first M tokens (as the test split is in
`eval-mixture --run`) and scored by that expert only, so the cost is one expert plus the routers per
sequence, and by the dense model. Reading, tokenizing and scoring are streamed: memory is bounded by
`batch_size` sequences, not by the input.

Returns per group and in total: sequences, tokens, mixture / dense perplexity and their difference,
requests per expert; per expert: its share and perplexity next to dense on its sequences.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..data.encode import document_pieces
from ..data.readers import iter_documents
from ..errors import SmallTalkError
from ..routing import rule
from .bundle import is_bundle
from ..train.evaluate import perplexity
from .inference import Mixture, resolve_device, router_scores, token_logprobs
from .scores import improvement_pct


@dataclass
class _Tally:
    seqs: int = 0
    tokens: int = 0
    nll: float = 0.0
    dense_nll: float = 0.0
    experts: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, tokens: int, nll: float, dense_nll: float | None, expert: int | None) -> None:
        self.seqs += 1
        self.tokens += tokens
        self.nll += nll
        self.dense_nll += dense_nll or 0.0
        if expert is not None:
            self.experts[expert] += 1

    def row(self, with_dense: bool) -> dict:
        ppl = perplexity(self.nll, self.tokens)
        out = {"num_seqs": self.seqs, "num_tokens": self.tokens, "ppl": ppl}
        if with_dense:
            dense = perplexity(self.dense_nll, self.tokens)
            out.update(dense_ppl=dense, improvement_pct=improvement_pct(dense, ppl))
        if self.experts:
            out["experts"] = {int(e): n for e, n in sorted(self.experts.items())}
        return out


def text_sequences(sources: Sequence[str], tokenizer, seq_len: int, *, text_field: str = "text",
                   group_field: str = "domain", max_doc_chars: int = 1_000_000) -> Iterator[tuple[str, list[int]]]:
    """(group, token ids) sequences of `seq_len` tokens packed per group, then each group's remainder (>= 2)."""
    buffers: dict[str, list[int]] = defaultdict(list)
    for doc in iter_documents(list(sources), text_field, (group_field,) if group_field else ()):
        group = str(doc.meta.get(group_field)) if group_field in doc.meta else Path(doc.source).name
        buf = buffers[group]
        for piece, last in document_pieces(doc.text, max_doc_chars):
            buf.extend(tokenizer.encode(piece))
            if last:
                buf.append(tokenizer.eos_id)
            while len(buf) >= seq_len:
                yield group, buf[:seq_len]
                del buf[:seq_len]
    for group, buf in buffers.items():
        if len(buf) >= 2:
            yield group, buf


def evaluate_text(model: str | Path, sources: Sequence[str], *, dense: str | Path | None = None,
                  batch_size: int = 16, max_seqs: int = 0, device: str = "auto", text_field: str = "text",
                  group_field: str = "domain", progress: bool = True) -> dict:
    """Score `sources` with a mixture bundle (or a run directory holding one) and optionally its dense model,
    or with one model directory; see the module docstring."""
    from ..model.io import load_with_tokenizer
    from ..progress import progress as progress_bar
    from ..model.io import load_model_dir

    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    if batch_size < 1:
        raise SmallTalkError(f"batch_size={batch_size} must be >= 1")
    dev = resolve_device(device)
    path = Path(model)
    if not is_bundle(path) and is_bundle(path / "bundle"):
        path = path / "bundle"
    mixture, single = None, None
    if is_bundle(path):
        mixture = Mixture.load(path, device=dev, max_loaded_experts=10**6)
        tokenizer, seq_len, prefix_len = mixture.tokenizer, mixture.info.seq_len, mixture.info.prefix_len
        vocab = mixture.info.vocab_size
    else:
        single, tokenizer = load_with_tokenizer(path, dev)
        seq_len, prefix_len, vocab = single.config.max_seq_len, None, single.config.vocab_size
    dense_model = None
    if dense is not None:
        dense_model, _ = load_model_dir(dense, device=dev)
        if dense_model.config.vocab_size != vocab:
            raise SmallTalkError(f"{dense}: vocabulary {dense_model.config.vocab_size} differs from {path}'s ({vocab}); "
                                 "compare models trained with the same tokenizer")
    groups: dict[str, _Tally] = defaultdict(_Tally)
    experts: dict[int, _Tally] = defaultdict(_Tally)
    total = _Tally()
    bar = progress_bar(desc="scoring", unit="seqs", enabled=progress)

    def score(batch: list[tuple[str, list[int]]]) -> None:
        tokens = np.array([ids for _, ids in batch], dtype=np.int64)  # (B, S), one length per batch
        if mixture is not None:
            window = tokens[:, :prefix_len]
            routes = rule.route(router_scores(mixture.routers, window, [window.shape[1]] * len(batch)))
        else:
            routes = np.zeros(len(batch), dtype=np.int64)
        nll = np.zeros(len(batch))
        for e in np.unique(routes):
            rows = routes == e
            m = mixture.expert(int(e)) if mixture is not None else single
            nll[rows] = -token_logprobs(m, tokens[rows], batch_size=batch_size, device=dev).sum(axis=1)
        dense_nll = (-token_logprobs(dense_model, tokens, batch_size=batch_size, device=dev).sum(axis=1)
                     if dense_model is not None else [None] * len(batch))
        if not np.isfinite(nll).all() or (dense_model is not None and not np.isfinite(dense_nll).all()):
            raise SmallTalkError(f"{path}: NaN or infinite log-likelihoods; its weights are damaged or it diverged")
        for (group, ids), e, x, d in zip(batch, routes, nll, dense_nll):
            expert = int(e) if mixture is not None else None
            for tally in (groups[group], total):
                tally.add(len(ids) - 1, float(x), d, expert)
            if mixture is not None:
                experts[int(e)].add(len(ids) - 1, float(x), d, None)
        bar.update(len(batch))

    pending: list[tuple[str, list[int]]] = []
    count = 0
    for group, ids in text_sequences(sources, tokenizer, seq_len, text_field=text_field, group_field=group_field):
        if pending and len(ids) != len(pending[0][1]):
            score(pending)
            pending = []
        pending.append((group, ids))
        count += 1
        if len(pending) >= batch_size:
            score(pending)
            pending = []
        if max_seqs and count >= max_seqs:
            break
    if pending:
        score(pending)
    bar.close()
    if total.seqs == 0:
        raise SmallTalkError(f"{', '.join(map(str, sources))}: no text to score (fewer than 2 tokens)")
    with_dense = dense_model is not None
    result = {"model": str(path), "kind": "mixture" if mixture is not None else "model", "dense": str(dense) if dense else None,
              "sources": [str(s) for s in sources], "seq_len": seq_len, "prefix_len": prefix_len,
              "total": total.row(with_dense), "groups": {g: t.row(with_dense) for g, t in sorted(groups.items())}}
    if mixture is not None:
        result["per_expert"] = [{"expert": e, "share": experts[e].seqs / total.seqs, **experts[e].row(with_dense)}
                                for e in range(mixture.num_experts) if experts[e].seqs]
    return result


def describe(result: dict) -> list[str]:
    """Lines to print: total, per expert, per group."""
    def line(name: str, r: dict) -> str:
        text = f"{name}: {r['num_seqs']} sequences, {r['num_tokens']} tokens, ppl {r['ppl']:.3f}"
        if "dense_ppl" in r:
            better = r["improvement_pct"]
            text += (f" vs dense {r['dense_ppl']:.3f} ({better:.2f}% lower)" if better >= 0 else
                     f" vs dense {r['dense_ppl']:.3f} ({-better:.2f}% higher (worse))")
        if "experts" in r and result["kind"] == "mixture":
            text += "; routed to " + ", ".join(f"expert {e}: {n}" for e, n in r["experts"].items())
        return text

    who = "mixture" if result["kind"] == "mixture" else "model"
    lines = [line(f"{who}, all text", result["total"])]
    for r in result.get("per_expert", []):
        lines.append(line(f"  expert {r['expert']} ({100 * r['share']:.1f}% of sequences)", r))
    for group, r in result["groups"].items():
        lines.append(line(f"  {group}", r))
    return lines
