"""A whole mixture as Hugging Face directories: every expert, every router and (from a run) the dense model.

    export_bundle_hf("runs/quickstart/bundle", "hf/quickstart", dense="runs/quickstart/dense/model")

writes ``hf/quickstart/{expert-K,router-K,dense}/`` (each a GPT-NeoX directory that
``AutoModelForCausalLM`` loads without custom code) and ``bundle_hf.json``, which says how to route: score
each router's log-likelihood of EOS + the first M prompt tokens, answer with the argmax expert, send an
empty prompt to the fallback expert. The expert directories are what `vllm serve` loads behind
`smalltalk serve --expert-url` (docs/serving.md).
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_json
from ..model.hf_export import export_hf
from .bundle import read_bundle

ROUTING_RULE = ("Route a prompt by its first M tokens (prefix_len), preceded by the EOS token: each router scores "
                "the sum of log p(token | earlier tokens) over that window, and the expert of the highest-scoring "
                "router answers alone (paper Eq. 4-8, uniform prior, ties to the lower index). A prompt with no "
                "tokens goes to fallback_expert.")


def export_bundle_hf(bundle: str | Path, out: str | Path, dense: str | Path | None = None) -> dict:
    """Export every model of `bundle` (and `dense`) under `out`; returns the written bundle_hf.json."""
    info = read_bundle(bundle)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    experts = [f"expert-{e.index}" for e in info.experts]
    routers = [f"router-{r.index}" for r in info.routers]
    for entry, name in zip(info.experts, experts):
        export_hf(entry.dir, info.tokenizer_file, out / name)
    for entry, name in zip(info.routers, routers):
        export_hf(entry.dir, info.tokenizer_file, out / name)
    if dense is not None:
        export_hf(dense, info.tokenizer_file, out / "dense")
    manifest = {"format": "smalltalk-hf-mixture", "version": 1, "source": str(Path(bundle).resolve()),
                "num_experts": info.num_experts, "prefix_len": info.prefix_len, "seq_len": info.seq_len,
                "experts": experts, "routers": routers, "dense": "dense" if dense is not None else None,
                "fallback_expert": info.fallback_expert, "tokenizer_sha256": info.tokenizer_sha256,
                "routing": ROUTING_RULE}
    atomic_write_json(out / "bundle_hf.json", manifest)
    return manifest
