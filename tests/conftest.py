"""Shared fixtures: the real sample corpus, and small prepared token datasets built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smalltalk.paths import default_corpus_dir

# One intra-op thread per test process: CI runs `pytest -n 2` on 2 cores, and oversubscribed
# threads make small ops on this CPU tens of times slower (measured in test_generate).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    path = default_corpus_dir()
    if not (path / "train").is_dir():
        pytest.fail(f"sample corpus not found at {path}; set SMALLTALK_CORPUS")
    return path


# -- a small BPE tokenizer (1024) trained on a few validation documents, once per test module ----------------

@pytest.fixture(scope="module")
def text_domains() -> tuple[str, ...]:
    """Corpus domains that `tokenizer_file` is trained on; a test module overrides this fixture to pick others."""
    return ("wiki_en", "code_python", "novels_fr", "legal_en", "math_en")


@pytest.fixture(scope="module")
def tokenizer_file(corpus_dir, text_domains, tmp_path_factory) -> Path:
    from sample_text import documents

    from smalltalk.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(documents(corpus_dir, "valid", text_domains, 30), 1024, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    from smalltalk.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_file)


# -- a tiny trained mixture (2 routers, 2 experts) + dense baseline, for evaluation tests ---------------

def _build_tiny_mixture(root: Path, corpus: Path) -> dict:
    """Byte-level BPE tokenizer (2048) trained on English wiki + Python code; routers, experts and a dense
    model trained for a few dozen AdamW steps: router/expert 0 on wiki_en, 1 on code_python, dense on both;
    then a mixture bundle (prefix_len 32). Real text, real training steps; ~10 s on 2 idle cores."""
    import gzip
    import itertools
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from smalltalk.mixture.bundle import build_bundle
    from smalltalk.model.config import preset
    from smalltalk.model.io import save_model_dir
    from smalltalk.model.transformer import Transformer

    docs = {}
    for e, domain in enumerate(("wiki_en", "code_python")):
        texts, size = [], 0
        with gzip.open(corpus / "train" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size > 400_000:
                    break
        docs[e] = texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(itertools.chain(*docs.values()), trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|pad|>", "<|bos|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    root.mkdir(parents=True, exist_ok=True)
    tok_file = root / "tokenizer.json"
    tok.save(str(tok_file))
    eos = tok.token_to_id("<|endoftext|>")
    streams = {e: torch.tensor([t for d in ds for t in tok.encode(d).ids + [eos]]) for e, ds in docs.items()}
    streams[2] = torch.cat([streams[0], streams[1]])

    def train(cfg, stream, name, seed, steps=24, S=64):
        torch.manual_seed(seed)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - S - 1, (8,), generator=gen)
            batch = torch.stack([stream[s:s + S + 1] for s in starts])  # (8, S + 1), S < the 128 window
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return save_model_dir(root / name, model, tok_file)

    V = tok.get_vocab_size()
    expert_cfg = preset("tiny", vocab_size=V)
    router_cfg = preset("tiny", vocab_size=V, hidden_size=32, num_layers=1, num_heads=2)
    routers = [train(router_cfg, streams[e], f"router_{e}", e, steps=16) for e in (0, 1)]
    experts = [train(expert_cfg, streams[e], f"expert_{e}", 10 + e) for e in (0, 1)]
    dense = train(expert_cfg, streams[2], "dense", 20)
    bundle = build_bundle(root / "bundle", router_dirs=routers, expert_dirs=experts, tokenizer_file=tok_file,
                          prefix_len=32, train_seqs=[len(streams[0]), len(streams[1])])
    return {"bundle": bundle.root, "dense": dense, "experts": experts, "tokenizer": tok_file}


@pytest.fixture(scope="session")
def tiny_mixture(tmp_path_factory, corpus_dir) -> dict:
    """{"bundle": Path, "dense": Path, "experts": [Path, Path], "tokenizer": Path}, built once per test run
    (shared by pytest-xdist workers through a file lock)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/popen-gwK -> pytest-N: common to the workers of this run only
    root = shared / "tiny_mixture"
    with FileLock(str(shared / "tiny_mixture.lock")):
        if not (root / "bundle" / "bundle.json").is_file():
            _build_tiny_mixture(root, corpus_dir)
    return {"bundle": root / "bundle", "dense": root / "dense",
            "experts": [root / "expert_0", root / "expert_1"], "tokenizer": root / "tokenizer.json"}


# -- a tiny prepared token dataset (smalltalk prepare --preset tiny) ---------------------------------------

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_dir) -> Path:
    """Path of a token dataset prepared with the `tiny` preset from the sample corpus (seq_len 128, vocab 2048,
    the first 192 KB of each corpus file: ~5.5k train / 4.8k valid / 4.7k test sequences, 10 domains).
    Built once per test run (shared by pytest-xdist workers through a file lock); treat it as read-only:
    copy it before changing anything. ~5 s on 2 idle cores."""
    from filelock import FileLock

    from smalltalk.data.prepare import prepare
    from smalltalk.data.prepare_config import preset

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/popen-gwK -> pytest-N: common to the workers of this run only
    root = shared / "tiny_data"
    with FileLock(str(shared / "tiny_data.lock")):
        prepare(preset("tiny", corpus=(str(corpus_dir),), out_dir=str(root), progress=False))  # idempotent
    return root
