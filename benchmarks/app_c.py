"""Paper App. C (Figure 6) at the scale of a finished run: does a partition trained on a short prefix route a short
prefix better than one trained on a longer prefix?

The base run's routers were trained on M tokens (the `cpu` preset: M = 32). A variant run, identical but for
routers trained on `--long-m` tokens (so other shards and experts; the prepared data and the dense baseline are
shared, they do not depend on the routers), is trained beside it; then both mixtures are routed on the first
M-hat tokens of every test sequence for M-hat = 8, 16, ... (`smalltalk analyze prefix-length`). The paper's
question is the row M-hat = M: which partition gives the better mixture when only M tokens are seen at inference.

    python benchmarks/app_c.py --base runs/cpu-e4-seed1 --long-m 128            # one more cpu run: ~1 h on 2 cores
    python benchmarks/app_c.py --base RUN --long-m 64 --results /tmp/x          # any finished run

Resumes: a finished variant run is not retrained; the analysis reuses its cached scores. Writes
app_c_<base run name>.{json,md} to --results.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from _results import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def long_m_run(base: Path, long_m: int, out: Path) -> Path:
    """The base run with routers trained on `long_m` tokens, sharing the base's data and dense baseline."""
    from smalltalk.run.config import RunConfig
    from smalltalk.run.layout import read_run_config
    from smalltalk.run.pipeline import run_pipeline

    cfg = read_run_config(base)
    variant = RunConfig.from_dict({**cfg.to_dict(), "prefix_len": long_m, "name": f"{cfg.name}-m{long_m}"})
    out.mkdir(parents=True, exist_ok=True)
    for part in ("data", "dense"):  # identical by construction: neither depends on the routers
        if not (out / part).exists():
            os.symlink((base / part).resolve(), out / part)
    run_pipeline(variant, out, progress=False, log=lambda m: print(m, file=sys.stderr, flush=True))
    return out


def to_markdown(report: dict) -> str:
    long_c, short_c = report["curves"]
    rows = {r["prefix_len"]: r for r in long_c["rows"]}
    short_rows = {r["prefix_len"]: r for r in short_c["rows"]}
    lines = [f"# App. C at the scale of `{report['base']}`: partitions trained on M = {report['short_m']} vs "
             f"M = {report['long_m']}", "",
             f"Mixture test perplexity routing on the first M-hat tokens ({report['num_seqs']:,} test sequences; "
             f"dense {long_c['dense_ppl']:.2f}).", "",
             f"| M-hat | partition trained on M = {report['long_m']} | partition trained on M = {report['short_m']} |",
             "|---|---|---|"]
    for m in sorted(set(rows) | set(short_rows)):
        a, b = rows.get(m), short_rows.get(m)
        cell = lambda r: f"{r['ppl']:.2f} ({r['improvement_pct']:+.1f}% vs dense)" if r else "-"  # noqa: E731
        lines.append(f"| {m} | {cell(a)} | {cell(b)} |")
    at = report["at_short_m"]
    if at["long"] is not None and at["short"] is not None:
        better = "short" if at["short"] < at["long"] else "long"
        lines += ["", f"At M-hat = {report['short_m']}: the M = {report['short_m']} partition gives {at['short']:.2f}, "
                  f"the M = {report['long_m']} partition {at['long']:.2f}: the {better}-prefix partition is better "
                  f"by {100 * abs(at['short'] - at['long']) / max(at['short'], at['long']):.1f}% (paper App. C: the "
                  "short-prefix partition is better when routing on a short prefix)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a finished run (its M is the short prefix)")
    ap.add_argument("--long-m", type=int, default=128, help="M of the variant's routers (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="the variant run (default: <base>-m<long-m> beside the base)")
    ap.add_argument("--max-seqs", type=int, default=4096, help="test sequences (0: the whole split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from smalltalk.analysis.prefix_length import analyze_prefix_length
    from smalltalk.analysis.runs import PrefixSettings, ScoreSettings
    from smalltalk.run.layout import read_run_config

    base_cfg = read_run_config(args.base)
    out = args.out or args.base.parent / f"{args.base.name}-m{args.long_m}"
    long_m_run(args.base, args.long_m, out)
    result = analyze_prefix_length(out, PrefixSettings(max_seqs=args.max_seqs, device="cpu"),
                                   [(f"M={base_cfg.prefix_len} partition", args.base)])

    def at(curve: dict) -> float | None:
        return next((r["ppl"] for r in curve["rows"] if r["prefix_len"] == base_cfg.prefix_len), None)

    long_c, short_c = result["curves"]
    report = {"benchmark": "app_c", "base": str(args.base), "variant": str(out), "short_m": base_cfg.prefix_len,
              "long_m": args.long_m, "num_seqs": long_c.get("num_seqs", args.max_seqs), "curves": result["curves"],
              "at_short_m": {"long": at(long_c), "short": at(short_c)}}
    write_results(args.results, f"app_c_{base_cfg.name}", report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
