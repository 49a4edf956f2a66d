"""One routing sum: a near-tie between two routers is decided the same way by the scores EM and sharding
use (`score_dataset`), by the evaluation (`router_token_logprobs` + `rule.window_scores`) and by serving
(`Mixture.route_ids`, what `smalltalk serve` calls)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import torch

from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.mixture.bundle import build_bundle
from smalltalk.mixture.inference import Mixture, router_token_logprobs
from smalltalk.model.io import load_model_dir, save_model_dir
from smalltalk.routing import rule
from smalltalk.routing.assign import balanced_assignment
from smalltalk.routing.score import StackedRouters, score_dataset

M = 32


class Windows:
    """The `TokenDataset` surface `score_dataset` reads: (N, M) routing windows."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.seq_len = tokens, tokens.shape[1]

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, indices) -> np.ndarray:
        return self.tokens[np.asarray(indices)]


def windows_of_real_text(corpus_dir, tokenizer, n: int = 48) -> np.ndarray:
    rows = []
    for domain in ("wiki_en", "code_python", "legal_en"):
        with gzip.open(corpus_dir / "valid" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                ids = tokenizer.encode(json.loads(line)["text"])
                if len(ids) >= M - 1:
                    rows.append([tokenizer.eos_id] + ids[:M - 1])  # a document start, as packed data has it
                if len(rows) % (n // 3) == 0:
                    break
    return np.asarray(rows[:n], dtype=np.int64)  # (n, M)


def test_a_near_tie_routes_the_same_in_em_sharding_evaluation_and_serving(tiny_mixture, corpus_dir, tmp_path):
    router, _ = load_model_dir(tiny_mixture["bundle"] / "routers" / "router_0")
    twin, _ = load_model_dir(tiny_mixture["bundle"] / "routers" / "router_0")
    with torch.no_grad():  # a near-copy: every score differs from router 0's by ~1e-4 nats, either way
        twin.embed_in.weight.add_(1e-6 * torch.randn(twin.embed_in.weight.shape, generator=torch.Generator().manual_seed(0)))
    dirs = [save_model_dir(tmp_path / f"router_{e}", m, tiny_mixture["tokenizer"]) for e, m in enumerate((router, twin))]
    bundle = build_bundle(tmp_path / "bundle", router_dirs=dirs, expert_dirs=tiny_mixture["experts"],
                          tokenizer_file=tiny_mixture["tokenizer"], prefix_len=M, train_seqs=[10, 10])
    tokenizer = load_tokenizer(tiny_mixture["tokenizer"])
    tokens = windows_of_real_text(corpus_dir, tokenizer)
    stacked = StackedRouters([router, twin])

    em_and_sharding = score_dataset(stacked, Windows(tokens), np.arange(len(tokens)), M)  # (N, 2)
    evaluation = rule.window_scores(router_token_logprobs(stacked, tokens), M)  # (N, 2)
    mixture = Mixture.load(bundle.root)
    serving = mixture.route_ids([list(t) for t in tokens], M - 1)  # EOS + M - 1 tokens: the same windows

    gap = np.abs(evaluation[:, 0] - evaluation[:, 1])
    assert gap.max() < 1e-2 and len(set(rule.route(evaluation))) == 2  # near-ties, decided both ways
    assert em_and_sharding.dtype == evaluation.dtype == np.float64
    np.testing.assert_array_equal(em_and_sharding, evaluation)  # one sum: the same bits, so every tie agrees
    np.testing.assert_array_equal(np.stack([r.scores for r in serving]), evaluation)
    routes = rule.route(evaluation)
    assert [r.expert for r in serving] == routes.tolist()
    assert rule.route(em_and_sharding).tolist() == routes.tolist()
    # Balanced assignment with room for everyone is the argmax (EM line 9, sharding) on these scores too.
    assert balanced_assignment(em_and_sharding, capacities=[len(tokens)] * 2).tolist() == routes.tolist()
