"""Serving throughput and latency: the mixture vs the dense model behind `smalltalk serve`, batching on/off.

For a finished run (its bundle and dense model) this starts real server processes on loopback ports and
sends greedy completion requests (prompts: the first 150 characters of test-split documents of eight
domains, `max_tokens` new tokens each, `ignore_eos` so every request costs the same) at concurrency 1,
8 and 32, for (a) the mixture, (b) the dense model behind the same server, (c) the mixture with
batching off. It reports completion tokens/s and p50/p95 request latency, the routers' share of
request time (from the server's own metrics), and `transformers` `generate()` on the exported dense
model in the same run (one prompt at a time, and batches of 8).

    python benchmarks/serving.py --run runs/bench-cpu-e4 --tag cpu [--max-tokens 32] [--threads 1]
    python benchmarks/serving.py --run runs/quickstart --tag tiny

Targets: at concurrency 8, batching gives >= 3x the tokens/s of concurrency 1 (mixture and dense); the mixture's
tokens/s is >= 0.9x dense at concurrency 1, 8 and 32; in a mixed workload (8-token requests interleaved with
256-token ones at concurrency 8) the short requests' p99 is at most 2x their p99 alone. The client runs on the same machine as the server (2 cores):
what it costs is in every number. Writes benchmarks/results/serving[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _results import write_results  # noqa: E402
from smalltalk.errors import SmallTalkError  # noqa: E402
from smalltalk.io import read_json  # noqa: E402
from smalltalk.run.layout import RunLayout  # noqa: E402
from smalltalk.paths import default_corpus_dir  # noqa: E402
from smalltalk.serving.process import ServerProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("wiki_en", "books_en", "code_python", "news_en", "novels_fr", "novels_de", "legal_en", "math_en")
TARGETS = {"batching_speedup_at_8": 3.0, "mixture_vs_dense_tokens_per_s_min": 0.90, "short_p99_mix_over_alone_max": 2.0}


def test_prompts(corpus: Path, per_domain: int = 8, chars: int = 150) -> list[str]:
    prompts = []
    for domain in DOMAINS:
        with gzip.open(corpus / "test" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            prompts.extend(json.loads(line)["text"][:chars] for _, line in zip(range(per_domain), f))
    return prompts


async def load(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` greedy completions, `concurrency` at a time: tokens/s and latency percentiles."""
    latencies, tokens = [], 0
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(i: int) -> None:
            nonlocal tokens
            async with gate:
                body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                start = time.perf_counter()
                r = await http.post(f"{url}/v1/completions", json=body)
                latencies.append(time.perf_counter() - start)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20)
    return {"concurrency": concurrency, "requests": requests, "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "p50_s": round(statistics.median(latencies), 4),
            "p95_s": round(q[18], 4)}


async def mixed(url: str, prompts: list[str], concurrency: int, requests: int, short: int, long: int) -> dict:
    """Short requests alone, then interleaved with long ones at the same concurrency: the short requests'
    latency p50 / p99 in both (continuous batching lets a short request finish while long ones decode)."""
    async def run(kinds: list[int]) -> list[float]:
        short_latencies: list[float] = []
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
            async def one(i: int, tokens: int) -> None:
                async with gate:
                    body = {"prompt": prompts[i % len(prompts)], "max_tokens": tokens, "temperature": 0,
                            "ignore_eos": True}
                    start = time.perf_counter()
                    r = await http.post(f"{url}/v1/completions", json=body)
                    r.raise_for_status()
                    if tokens == short:
                        short_latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(one(i, t) for i, t in enumerate(kinds)))
        return short_latencies

    def pct(values: list[float]) -> dict:
        q = statistics.quantiles(values, n=100)
        return {"p50_s": round(statistics.median(values), 4), "p99_s": round(q[98], 4), "n": len(values)}

    alone = await run([short] * requests)
    mix = await run([short if i % 2 == 0 else long for i in range(2 * requests)])
    return {"concurrency": concurrency, "short_tokens": short, "long_tokens": long, "short_alone": pct(alone),
            "short_in_mix": pct(mix), "p99_mix_over_alone": round(pct(mix)["p99_s"] / pct(alone)["p99_s"], 3)}


def measure(servers: dict[str, Path | tuple], args, levels: list[int], prompts: list[str], logs: Path) -> dict:
    """Every server stays up while they are measured in turn, level by level, `args.rounds` times: alternating
    them spreads the machine's drift over all of them, and each cell is the median of its rounds."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        live = {}
        for name, spec in servers.items():
            path, *flags = spec if isinstance(spec, tuple) else (spec,)
            live[name] = stack.enter_context(ServerProcess(path, *flags, log_dir=logs, threads=args.threads))
            asyncio.run(load(live[name].url, prompts, 4, 8, args.max_tokens))  # warm-up: loads every expert
        before = {name: s.metrics() for name, s in live.items()}
        runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in levels} for name in live}
        mixes: dict[str, list[dict]] = {name: [] for name in live}
        for _ in range(args.rounds):
            for c in levels:
                for name, server in live.items():
                    runs[name][c].append(asyncio.run(load(server.url, prompts, c, max(args.requests, 2 * c),
                                                          args.max_tokens)))
            for name, server in live.items():
                if "no_batching" not in name:
                    mixes[name].append(asyncio.run(mixed(server.url, prompts, 8, args.mixed_requests, 8,
                                                         args.long_tokens)))
        after = {name: s.metrics() for name, s in live.items()}
    out = {}
    for name in live:
        routing = after[name].get("smalltalk_routing_seconds_sum", 0) - before[name].get("smalltalk_routing_seconds_sum", 0)
        request = sum(after[name][k] - before[name].get(k, 0) for k in after[name]
                      if k.startswith("smalltalk_request_seconds_sum"))
        rows = [median_row(runs[name][c]) for c in levels]
        ordered = sorted(mixes[name], key=lambda m: m["p99_mix_over_alone"])
        mix = ordered[len(ordered) // 2] if ordered else None  # the median round
        out[name] = {"levels": rows, "mixed": mix, "mixed_rounds": mixes[name], "rounds": runs[name],
                     "routing_s": round(routing, 3), "request_s": round(request, 3),
                     "routing_share_pct": round(100 * routing / request, 2) if request else None}
    return out


def median_row(rows: list[dict]) -> dict:
    """The round with the median tokens/s (its latencies with it), and every round's tokens/s."""
    middle = sorted(rows, key=lambda r: r["tokens_per_s"])[len(rows) // 2]
    return {**middle, "tokens_per_s_rounds": [r["tokens_per_s"] for r in rows]}


def transformers_generate(dense: Path, prompts: list[str], max_tokens: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smalltalk.model.hf_export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(dense, dense / "tokenizer.json", tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp).eval()
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.padding_side = "left"
        ids = [tok(p, add_special_tokens=False).input_ids[-(model.config.max_position_embeddings - max_tokens):]
               for p in prompts]
        tokens, start = 0, time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(ids), batch):
                group = ids[i:i + batch]
                width = max(map(len, group))
                x = torch.tensor([[tok.pad_token_id] * (width - len(g)) + g for g in group])
                mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
                out = model.generate(x, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
                tokens += (out.shape[1] - width) * len(group)
        wall = time.perf_counter() - start
    return {"batch": batch, "prompts": len(ids), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def to_markdown(r: dict) -> str:
    lines = [f"# Serving: `smalltalk serve` on `{r['run']}`", "",
             f"Machine: {r['machine']}; server threads {r['threads']}; client on the same machine; load average "
             f"before/after {r['loadavg_before']} / {r['loadavg_after']}. Greedy, {r['max_tokens']} new tokens per "
             f"request (ignore_eos), prompts: first {r['prompt_chars']} characters of {r['num_prompts']} test documents of "
             f"{len(DOMAINS)} domains.", "",
             f"The servers run side by side and are measured in turn, {r['rounds']} alternated rounds; each cell is the "
             "round with the median tokens/s (all rounds' tokens/s in brackets).", "",
             "| server | concurrency | requests | tokens/s | p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|---|"]
    for name in ("mixture", "dense", "mixture_no_batching"):
        for row in r[name]["levels"]:
            rounds = ", ".join(f"{x:.0f}" for x in row.get("tokens_per_s_rounds", []))
            lines.append(f"| {name} | {row['concurrency']} | {row['requests']} | {row['tokens_per_s']:.1f} ({rounds}) | "
                         f"{row['p50_s']:.3f} | {row['p95_s']:.3f} |")
    s = r["summary"]
    lines += ["", "| measure | value | target |", "|---|---|---|",
              f"| batching speed-up at concurrency 8 vs 1: mixture / dense | {s['batching_speedup_at_8']:.2f}x / "
              f"{s['dense_batching_speedup_at_8']:.2f}x | >= {TARGETS['batching_speedup_at_8']}x |",
              f"| mixture / dense tokens/s at concurrency 1 / 8 / 32 (median of the rounds' paired ratios) | "
              f"{' / '.join(f'{x:.2f}' for x in s['mixture_over_dense'])} | >= {TARGETS['mixture_vs_dense_tokens_per_s_min']} |",
              f"| batching on / off at concurrency 8 (mixture) | {s['batching_on_over_off_at_8']:.2f}x | |",
              f"| routers' share of request time (mixture) | {r['mixture']['routing_share_pct']}% | |",
              f"| inference FLOPs of the mixture vs dense (routers counted) | {s['inference_flops_overhead_pct']:+.1f}% | |"]
    lines += ["", f"Mixed workload at concurrency 8: {r['mixture']['mixed']['short_tokens']}-token requests alone, then "
              f"interleaved 1:1 with {r['mixture']['mixed']['long_tokens']}-token ones; latency of the short ones (target: "
              f"p99 in the mix <= {TARGETS['short_p99_mix_over_alone_max']}x alone):", "",
              "| server | short alone p50 / p99 (s) | short in the mix p50 / p99 (s) | p99 mix / alone |", "|---|---|---|---|"]
    for name in ("mixture", "dense"):
        m = r[name]["mixed"]
        lines.append(f"| {name} | {m['short_alone']['p50_s']:.3f} / {m['short_alone']['p99_s']:.3f} | "
                     f"{m['short_in_mix']['p50_s']:.3f} / {m['short_in_mix']['p99_s']:.3f} | {m['p99_mix_over_alone']:.2f} |")
    hf = r["transformers"]
    lines += ["", "`transformers` `generate()` on the exported dense model, same prompts and token count, in-process "
              "(no HTTP):", "", "| batch | tokens/s |", "|---|---|"]
    lines += [f"| {h['batch']} | {h['tokens_per_s']:.1f} |" for h in hf]
    lines += ["", f"Dense server / transformers tokens/s: {s['dense_server_over_transformers_at_1']:.2f}x at "
              f"concurrency 1 vs batch 1, {s['dense_server_over_transformers_at_8']:.2f}x at concurrency 8 vs batch 8.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run directory (RUN/bundle, RUN/dense/model)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level (at least 2 x concurrency)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (the client needs the other core)")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--tag", default=None, help="results go to serving_TAG.{json,md} (default: serving.{json,md})")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per server and level (median reported)")
    ap.add_argument("--long-tokens", type=int, default=256, help="new tokens of the long requests of the mixed workload")
    ap.add_argument("--mixed-requests", type=int, default=48, help="short requests of the mixed workload (and as many long)")
    ap.add_argument("--prompt-chars", type=int, default=150,
                    help="characters of each test document used as a prompt (must fit the context with max-tokens)")
    args = ap.parse_args(argv)
    bundle, dense = args.run / "bundle", args.run / "dense" / "model"
    for p in (bundle, dense):
        if not p.is_dir():
            print(f"error: {p}: not found; give a finished run (smalltalk run ...)", file=sys.stderr)
            return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    if not {1, 8} <= set(levels):
        print(f"error: --concurrency {args.concurrency}: must include 1 and 8 (the batching target compares them), "
              "e.g. 1,8 or 1,8,32", file=sys.stderr)
        return 2
    prompts = test_prompts(args.corpus or default_corpus_dir(), chars=args.prompt_chars)
    from smalltalk.mixture.bundle import read_bundle

    args.long_tokens = min(args.long_tokens, read_bundle(bundle).seq_len)  # "256 tokens, or the context"
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        with tempfile.TemporaryDirectory() as logs:
            logs = Path(logs)
            report = measure({"mixture": bundle, "dense": dense, "mixture_no_batching": (bundle, "--no-batching")},
                             args, levels, prompts, logs)
    except SmallTalkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["transformers"] = [transformers_generate(dense, prompts[:16], args.max_tokens, b) for b in (1, 8)]
    tps = {k: {row["concurrency"]: row["tokens_per_s"] for row in report[k]["levels"]}
           for k in ("mixture", "dense", "mixture_no_batching")}
    overhead = read_json(RunLayout(args.run).results)["costs"]["inference_overhead_pct"] \
        if RunLayout(args.run).results.is_file() else float("nan")
    report["summary"] = {
        "batching_speedup_at_8": tps["mixture"][8] / tps["mixture"][1],
        "dense_batching_speedup_at_8": tps["dense"][8] / tps["dense"][1],
        "short_p99_mix_over_alone": {k: report[k]["mixed"]["p99_mix_over_alone"] for k in ("mixture", "dense")},
        # Paired: each round measured the two servers back to back, so the ratio of a round cancels the drift
        # the machine had during it; the median over rounds is reported.
        "mixture_over_dense": [statistics.median(m["tokens_per_s"] / d["tokens_per_s"] for m, d in
                                                 zip(report["mixture"]["rounds"][c], report["dense"]["rounds"][c]))
                               for c in levels],
        "batching_on_over_off_at_8": tps["mixture"][8] / tps["mixture_no_batching"][8],
        "inference_flops_overhead_pct": overhead,
        "dense_server_over_transformers_at_1": tps["dense"][1] / report["transformers"][0]["tokens_per_s"],
        "dense_server_over_transformers_at_8": tps["dense"][8] / report["transformers"][1]["tokens_per_s"],
    }
    report.update({"benchmark": "serving", "run": str(args.run), "rounds": args.rounds, "max_tokens": args.max_tokens, "threads": args.threads,
                   "num_prompts": len(prompts), "prompt_chars": args.prompt_chars, "targets": TARGETS, "loadavg_before": load_before,
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"})
    stem = f"serving_{args.tag}" if args.tag else "serving"
    write_results(RESULTS, stem, report, to_markdown(report), show=False)
    s = report["summary"]
    print(f"batching x{s['batching_speedup_at_8']:.2f} at concurrency 8; mixture/dense tokens/s "
          f"{', '.join(f'{x:.2f}' for x in s['mixture_over_dense'])}; routing {report['mixture']['routing_share_pct']}% "
          f"of request time; dense server / transformers {s['dense_server_over_transformers_at_1']:.2f}x (batch 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
