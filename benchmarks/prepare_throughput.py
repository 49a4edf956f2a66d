"""Tokenize+pack throughput of `smalltalk prepare` vs the tokenizers library's own batch encoding.

Two parts, both on the FULL sample corpus (cpu preset: seq_len 256, vocab 8192), `--workers`
tokenizer processes (2 cores here):

1. End to end: `prepare` in a child process, as `smalltalk prepare --preset cpu` runs it
   (tokenizer training, then read + tokenize + pack + write shards). Reports the phase times and
   the peak RSS of the main process and of its largest worker: memory stays bounded because the
   corpus is streamed, never loaded.
2. Throughput A/B, interleaved domain by domain so that the (shared, fluctuating) machine load hits
   both sides alike: (A) `prepare` on the domain's train/valid/test files with the tokenizer from
   part 1; (B) on the same documents, already in memory (reading not timed), the library call alone:
   `Tokenizer.encode_batch_fast` and `Tokenizer.encode_batch` on ~4 MB batches, on the library's own
   thread pool. B does strictly less work: it does not read, decompress, parse, extract ids, pack or
   write. Wall-clock MB/s and MB per CPU-second are both reported (CPU time is less sensitive to load).

Target: prepare's MB/s >= 0.8 x the faster reference.

    python benchmarks/prepare_throughput.py [--workers 2] [--max-bytes-per-file N (quick check)]

Writes benchmarks/results/prepare_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def end_to_end_child(out: str, workers: int, max_bytes_per_file: int | None) -> None:
    """Run prepare (cpu preset); print one JSON line with phase times and peak memory."""
    from smalltalk.data.prepare import prepare
    from smalltalk.data.prepare_config import preset

    events: list[tuple[float, str]] = []
    start = time.perf_counter()
    cfg = preset("cpu", out_dir=out, num_workers=workers, progress=False, max_bytes_per_file=max_bytes_per_file)
    manifest = prepare(cfg, log=lambda msg: events.append((time.perf_counter() - start, msg)))
    total = time.perf_counter() - start
    encode_start = next(t for t, msg in events if msg.startswith("tokenizing and packing"))
    print(json.dumps({
        "total_s": total, "tokenizer_s": encode_start, "encode_s": total - encode_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "text_bytes": sum(s["num_text_bytes"] for s in manifest["splits"].values()),
        "tokens": sum(s["num_tokens_before_packing"] for s in manifest["splits"].values()),
        "splits": {k: {"num_seqs": v["num_seqs"], "num_documents": v["num_documents"]}
                   for k, v in manifest["splits"].items()},
        "vocab_size": manifest["vocab_size"], "seq_len": manifest["seq_len"],
    }))


def _time(fn) -> tuple[float, float, object]:
    """(wall s, CPU s of this process and of children reaped meanwhile, result)."""
    w0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    out = fn()
    return time.perf_counter() - w0, _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - c0, out


def ab(tokenizer_file: Path, corpus: str, workers: int, max_bytes_per_file: int | None, tmp: Path) -> dict:
    from tokenizers import Tokenizer

    from smalltalk.data.prepare import prepare
    from smalltalk.data.prepare_config import preset
    from smalltalk.data.sources import iter_split_documents, plan_sources
    from smalltalk.data.readers import ReadStats

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.encode_special_tokens = True  # as prepare encodes
    groups = collections.defaultdict(list)  # domain -> its train/valid/test files
    for planned in plan_sources([corpus]):
        groups[Path(planned.source).name.split(".")[0]].append(planned.source)
    sides = ("prepare", "encode_batch_fast", "encode_batch")
    total = {s: {"seconds": 0.0, "cpu_seconds": 0.0} for s in sides}
    text_bytes = 0
    for i, (domain, files) in enumerate(sorted(groups.items())):
        cfg = preset("cpu", corpus=tuple(files), out_dir=str(tmp / domain), tokenizer_file=str(tokenizer_file),
                     num_workers=workers, progress=False, max_bytes_per_file=max_bytes_per_file)
        texts = [doc.text for _, doc in iter_split_documents(plan_sources(files), cfg, ReadStats(),
                                                             max_bytes_per_file)]
        batches, batch, size = [], [], 0
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= 4 << 20:
                batches.append(batch)
                batch, size = [], 0
        batches += [batch] if batch else []

        def run_prepare():
            return sum(s["num_text_bytes"] for s in prepare(cfg)["splits"].values())

        def run_reference(method):
            def run():
                for b in batches:
                    getattr(tokenizer, method)(b, add_special_tokens=False)
            return run

        order = [("prepare", run_prepare), ("encode_batch_fast", run_reference("encode_batch_fast")),
                 ("encode_batch", run_reference("encode_batch"))]
        for side, fn in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            wall, cpu, out = _time(fn)
            total[side]["seconds"] += wall
            total[side]["cpu_seconds"] += cpu
            if side == "prepare":
                assert out == sum(len(t.encode("utf-8")) for t in texts), "prepare read different text"
                text_bytes += out
        print(f"  {domain}: {sum(len(t) for t in texts) / 1e6:.1f} MB, load {os.getloadavg()[0]:.1f}", flush=True)
    for side in total.values():
        side.update(mb_per_s=text_bytes / 1e6 / side["seconds"], mb_per_cpu_s=text_bytes / 1e6 / side["cpu_seconds"])
    return {"text_bytes": text_bytes, **total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="tokenizer processes for prepare (2 cores here)")
    ap.add_argument("--max-bytes-per-file", type=int, metavar="N",
                    help="quick check on the first N bytes of each file (default: the full corpus)")
    ap.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        end_to_end_child(args.child, args.workers, args.max_bytes_per_file)
        return 0

    from smalltalk.paths import default_corpus_dir

    corpus = str(default_corpus_dir())
    loads = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as tmp:
        out = Path(tmp) / "data"
        cmd = [sys.executable, __file__, "--child", str(out), "--workers", str(args.workers)]
        if args.max_bytes_per_file:
            cmd += ["--max-bytes-per-file", str(args.max_bytes_per_file)]
        print("1. end to end: prepare --preset cpu", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        e2e = json.loads(proc.stdout.strip().splitlines()[-1])
        loads["after_end_to_end"] = os.getloadavg()
        print("2. A/B by domain: prepare vs tokenizers batch encode", flush=True)
        result_ab = ab(out / "tokenizer.json", corpus, args.workers, args.max_bytes_per_file, Path(tmp) / "ab")
        loads["after_ab"] = os.getloadavg()
    if not args.max_bytes_per_file:  # with a byte budget, hash-split reading stops at a different point
        assert result_ab["text_bytes"] == e2e["text_bytes"], "A/B read different text than part 1"
    mb = e2e["text_bytes"] / 1e6
    prep, fast, plain = result_ab["prepare"], result_ab["encode_batch_fast"], result_ab["encode_batch"]
    ratio = prep["mb_per_s"] / max(fast["mb_per_s"], plain["mb_per_s"])
    ratio_cpu = prep["mb_per_cpu_s"] / max(fast["mb_per_cpu_s"], plain["mb_per_cpu_s"])
    scope = "full sample corpus" if not args.max_bytes_per_file else f"first {args.max_bytes_per_file} bytes per file"
    result = {
        "benchmark": "prepare_throughput", "scope": scope, "preset": "cpu", "workers": args.workers,
        "cpu_count": os.cpu_count(), "text_mb": mb, "tokens": e2e["tokens"], "vocab_size": e2e["vocab_size"],
        "seq_len": e2e["seq_len"], "splits": e2e["splits"],
        "end_to_end": {k: e2e[k] for k in ("total_s", "tokenizer_s", "encode_s", "peak_rss_mb", "peak_worker_rss_mb")},
        "end_to_end_tokenize_pack_mb_per_s": mb / e2e["encode_s"],
        "ab": result_ab, "ratio_wall": ratio, "ratio_cpu": ratio_cpu, "target_ratio": TARGET,
        "loadavg": loads, "python": platform.python_version(), "machine": platform.machine(),
    }
    md = "\n".join([
        f"# prepare throughput ({scope})",
        "",
        f"`python benchmarks/prepare_throughput.py --workers {args.workers}`: cpu preset (seq_len {e2e['seq_len']}, "
        f"vocab {e2e['vocab_size']}), {mb:.1f} MB of text, {e2e['tokens'] / 1e6:.1f} M tokens, {os.cpu_count()} CPU "
        f"cores shared with other jobs (1-min load average {loads['start'][0]:.1f} at start, "
        f"{loads['after_end_to_end'][0]:.1f} after part 1, {loads['after_ab'][0]:.1f} after part 2).",
        "",
        "**End to end** (`smalltalk prepare --preset cpu`): "
        f"{e2e['total_s']:.0f} s = tokenizer training {e2e['tokenizer_s']:.0f} s + read/tokenize/pack/write "
        f"{e2e['encode_s']:.0f} s ({mb / e2e['encode_s']:.2f} MB/s). Peak RSS: main process "
        f"{e2e['peak_rss_mb']:.0f} MB, largest worker {e2e['peak_worker_rss_mb']:.0f} MB (for {mb:.0f} MB of text).",
        "",
        "**A/B, interleaved by domain** (same text, same tokenizer):",
        "",
        "| | wall MB/s | MB per CPU-second |",
        "|---|---|---|",
        f"| `prepare`: read + tokenize + pack + write | **{prep['mb_per_s']:.2f}** | **{prep['mb_per_cpu_s']:.2f}** |",
        f"| tokenizers `encode_batch_fast`, call only | {fast['mb_per_s']:.2f} | {fast['mb_per_cpu_s']:.2f} |",
        f"| tokenizers `encode_batch`, call only | {plain['mb_per_s']:.2f} | {plain['mb_per_cpu_s']:.2f} |",
        f"| ratio prepare / faster reference (target >= {TARGET}) | **{ratio:.2f}** | **{ratio_cpu:.2f}** |",
        "",
    ])
    write_results(RESULTS, "prepare_throughput", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
