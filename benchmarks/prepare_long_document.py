"""`prepare` memory on one huge document: peak RSS for a 200 MB single-line text file.

The train split is one line of 200 MB (real corpus text of several domains, newlines replaced by
spaces), valid/test are small. `prepare` tokenizes documents longer than `max_doc_chars` (default
1,000,000) in pieces, so the tokenizer's memory no longer grows with the document; what is left grows
with it is reading the line itself (its bytes and its str). For scale, the same file cut to 20 MB is
also prepared with pieces disabled (`--max-doc-chars` larger than the file: the document tokenized whole).

    python benchmarks/prepare_long_document.py [--mb 200] [--whole-mb 20]

Each measurement is `smalltalk prepare --workers 1` in a child process; peak RSS is the child's
`ru_maxrss`. Writes benchmarks/results/prepare_long_document.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smalltalk.data.tokenizer import train_tokenizer
from _results import write_results
from smalltalk.paths import default_corpus_dir

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("wiki_en", "books_en", "code_python", "novels_fr", "legal_en")


def corpus_text(corpus: Path, split: str, chars: int) -> str:
    parts, size = [], 0
    for domain in DOMAINS:
        with gzip.open(corpus / split / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                parts.append(json.loads(line)["text"])
                size += len(parts[-1])
                if size > chars * (DOMAINS.index(domain) + 1) / len(DOMAINS):
                    break
    return " ".join(parts)


def make_corpus(root: Path, corpus: Path, mb: int, base: str) -> Path:
    """<root>/train/long.txt: one line of `mb` MB; valid/test: a little real text."""
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    line = base.replace("\n", " ").replace("\r", " ")
    target = mb * 1_000_000
    with open(root / "train" / "long.txt", "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            piece = line[:target - written]
            f.write(piece)
            written += len(piece.encode("utf-8"))
    for split in ("valid", "test"):
        (root / split / "small.txt").write_text(corpus_text(corpus, split, 200_000), encoding="utf-8")
    return root


def run_prepare(corpus: Path, tokenizer: Path, out: Path, max_doc_chars: int | None) -> dict:
    cmd = [sys.executable, "-m", "smalltalk", "prepare", "--preset", "cpu", "--corpus", str(corpus), "--out", str(out),
           "--tokenizer", str(tokenizer), "--workers", "1", "--no-progress"]
    if max_doc_chars:
        cmd += ["--max-doc-chars", str(max_doc_chars)]
    # A fresh parent per measurement: ru_maxrss of the children is a running maximum over all of them.
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(p.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(p.returncode)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"prepare failed: {proc.stderr[-2000:]}")
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    return {"peak_rss_mb": round(peak_kb / 1024, 1), "seconds": round(seconds, 1),
            "train_tokens": manifest["splits"]["train"]["num_tokens_before_packing"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the single-line document (MB)")
    ap.add_argument("--whole-mb", type=int, default=20, help="size for the run without pieces (MB)")
    ap.add_argument("--corpus", type=Path, default=None)
    args = ap.parse_args(argv)
    corpus = args.corpus or default_corpus_dir()
    base = corpus_text(corpus, "train", 4_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tmp / "tokenizer.json"
        train_tokenizer([base[i:i + 10_000] for i in range(0, len(base), 10_000)], 8192, tokenizer)
        whole = run_prepare(make_corpus(tmp / "whole", corpus, args.whole_mb, base), tokenizer, tmp / "out-whole",
                            max_doc_chars=args.whole_mb * 2_000_000)
        pieces = run_prepare(make_corpus(tmp / "long", corpus, args.mb, base), tokenizer, tmp / "out-long", None)
    report = {"benchmark": "prepare_long_document", "document_mb": args.mb, "pieces": pieces,
              "whole_document_mb": args.whole_mb, "whole": whole,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "loadavg": [round(x, 2) for x in os.getloadavg()]}
    md = ["# `prepare` on one huge single-line document", "",
          f"Machine: {report['machine']}, load average {report['loadavg']}; `smalltalk prepare --workers 1`, "
          "given tokenizer (8192), peak RSS of the child process.", "",
          "| document | tokenized | peak RSS (MB) | RSS / document size | time (s) | train tokens |", "|---|---|---|---|---|---|",
          f"| {args.whole_mb} MB, one line | whole (pieces off) | {whole['peak_rss_mb']:.0f} | "
          f"{whole['peak_rss_mb'] / args.whole_mb:.1f}x | {whole['seconds']:.0f} | {whole['train_tokens']:,} |",
          f"| {args.mb} MB, one line | in pieces of 1,000,000 characters (default) | {pieces['peak_rss_mb']:.0f} | "
          f"{pieces['peak_rss_mb'] / args.mb:.1f}x | {pieces['seconds']:.0f} | {pieces['train_tokens']:,} |", ""]
    write_results(RESULTS, "prepare_long_document", report, "\n".join(md), show=False)
    print(f"{args.mb} MB single line: peak RSS {pieces['peak_rss_mb']:.0f} MB ({pieces['peak_rss_mb'] / args.mb:.1f}x); "
          f"{args.whole_mb} MB tokenized whole: {whole['peak_rss_mb']:.0f} MB ({whole['peak_rss_mb'] / args.whole_mb:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
