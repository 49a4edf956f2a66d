"""`smalltalk prepare`: corpus -> tokenizer -> packed token shards + manifest (see smalltalk.data.prepare)."""

from __future__ import annotations

import argparse
import sys

from ..errors import SmallTalkError
from ..data.prepare import prepare
from ..data.prepare_config import PREPARE_PRESETS, preset


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into packed token shards",
        description="Train (or load) a byte-level BPE tokenizer, tokenize the corpus in parallel and pack it into "
                    "fixed-length sequences: <out>/{train,valid,test}/shard_*.bin + tokenizer.json + manifest.json. "
                    "Re-running with the same inputs does nothing.")
    p.add_argument("--preset", choices=sorted(PREPARE_PRESETS), default="cpu",
                   help="sizes: tiny (seq 128, vocab 2048, first 192 KB per file), cpu (256 / 8192, full corpus), "
                        "paper (1024 / 32000) (default: cpu)")
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="directories, files (.txt .md .jsonl .jsonl.gz .jsonl.zst .parquet), globs or "
                        "hf:<name>[:<config>][:<split>] (default: $SMALLTALK_CORPUS, else ../shared/corpus)")
    p.add_argument("--out", metavar="DIR", help="output data directory (default: runs/data-<preset>)")
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer")
    p.add_argument("--seq-len", type=int, help="tokens per packed sequence")
    p.add_argument("--text-field", help="JSONL key / Parquet column holding the text (default: text)")
    p.add_argument("--domain-field", help="metadata field labelling each document's domain (default: domain; "
                                          "'' for none)")
    p.add_argument("--max-bytes-per-file", type=int, metavar="N",
                   help="read only the first N bytes of text of each file per split")
    p.add_argument("--max-doc-chars", type=int, metavar="N",
                   help="tokenize longer documents in pieces of N characters (bounds memory; default 1,000,000)")
    p.add_argument("--tokenizer-sample-bytes", type=int, metavar="N", help="bytes of text to train the tokenizer on")
    p.add_argument("--seqs-per-shard", type=int, metavar="N", help="sequences per shard file")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: one per core)")
    p.add_argument("--seed", type=int, help="salts the document-hash split of corpora without splits")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and unreadable files, reporting how "
                                                           "many, instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.tokenizer and args.vocab_size:
        raise SmallTalkError("--vocab-size conflicts with --tokenizer: the vocabulary is the tokenizer file's")
    overrides = {
        "corpus": tuple(args.corpus) if args.corpus else None,
        "out_dir": args.out,
        "tokenizer_file": args.tokenizer,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "text_field": args.text_field,
        "meta_fields": None if args.domain_field is None else ((args.domain_field,) if args.domain_field else ()),
        "max_bytes_per_file": args.max_bytes_per_file, "max_doc_chars": args.max_doc_chars,
        "tokenizer_sample_bytes": args.tokenizer_sample_bytes,
        "seqs_per_shard": args.seqs_per_shard,
        "num_workers": args.workers,
        "seed": args.seed,
        "skip_bad": args.skip_bad or None,
        "progress": False if args.no_progress else None,
    }
    cfg = preset(args.preset, **{k: v for k, v in overrides.items() if v is not None})
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    manifest = prepare(cfg, log=log)
    out = cfg.resolved_out_dir()
    for split, info in manifest["splits"].items():
        print(f"{split:5s}: {info['num_seqs']:8d} sequences x {manifest['seq_len']} tokens "
              f"({info['num_documents']} documents, {info['num_bytes'] / 1e6:.1f} MB of text)")
    stats = manifest["stats"]
    if stats.get("skipped") or stats.get("skipped_files"):
        print(f"skipped {stats['skipped']} bad records and {stats['skipped_files']} unreadable files (--skip-bad)")
    if stats.get("invalid_utf8"):
        print(f"{stats['invalid_utf8']} documents had invalid UTF-8 (decoded with replacement characters)")
    print(f"wrote {out} (vocab {manifest['vocab_size']}, tokenizer {manifest['tokenizer']['sha256'][:12]})")
    return 0
