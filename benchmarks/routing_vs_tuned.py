"""The routing analyses' "vs dense" columns against the tuned dense model.

`routing_analyses.py` compares every routing variant with its run's dense baseline: the paper's protocol (the
experts' steps at E x their batch, their learning rate, untuned). This puts the tuned dense model of the same
budget (the map's best line on validation, `map.py --budgets 194.97` for the `cpu` preset) beside it, on the very
sequences the analyses scored, without re-running them: the mixtures' perplexities are the report's, the tuned
dense model is scored here, overall and on each expert's routed segment.

    python benchmarks/routing_vs_tuned.py --base-run RUN --dense-model MAP_OUT/budgets/0/dense_b32_lr0.02/dense/model

RUN must hold the analysed run's data and routers (the `cpu` preset at the same seed, `smalltalk run --config cpu
--until shard`); that is checked, not assumed: its routers must route the scored test sequences into exactly the
report's per-expert shares. Writes benchmarks/results/routing_analyses_vs_tuned.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _results import run_main, write_results
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json
from smalltalk.mixture.scores import improvement_pct

RESULTS = Path(__file__).resolve().parent / "results"


def mixture_rows(analyses: dict) -> list[dict]:
    """(analysis, variant, M-hat, mixture ppl, protocol dense ppl) of every whole-test-split comparison."""
    rows = []
    for curve in analyses.get("prefix-length", {}).get("curves", []):
        rows += [{"analysis": "prefix-length", "variant": curve["label"], "prefix_len": r["prefix_len"],
                  "ppl": r["ppl"], "protocol_dense_ppl": curve["dense_ppl"]} for r in curve["rows"]]
    for r in analyses.get("router-size", {}).get("rows", []):
        rows.append({"analysis": "router-size", "variant": f"{r['run']}, {r['routing']}", "prefix_len": r["prefix_len"],
                     "ppl": r["ppl"], "protocol_dense_ppl": r["dense_ppl"]})
    for name in ("tfidf", "random-shards"):
        rows += [{"analysis": name, "variant": r["method"], "prefix_len": r["prefix_len"], "ppl": r["ppl"],
                  "protocol_dense_ppl": r["dense_ppl"]} for r in analyses.get(name, {}).get("rows", [])
                 if r["method"] != "dense" and r.get("ppl") is not None and r.get("dense_ppl") is not None]
    return rows


def rebaseline(report: dict, base_run: Path, dense_model: Path, device: str = "cpu") -> dict:
    from smalltalk.analysis.scores import router_logp, score_models
    from smalltalk.routing import rule
    from smalltalk.run.layout import RunLayout

    spec = report["analyses"].get("specialisation")
    if spec is None:
        raise SmallTalkError("the report has no specialisation analysis: its per-expert shares are what ties RUN to "
                             "the analysed run; re-run routing_analyses.py with it")
    layout = RunLayout(base_run)
    split, n, M = spec["split"], spec["num_seqs"], spec["prefix_len"]
    # The analyses' own selection (evenly spaced, all of a split no longer than n): the same sequences when RUN matches.
    scores = score_models([], dense_model, layout.data, split=split, max_seqs=n, device=device)
    if scores.num_seqs != n:
        raise SmallTalkError(f"{base_run}: its {split} split gives {scores.num_seqs} sequences, the report scored {n}; "
                             "give the run the analyses ran on (same preset, seed and data)")
    routes = rule.route_logp(router_logp(layout.routers, layout.data, scores.indices, M, split=split, device=device), M)
    shares = np.bincount(routes, minlength=len(spec["experts"])) / n
    want = np.array([x["test_share"] for x in spec["experts"]])
    if len(shares) != len(want) or np.abs(shares - want).max() > 0.5 / n:
        raise SmallTalkError(f"{base_run}: its routers send the {split} sequences to experts in shares "
                             f"{np.round(shares, 4).tolist()}, the analysed run's were {np.round(want, 4).tolist()}; "
                             "give the run the analyses ran on (same preset, seed and data)")
    tuned = scores.dense_ppl()
    given = mixture_rows(report["analyses"])
    rows = [{**r, "protocol_vs_pct": improvement_pct(r["protocol_dense_ppl"], r["ppl"]), "tuned_dense_ppl": tuned,
             "tuned_vs_pct": improvement_pct(tuned, r["ppl"])} for r in given]
    experts = []
    for x in spec["experts"]:
        seg_tuned = scores.dense_ppl(routes == x["expert"])
        experts.append({"expert": x["expert"], "test_share": x["test_share"], "expert_ppl": x["expert_ppl"],
                        "protocol_dense_ppl": x["dense_ppl"], "protocol_vs_pct": x["improvement_pct"],
                        "tuned_dense_ppl": seg_tuned, "tuned_vs_pct": improvement_pct(seg_tuned, x["expert_ppl"])})
    return {"base_run": str(base_run), "dense_model": str(dense_model), "split": split, "num_seqs": n,
            "prefix_len": M, "protocol_dense_ppl": given[0]["protocol_dense_ppl"] if given else None,
            "tuned_dense_ppl": tuned, "rows": rows, "experts": experts,
            "every_expert_beats_tuned_dense": all(e["tuned_vs_pct"] > 0 for e in experts)}


def render(r: dict, source: str) -> str:
    out = ["# Routing analyses vs the tuned dense model", "",
           f"The mixtures of `{source}` (their experts trained as the analysed run trained them: the paper's protocol) "
           f"against two dense models of the same training tokens on the same {r['num_seqs']:,} {r['split']} "
           f"sequences: the run's own (the paper's protocol, {r['protocol_dense_ppl']:.2f}) and the **tuned** one "
           f"(`{r['dense_model']}`, {r['tuned_dense_ppl']:.2f}: the protocol dense is "
           f"{-improvement_pct(r['tuned_dense_ppl'], r['protocol_dense_ppl']):.1f}% worse). Base run for routing: `{r['base_run']}` (its routers "
           "reproduce the report's per-expert shares).", "",
           "| analysis | variant | M-hat | mixture ppl | vs protocol dense | vs tuned dense |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(f"| {x['analysis']} | {x['variant']} | {x['prefix_len']} | {x['ppl']:.2f} | "
                   f"{x['protocol_vs_pct']:+.2f}% | {x['tuned_vs_pct']:+.2f}% |")
    out += ["", f"Each expert on the test sequences routed to it (M-hat = {r['prefix_len']}):", "",
            "| expert | test share | expert ppl | protocol dense | vs protocol | tuned dense | vs tuned |",
            "|---|---|---|---|---|---|---|"]
    for e in r["experts"]:
        out.append(f"| {e['expert']} | {100 * e['test_share']:.1f}% | {e['expert_ppl']:.2f} | "
                   f"{e['protocol_dense_ppl']:.2f} | {e['protocol_vs_pct']:+.1f}% | {e['tuned_dense_ppl']:.2f} | "
                   f"{e['tuned_vs_pct']:+.1f}% |")
    out += ["", f"Every expert beats the tuned dense model on its segment: {r['every_expert_beats_tuned_dense']}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, default=RESULTS / "routing_analyses.json")
    ap.add_argument("--base-run", type=Path, required=True, help="a run with the analysed run's data and routers")
    ap.add_argument("--dense-model", type=Path, required=True, help="the tuned dense model's directory")
    ap.add_argument("--name", default="routing_analyses_vs_tuned")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not args.report.is_file():
        raise SmallTalkError(f"--report {args.report}: not found; run benchmarks/routing_analyses.py first")
    result = rebaseline(read_json(args.report), args.base_run, args.dense_model)
    write_results(args.results, args.name, {**result, "report": str(args.report)}, render(result, args.report.name))
    return 0


if __name__ == "__main__":
    run_main(main)
