"""Helpers of the analysis tests: real corpus text, and a finished tiny SmallTalk run built once per test
session (on disk, under a file lock, so both analysis test modules and pytest-xdist workers share it).

It is the real pipeline (`smalltalk.run.pipeline.run_pipeline`) with the `tiny` run preset on a quarter
of the `tiny` data (the first 48 KB of each corpus file: ~1.4k train sequences of 128 tokens, 10 domains) and a
few optimizer steps: 4 EM routers trained on M = 32 prefixes, the whole train split sharded, 4 experts, the
dense baseline, the bundle and the evaluation on 64 test sequences. ~30 s on 2 idle cores.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

EVAL_SEQS = 64

RUN_CONFIG = {
    "preset": "tiny", "name": "analysis-test", "seed": 0, "num_experts": 4, "prefix_len": 32,
    "data": {"preset": "tiny", "max_bytes_per_file": 48_000, "num_workers": 1, "progress": False},
    "routers": {"iterations": 2, "steps_per_iteration": 4, "seqs_per_iteration": 512, "heldout_seqs": 16},
    "expert_train": {"max_steps": 6, "warmup_steps": 2, "eval_every": 0, "eval_batches": 0, "checkpoint_every": 0},
    "eval": {"max_seqs": EVAL_SEQS, "prefix_lens": [8], "top_k": 0},
    "device": "cpu",
}


def build_tiny_run(tmp_path_factory, corpus_dir: Path) -> Path:
    from filelock import FileLock

    from smalltalk.run.config import RunConfig
    from smalltalk.run.pipeline import run_pipeline

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "analysis_tiny_run"
    with FileLock(str(shared / "analysis_tiny_run.lock")):
        if not (root / "eval" / "results.json").is_file():
            cfg = dict(RUN_CONFIG, data=dict(RUN_CONFIG["data"], corpus=[str(corpus_dir)]))
            run_pipeline(RunConfig.from_dict(cfg), root, until="evaluate", progress=False, log=lambda msg: None)
    return root


def corpus_prefixes(corpus_dir: Path, split: str = "valid", chars: int = 400, per_domain: int = 60):
    """The first `chars` characters of the first `per_domain` documents of each domain, and domain ids."""
    texts, domains = [], []
    for d, path in enumerate(sorted((corpus_dir / split).glob("*.jsonl.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= per_domain:
                    break
                texts.append(json.loads(line)["text"][:chars])
                domains.append(d)
    return texts, np.array(domains)
