"""Generation speed: our `generate` with and without the KV cache vs `transformers` `generate()`.

Same model (the `cpu-small` preset, random init, a BPE tokenizer trained on the sample corpus with
the preset's 8192-token vocabulary), same real prompt, same number of new tokens, greedy, in the
same process; the transformers model is our export (`export_hf`). Methods are run in interleaved
rounds and the median is reported, because the machine is shared (its load average is recorded).
Target: ours with the cache is not slower than transformers with its cache.

    python benchmarks/generation.py [--threads 1] [--new-tokens 192] [--rounds 5]

Writes benchmarks/results/generation.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _results import write_results  # noqa: E402
from smalltalk.model.config import preset  # noqa: E402
from smalltalk.model.generate import encode, generate, generate_batch  # noqa: E402
from smalltalk.model.hf_export import export_hf  # noqa: E402
from smalltalk.model.transformer import Transformer  # noqa: E402
from smalltalk.paths import default_corpus_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("wiki_en", "books_en", "code_python", "news_en", "novels_fr", "legal_en")


def corpus_texts(corpus: Path, split: str, per_domain: int) -> list[str]:
    texts = []
    for domain in DOMAINS:
        with gzip.open(corpus / split / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for _, line in zip(range(per_domain), f))
    return texts


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (<= 2 on the shared machine)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched comparison")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import transformers
    from smalltalk.data.tokenizer import train_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    corpus = default_corpus_dir()
    cfg = preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="smalltalk-bench-gen-"))
    tokenizer_file = work / "tokenizer.json"
    tokenizer = train_tokenizer(corpus_texts(corpus, "valid", 40), cfg.vocab_size, tokenizer_file)
    cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    hf_dir = export_hf(model, tokenizer_file, work / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    documents = corpus_texts(corpus, "test", 2)
    prompts = [encode(tokenizer, text)[:args.prompt_tokens] for text in documents]
    prompts = [p for p in prompts if len(p) == args.prompt_tokens][:args.batch]
    prompt, n_new = prompts[0], args.new_tokens
    assert len(prompt) + n_new <= cfg.max_seq_len, "prompt + new tokens must fit the context (no window shift)"

    def ours(use_cache: bool):
        return lambda: generate(model, tokenizer, prompt, n_new, greedy=True, ignore_eos=True,
                                use_cache=use_cache).token_ids

    def hf(use_cache: bool, rows: list[list[int]] = [prompt]):
        ids = torch.tensor(rows)

        def run():
            with torch.inference_mode():
                out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                        min_new_tokens=n_new, do_sample=False, use_cache=use_cache,
                                        pad_token_id=0)
            return out[:, len(rows[0]):].tolist()
        return run

    def ours_batch():
        return [r.token_ids for r in generate_batch(model, tokenizer, prompts, n_new, greedy=True, ignore_eos=True)]

    methods = {
        "smalltalk, KV cache": (ours(True), n_new),
        "smalltalk, no cache": (ours(False), n_new),
        "transformers, KV cache": (hf(True), n_new),
        "transformers, no cache": (hf(False), n_new),
        f"smalltalk, KV cache, batch {len(prompts)}": (ours_batch, n_new * len(prompts)),
        f"transformers, KV cache, batch {len(prompts)}": (hf(True, prompts), n_new * len(prompts)),
    }
    for fn, _ in methods.values():  # warm-up (first-call allocations, lazy imports)
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    outputs = {}
    for _ in range(args.rounds):
        for name, (fn, _) in methods.items():
            elapsed, outputs[name] = timed(fn)
            seconds[name].append(elapsed)

    same_tokens = outputs["smalltalk, KV cache"] == outputs["transformers, KV cache"][0] == \
        outputs["smalltalk, no cache"]
    rows = []
    for name, (_, tokens) in methods.items():
        median = statistics.median(seconds[name])
        rows.append({"method": name, "new_tokens": tokens, "median_s": round(median, 4),
                     "tokens_per_s": round(tokens / median, 1), "runs_s": [round(s, 4) for s in seconds[name]]})
    by_name = {r["method"]: r for r in rows}
    ours_tps = by_name["smalltalk, KV cache"]["tokens_per_s"]
    hf_tps = by_name["transformers, KV cache"]["tokens_per_s"]
    result = {
        "benchmark": "generation",
        "model": {"preset": args.preset, "params": cfg.num_params(), "vocab_size": cfg.vocab_size,
                  "max_seq_len": cfg.max_seq_len},
        "prompt_tokens": len(prompt), "new_tokens": n_new, "greedy": True, "rounds": args.rounds,
        "prompt_text": tokenizer.decode(prompt),
        "results": rows,
        "speedup_cache_vs_no_cache": round(ours_tps / by_name["smalltalk, no cache"]["tokens_per_s"], 2),
        "speedup_vs_transformers": round(ours_tps / hf_tps, 2),
        "target": "smalltalk KV cache tokens/s >= transformers KV cache tokens/s",
        "target_met": ours_tps >= hf_tps,
        "same_greedy_tokens_as_transformers": same_tokens,
        "environment": {"threads": args.threads, "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    write_results(RESULTS, "generation", result, markdown(result))
    return 0 if result["target_met"] and same_tokens else 1


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [
        "# Generation speed",
        "",
        f"`{r['model']['preset']}` ({r['model']['params'] / 1e6:.2f}M params, vocab {r['model']['vocab_size']}), "
        f"random init, greedy, {r['prompt_tokens']}-token real prompt + {r['new_tokens']} new tokens, "
        f"median of {r['rounds']} interleaved rounds; CPU, {env['threads']} thread(s), "
        f"load average {env['loadavg_before'][0]:.1f} -> {env['loadavg_after'][0]:.1f} "
        f"on {env['cpu_count']} cores (shared machine); torch {env['torch']}, transformers {env['transformers']}.",
        "",
        "| method | new tokens | median s | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {x['method']} | {x['new_tokens']} | {x['median_s']:.3f} | {x['tokens_per_s']:.1f} |"
              for x in r["results"]]
    lines += [
        "",
        f"- KV cache speed-up over no cache: **{r['speedup_cache_vs_no_cache']}x**",
        f"- smalltalk vs transformers `generate()` (both with cache): **{r['speedup_vs_transformers']}x** "
        f"(target >= 1: {'met' if r['target_met'] else 'NOT met'})",
        f"- same greedy tokens as transformers: {r['same_greedy_tokens_as_transformers']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
