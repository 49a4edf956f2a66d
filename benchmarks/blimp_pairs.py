"""BLiMP under a mixture: how often the two sentences of a minimal pair go to different experts, and what it costs.

lm-eval scores a BLiMP pair as two requests with an empty context, and the mixture routes each by the
sentence it scores, so the grammatical and the ungrammatical sentence can be scored by different
experts: the comparison is then between two models' likelihoods, not one model's judgement. This
scores every sentence with every expert and the dense model (log p(sentence | EOS), as lm-eval does
for an empty context, the sentence after a space) and reports, per paradigm and overall:

- accuracy of the mixture as lm-eval runs it (each sentence routed on its own), of the dense model, and
  of the mixture with the pair routed together (argmax over experts of the summed router scores of both
  sentences; label-free, so a fair alternative protocol);
- the share of pairs split across experts, and accuracy on split vs unsplit pairs.

    python benchmarks/blimp_pairs.py --run-dir RUN [--limit 300] [--name blimp_pairs_cpu-medium]

Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import write_results
from smalltalk.evaluation.backend import open_models
from smalltalk.mixture.models import Models
from smalltalk.evaluation.scoring import make_windows, score_windows
from smalltalk.evaluation.task_data import read_jsonl_gz, resolve_evals_dir
from smalltalk.mixture.bundle import read_bundle

RESULTS = Path(__file__).resolve().parent / "results"


def sentence_logprobs(model, eos_id: int, sentences: list[list[int]], max_len: int) -> np.ndarray:
    """log p(sentence | EOS) in nats: N sentences -> (N,) float64, with the evaluation's own windows and
    batched scorer (what the lm-eval model runs)."""
    windows, owner = [], []
    for n, ids in enumerate(sentences):
        for w in make_windows([eos_id], ids, max_len):
            windows.append(w)
            owner.append(n)
    out = np.zeros(len(sentences))
    np.add.at(out, owner, [logp for logp, _ in score_windows(model, windows, batch_size=256)])
    return out


def pair_tokens(encode, pairs: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each pair's grammatical and ungrammatical sentence as lm-eval sends them: its target
    delimiter " " before the sentence, after an empty context."""
    return ([encode(" " + p["sentence_good"]) for p in pairs], [encode(" " + p["sentence_bad"]) for p in pairs])


def accuracy(good: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """Share of pairs whose grammatical sentence is more likely, with its binomial standard error."""
    if len(good) == 0:
        return float("nan"), float("nan")
    acc = float(np.mean(good >= bad))  # a tie goes to the first choice, as lm-eval's argmax
    return acc, math.sqrt(acc * (1 - acc) / len(good))


def paradigm_row(mix: Models, dense: Models, pairs: list[dict]) -> dict:
    good_ids, bad_ids = pair_tokens(mix.mixture.encode, pairs)
    dense_good, dense_bad = pair_tokens(lambda text: dense.tokenizer.encode(text), pairs)
    routes_g = mix.mixture.route_ids(good_ids, mix.prefix_len)
    routes_b = mix.mixture.route_ids(bad_ids, mix.prefix_len)
    eg = np.array([r.expert for r in routes_g])
    eb = np.array([r.expert for r in routes_b])
    joint = np.array([r.scores for r in routes_g]) + np.array([r.scores for r in routes_b])  # (N, E)
    ej = joint.argmax(axis=1)
    def under(models: Models, e: int, ids: list[list[int]]) -> np.ndarray:
        return sentence_logprobs(models.expert(e), models.eos_id, ids, models.max_len)

    lp_g = np.stack([under(mix, e, good_ids) for e in range(mix.num_experts)], 1)  # (N, E)
    lp_b = np.stack([under(mix, e, bad_ids) for e in range(mix.num_experts)], 1)  # (N, E)
    dg, db = under(dense, 0, dense_good), under(dense, 0, dense_bad)
    n = np.arange(len(pairs))
    own_g, own_b = lp_g[n, eg], lp_b[n, eb]
    split = eg != eb
    return {
        "pairs": len(pairs),
        "split_share": float(split.mean()),
        "mixture": accuracy(own_g, own_b),
        "mixture_pair_routed": accuracy(lp_g[n, ej], lp_b[n, ej]),
        "dense": accuracy(dg, db),
        "mixture_split": accuracy(own_g[split], own_b[split]),
        "mixture_unsplit": accuracy(own_g[~split], own_b[~split]),
        "dense_split": accuracy(dg[split], db[split]),
        "dense_unsplit": accuracy(dg[~split], db[~split]),
        "split_pairs": int(split.sum()),
    }


def weighted_accuracy(rows: list[dict], key: str, count) -> float:
    """Mean of the rows' `key` accuracy, each weighted by its count(row) pairs (nan when there are none)."""
    total = sum(count(r) for r in rows)
    return sum(r[key][0] * count(r) for r in rows if count(r)) / total if total else float("nan")


def summary(rows: dict[str, dict]) -> dict:
    """Pair-weighted accuracies over all paradigms."""
    rs = list(rows.values())
    total = sum(r["pairs"] for r in rs)
    n_split = sum(r["split_pairs"] for r in rs)
    out = {"pairs": total, "split_pairs": n_split, "split_share": n_split / total}
    for key in ("mixture", "mixture_pair_routed", "dense"):
        out[key] = weighted_accuracy(rs, key, lambda r: r["pairs"])
    for side in ("mixture", "dense"):
        out[f"{side}_split"] = weighted_accuracy(rs, f"{side}_split", lambda r: r["split_pairs"])
        out[f"{side}_unsplit"] = weighted_accuracy(rs, f"{side}_unsplit", lambda r: r["pairs"] - r["split_pairs"])
    out["paradigms_pair_routed_better"] = sum(r["mixture_pair_routed"][0] > r["mixture"][0] for r in rs)
    return out


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        "# BLiMP minimal pairs under a mixture: split pairs and pair routing",
        "",
        f"Bundle `{report['bundle']}`, {report['num_experts']} experts, M-hat = {report['prefix_len']}; "
        f"{report['limit'] or 'all'} pairs per paradigm, {s['pairs']:,} pairs in {len(report['paradigms'])} "
        f"paradigms; {report['wall_s']:.0f} s on {report['threads']} threads ({report['machine']}).",
        "",
        f"Reproduce: `python benchmarks/blimp_pairs.py --run-dir RUN --limit {report['limit']}`",
        "",
        "| | pairs | mixture (each sentence routed, as lm-eval) | mixture, pair routed together | dense |",
        "|---|---:|---:|---:|---:|",
        f"| all pairs | {s['pairs']:,} | {s['mixture']:.4f} | {s['mixture_pair_routed']:.4f} | {s['dense']:.4f} |",
        f"| pairs split across experts | {s['split_pairs']:,} ({s['split_share']:.1%}) | {s['mixture_split']:.4f} "
        f"| | {s['dense_split']:.4f} |",
        f"| pairs on one expert | {s['pairs'] - s['split_pairs']:,} | {s['mixture_unsplit']:.4f} | "
        f"| {s['dense_unsplit']:.4f} |",
        "",
        f"Pair routing better than per-sentence routing on {s['paradigms_pair_routed_better']} of "
        f"{len(report['paradigms'])} paradigms. Accuracies are pair-weighted means; per paradigm (± binomial "
        "stderr):",
        "",
        "| paradigm | split | mixture | pair routed | dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["paradigms"].items():
        lines.append(f"| {name} | {r['split_share']:.0%} | {r['mixture'][0]:.3f} ± {r['mixture'][1]:.3f} | "
                     f"{r['mixture_pair_routed'][0]:.3f} ± {r['mixture_pair_routed'][1]:.3f} | "
                     f"{r['dense'][0]:.3f} ± {r['dense'][1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=None, help="a run directory with bundle/ and dense/model")
    ap.add_argument("--bundle", type=Path, default=None, help="the mixture bundle (default: RUN/bundle)")
    ap.add_argument("--dense", type=Path, default=None, help="the dense model directory (default: RUN/dense/model)")
    ap.add_argument("--evals", default=None, help="eval data directory (default: $SMALLTALK_EVALS or ../shared/evals)")
    ap.add_argument("--limit", type=int, default=300, help="pairs per paradigm (0: all 1,000)")
    ap.add_argument("--paradigms", default=None, help="comma-separated paradigm names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="blimp_pairs", help="output stem under benchmarks/results/")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.run_dir is None and (args.bundle is None or args.dense is None):
        ap.error("give --run-dir RUN, or both --bundle and --dense")
    bundle = args.bundle or args.run_dir / "bundle"
    dense_dir = args.dense or args.run_dir / "dense" / "model"
    torch.set_num_threads(args.threads)
    evals = resolve_evals_dir(args.evals)
    names = (args.paradigms.split(",") if args.paradigms
             else sorted(p.name[:-len(".jsonl.gz")] for p in (evals / "blimp").glob("*.jsonl.gz")))
    mix = open_models(bundle=bundle, device="cpu", max_loaded_experts=read_bundle(bundle).num_experts)
    dense = open_models(model=dense_dir, device="cpu")
    t0 = time.perf_counter()
    rows = {}
    for i, name in enumerate(names):
        pairs = read_jsonl_gz(evals / "blimp" / f"{name}.jsonl.gz", ("sentence_good", "sentence_bad"))
        rows[name] = paradigm_row(mix, dense, pairs[:args.limit] if args.limit else pairs)
        print(f"[{i + 1}/{len(names)}] {name}: split {rows[name]['split_share']:.0%}, mixture "
              f"{rows[name]['mixture'][0]:.3f}, pair routed {rows[name]['mixture_pair_routed'][0]:.3f}, dense "
              f"{rows[name]['dense'][0]:.3f}", file=sys.stderr)
    report = {"benchmark": "blimp_pairs", "bundle": str(bundle), "dense": str(dense_dir), "num_experts": mix.num_experts,
              "prefix_len": mix.prefix_len, "limit": args.limit, "threads": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "wall_s": time.perf_counter() - t0, "summary": summary(rows), "paradigms": rows}
    write_results(args.results, args.name, report, to_markdown(report))
    s = report["summary"]
    print(f"blimp pairs: {s['split_share']:.1%} split; mixture {s['mixture']:.4f}, pair routed "
          f"{s['mixture_pair_routed']:.4f}, dense {s['dense']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
