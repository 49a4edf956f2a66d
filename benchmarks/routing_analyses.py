"""Routing analyses and baselines (paper §3.4, App. C): prefix length, router size, TF-IDF, random shards.

Runs the SmallTalk pipeline (`smalltalk run`) for a base experiment and two variants that change only
the routing, then every `smalltalk analyze` analysis on the base run:

    base      E = 4 experts, routers of the scale's router preset, routing prefix M (scale default)
    short-m   the same with M = 32: the partition trained on a short prefix (App. C, Figure 6)
    big       the same with larger routers (at cpu scale `mini`, the experts' own size: the paper's
              "expert routes for itself"; at tiny scale `cpu-small`, far larger than the experts)

The variants share the base run's prepared data and dense baseline (symlinked: neither depends on
the routers), so they differ from it in routers, shards and experts only. Then:

    prefix-length   base vs short-m, M-hat in {8, 16, ..., S}, with the dense line   (Figure 4b, 6)
    router-size     base vs big, plus each run's experts routing for themselves    (Figure 4a)
    tfidf           TF-IDF + SVD + balanced k-means partition, E experts, same budget (Figure 4c)
    random-shards   random equal shards, experts route for themselves              (control)
    specialisation  per-expert shares, domains, NMI, ppl vs dense                  (Figure 5)

    python benchmarks/routing_analyses.py --scale cpu            # cpu preset (M = 32), all variants: ~1 h
    python benchmarks/routing_analyses.py --scale tiny           # the quickstart scale
    python benchmarks/routing_analyses.py --scale tiny --base RUN --variants none   # analyses of a finished run

Everything resumes: re-running the same command skips finished runs, experts and analyses reuse their
cached scores. Writes benchmarks/results/routing_analyses[_tiny].{json,md} and a copy of each analysis
plot (routing_analyses[_tiny]_<analysis>.png), and prints a summary. The machine is shared: the load
average is recorded.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from _results import write_results
from smalltalk.io import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
ANALYSES = ("prefix-length", "router-size", "tfidf", "random-shards", "specialisation")

SCALES = {
    # run preset, base M, router preset of the "big" variant (the expert's size), test sequences evaluated
    "tiny": {"preset": "tiny", "prefix_len": 64, "big_router": "cpu-small", "max_seqs": 1024},
    "cpu": {"preset": "cpu", "prefix_len": 32, "big_router": "mini", "max_seqs": 0},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def run_config(scale: dict, name: str, **changes):
    from smalltalk.run.config import run_preset

    cfg = run_preset(scale["preset"], name=name, prefix_len=changes.pop("prefix_len", scale["prefix_len"]))
    if "router_preset" in changes:
        cfg.routers = cfg.routers.replace(router_preset=changes.pop("router_preset"))
    cfg.eval.max_seqs = scale["max_seqs"]
    cfg.eval.prefix_lens = [m for m in (8, 16, 32) if m <= cfg.prefix_len]
    return cfg


def run(cfg, root: Path, share_from: Path | None = None) -> float:
    from smalltalk.run.pipeline import run_pipeline

    from smalltalk.io import read_json
    from smalltalk.run.config import RunConfig

    if (root / "run_config.json").is_file():
        # Resume the run as it was started, even if the presets have changed since.
        cfg = RunConfig.from_dict(read_json(root / "run_config.json"))
    root.mkdir(parents=True, exist_ok=True)
    if share_from is not None:
        for part in ("data", "dense"):  # identical by construction: they do not depend on the routers
            if not (root / part).exists():
                os.symlink((share_from / part).resolve(), root / part)
    run_pipeline(cfg, root, progress=False, log=log)
    # The pipeline's own per-stage seconds, summed over every invocation (a resumed run is not 0 s).
    return float(sum(read_json(root / "stages.json").values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--out", type=Path, help="where the runs go (default: runs/routing-analyses-<scale>)")
    ap.add_argument("--base", type=Path, help="use this finished run as the base run instead of running one")
    ap.add_argument("--variants", default="short-m,big-router",
                    help="variant runs to train: comma-separated of short-m, big-router, or none "
                         "(default: %(default)s)")
    ap.add_argument("--short-m", type=int, default=32, help="M of the short-prefix variant (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (<= 2 on the shared machine)")
    ap.add_argument("--max-seqs", type=int, help="test sequences to evaluate (default: the scale's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = dict(SCALES[args.scale])
    if args.max_seqs is not None:
        scale["max_seqs"] = args.max_seqs
    variants = [] if args.variants == "none" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"short-m", "big-router"}
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}")
    out = args.out or Path("runs") / f"routing-analyses-{args.scale}"
    load_before = os.getloadavg()
    wall: dict[str, float] = {}

    base = args.base or out / "base"
    short, big = out / "short-m", out / "big-router"
    if args.base is None:
        wall["run base"] = run(run_config(scale, f"{args.scale}-base"), base)
    if "short-m" in variants:
        wall["run short-m"] = run(run_config(scale, f"{args.scale}-m{args.short_m}", prefix_len=args.short_m), short,
                                  share_from=base)
    if "big-router" in variants:
        wall["run big-router"] = run(run_config(scale, f"{args.scale}-big-router",
                                                router_preset=scale["big_router"]), big, share_from=base)

    from smalltalk.analysis.baselines import BaselineConfig
    from smalltalk.analysis.prefix_length import analyze_prefix_length
    from smalltalk.analysis.runs import PrefixSettings, ScoreSettings
    from smalltalk.analysis.random_shards import analyze_random_shards
    from smalltalk.analysis.router_size import analyze_router_size
    from smalltalk.analysis.specialisation import analyze_specialisation
    from smalltalk.analysis.tfidf_baseline import TfidfBaselineConfig, analyze_tfidf

    common = dict(max_seqs=scale["max_seqs"], device="cpu")
    results = {}
    steps = [
        ("prefix-length", lambda: analyze_prefix_length(
            base, PrefixSettings(**common), [(f"M={args.short_m} partition", short)] if "short-m" in variants
            else [], log=log)),
        ("router-size", lambda: analyze_router_size(base, [(None, big)] if "big-router" in variants else [],
                                                    ScoreSettings(**common), log=log)),
        ("tfidf", lambda: analyze_tfidf(base, TfidfBaselineConfig(**common), log=log)),
        ("random-shards", lambda: analyze_random_shards(base, BaselineConfig(**common), log=log)),
        ("specialisation", lambda: analyze_specialisation(base, ScoreSettings(**common), log=log)),
    ]
    for name, fn in steps:
        start = time.perf_counter()
        log(f"analysis {name}")
        results[name] = fn()
        wall[f"analyze {name}"] = time.perf_counter() - start

    summary = summarize(results, base)
    report = {
        "scale": args.scale, "variants": variants,
        "runs": {"base": str(base), **{v: str(out / v) for v in variants}},
        "summary": summary, "analyses": results, "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    stem = "routing_analyses" if args.scale == "cpu" else f"routing_analyses_{args.scale}"
    write_results(RESULTS, stem, report, markdown(report, base, stem), show=False)
    for name in ANALYSES:
        png = base / "analysis" / name / f"{name}.png"
        if png.is_file():
            atomic_write_bytes(RESULTS / f"{stem}_{name}.png", png.read_bytes())
    print(markdown(report, base, sections=False))
    return 0


def _em(rows: list[dict], m: int) -> float | None:
    return next((r["ppl"] for r in rows if r["method"].startswith("EM") and r["prefix_len"] == m), None)


def summarize(results: dict, base: Path) -> dict:
    """The numbers the README quotes, with the paper's expectation next to each."""
    pl = results["prefix-length"]["curves"]
    main = {r["prefix_len"]: r for r in pl[0]["rows"]}
    M = pl[0]["prefix_len"]
    dense = pl[0]["dense_ppl"]
    out = {"dense_ppl": dense, "M": M, "mixture_ppl_at": {m: r["ppl"] for m, r in main.items()}}
    if 32 in main:
        out["beats_dense_at_mhat_32"] = main[32]["ppl"] < dense
    if len(pl) > 1:
        out["m32_partition_ppl_at"] = {r["prefix_len"]: r["ppl"] for r in pl[1]["rows"]}
    for name in ("tfidf", "random-shards"):
        rows = results[name]["rows"]
        other = [r for r in rows if not r["method"].startswith("EM") and r["prefix_len"] is not None]
        out[name] = {f"M-hat={r['prefix_len']}": {"em_ppl": _em(rows, r["prefix_len"]), "ppl": r["ppl"],
                                                  "p_em_better": r.get("p_em_better")}
                     for r in other if r["prefix_len"] in (8, 32, M)}
    rs = results["router-size"]
    out["router_size"] = {r["run"]: r["ppl"] for r in rs["rows"] if r["routing"] == "routers"}
    out["router_size_self_routing"] = {r["run"]: r["ppl"] for r in rs["rows"] if r["routing"] != "routers"}
    out["router_size_train_agreement"] = rs["train_partition"]["agreement"][0][1:]
    sp = results["specialisation"]
    out["specialisation"] = {"all_experts_beat_dense": sp["all_experts_beat_dense"], "nmi_train": sp["nmi_train"],
                             "nmi_test": sp["nmi_test"]}
    return out


def markdown(report: dict, base: Path, stem: str = "", sections: bool = True) -> str:
    s = report["summary"]
    env = report["environment"]
    lines = [f"# Routing analyses ({report['scale']} scale)", "",
             f"Base run `{report['runs']['base']}`: E = 4, M = {s['M']}; dense test ppl {s['dense_ppl']:.2f}. "
             f"Machine: {env['cpus']} CPUs shared, torch {env['torch_threads']} threads, load average "
             f"{env['loadavg_before'][0]:.1f} before / {env['loadavg_after'][0]:.1f} after.", "",
             "| question (paper's finding) | measured |", "|---|---|"]
    if "beats_dense_at_mhat_32" in s:
        lines.append(f"| mixture beats dense at M-hat = 32 (yes) | {'yes' if s['beats_dense_at_mhat_32'] else 'no'}: "
                     f"{s['mixture_ppl_at'][32]:.2f} vs {s['dense_ppl']:.2f} |")
    for name, title in (("tfidf", "EM beats TF-IDF at short prefixes (yes)"),
                        ("random-shards", "EM beats random shards (specialisation matters)")):
        cells = [f"{k}: EM {v['em_ppl']:.2f} vs {v['ppl']:.2f}"
                 + (f" (P(EM better) {v['p_em_better']:.2f})" if v.get("p_em_better") is not None else "")
                 for k, v in s[name].items()]
        lines.append(f"| {title} | {'; '.join(cells)} |")
    sizes = "; ".join(f"{k} {v:.2f}" for k, v in s["router_size"].items())
    selfr = "; ".join(f"{k} {v:.2f}" for k, v in s["router_size_self_routing"].items())
    agree = ", ".join(f"{100 * a:.0f}%" for a in s["router_size_train_agreement"])
    lines.append(f"| router size barely matters (yes) | routers: {sizes}; experts routing for themselves: {selfr}"
                 + (f"; training partitions agree on {agree}" if agree else "") + " |")
    sp = s["specialisation"]
    lines.append(f"| every expert beats dense on its segment (yes) | {sp['all_experts_beat_dense']}; NMI(expert, "
                 f"domain) train {sp['nmi_train']:.3f}, test {sp['nmi_test']:.3f} |")
    lines += ["", "Wall time (s; runs: the pipeline's stage times, analyses: this invocation, which reuses trained "
              "baseline experts and cached scores): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_s"].items()),
              ""]
    if sections:
        from smalltalk.analysis.output import collect_sections

        text = collect_sections(base)
        # The plots are committed beside this file (the run directory is not): point the links at the copies.
        for name in ANALYSES:
            text = text.replace(f"](analysis/{name}/{name}.png)", f"]({stem}_{name}.png)")
        lines += [text]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
