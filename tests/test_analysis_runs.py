"""Prefix-length, specialisation and router-size analyses on a real (tiny) finished run, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis_run import EVAL_SEQS, build_tiny_run
from smalltalk.run.layout import RunLayout
from smalltalk.analysis.prefix_length import analyze_prefix_length, default_prefix_lens
from smalltalk.analysis.runs import PrefixSettings, ScoreSettings
from smalltalk.analysis.router_size import analyze_router_size
from smalltalk.analysis.specialisation import analyze_specialisation
from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


def test_default_prefix_lens():
    assert default_prefix_lens(32, 128) == [8, 16, 32, 64, 128]
    assert default_prefix_lens(48, 256) == [8, 16, 32, 48, 64, 128, 256]


def test_prefix_length_matches_the_mixture_evaluation(run_dir):
    result = analyze_prefix_length(run_dir, PrefixSettings(prefix_lens=[2, 8, 32, 128], max_seqs=EVAL_SEQS,
                                                               device="cpu"))
    curve = result["curves"][0]
    rows = {r["prefix_len"]: r for r in curve["rows"]}
    assert sorted(rows) == [2, 8, 32, 128] and curve["prefix_len"] == 32 and curve["num_seqs"] == EVAL_SEQS
    # At M-hat = M = 32 the analysis must reproduce the pipeline's own evaluation on the same test sequences.
    ev = read_json(run_dir / "eval" / "results.json")
    assert rows[32]["ppl"] == pytest.approx(ev["mixture"]["ppl"], rel=1e-5)
    assert curve["dense_ppl"] == pytest.approx(ev["dense"]["ppl"], rel=1e-5)
    assert rows[8]["ppl"] == pytest.approx(next(s["ppl"] for s in ev["prefix_sweep"] if s["prefix_len"] == 8),
                                           rel=1e-5)
    assert rows[32]["agreement_with_M"] == 1.0
    assert all(0.0 <= r["agreement_with_M"] <= 1.0 and math.isfinite(r["ppl"]) for r in rows.values())
    assert all(sum(r["shares"]) == pytest.approx(1.0) for r in rows.values())
    out = run_dir / "analysis" / "prefix-length"
    for name in ("result.json", "table.md", "prefix-length.png", "section.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "prefix-length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Routing prefix length" in RunLayout(run_dir).analysis_sections()

    # A second curve (here: the same run under another label) goes on the same plot and table.
    both = analyze_prefix_length(run_dir, PrefixSettings(prefix_lens=[8, 32], max_seqs=EVAL_SEQS, device="cpu"),
                                 compare=[("again", run_dir)])
    assert [c["label"] for c in both["curves"]] == ["analysis-test (M=32)", "again"]
    assert both["curves"][1]["rows"][1]["ppl"] == pytest.approx(rows[32]["ppl"])


@pytest.mark.parametrize("bad, message", [(0, "must be >= 2"), (1, "must be >= 2"),
                                          (129, "longer than the routers' context")])
def test_bad_prefix_length(run_dir, bad, message):
    with pytest.raises(SmallTalkError, match=message):
        analyze_prefix_length(run_dir, PrefixSettings(prefix_lens=[8, bad], max_seqs=8, device="cpu"))


def test_specialisation(run_dir):
    result = analyze_specialisation(run_dir, ScoreSettings(max_seqs=EVAL_SEQS, device="cpu"))
    experts = result["experts"]
    shards = read_json(run_dir / "shards" / "manifest.json")["splits"]["train"]["counts"]
    assert [x["train_share"] for x in experts] == pytest.approx([c / sum(shards) for c in shards])
    assert sum(x["test_share"] for x in experts) == pytest.approx(1.0)
    # The mixture's log-perplexity is the token-weighted mean of the segments' log-perplexities.
    log_mix = sum(x["test_share"] * math.log(x["expert_ppl"]) for x in experts if x["expert_ppl"])
    assert log_mix == pytest.approx(math.log(result["mixture_ppl"]), rel=1e-9)
    ev = read_json(run_dir / "eval" / "results.json")
    assert result["mixture_ppl"] == pytest.approx(ev["mixture"]["ppl"], rel=1e-5)
    assert 0.0 <= result["nmi_train"] <= 1.0 and 0.0 <= result["nmi_test"] <= 1.0
    table = np.asarray(result["train_domain_table"])
    assert table.sum(axis=1).tolist() == shards  # every tiny_data sequence has a domain label
    top = experts[0]["train_top_domains"]
    assert top and top[0]["share"] >= top[-1]["share"] and top[0]["domain"] in result["domains"]
    assert (run_dir / "analysis" / "specialisation" / "specialisation.png").is_file()


def test_router_size_with_self_routing(run_dir):
    result = analyze_router_size(run_dir, [("same routers", run_dir)], ScoreSettings(max_seqs=EVAL_SEQS,
                                                                                         device="cpu"))
    assert result["runs"][0].endswith(" router") and result["runs"][1] == "same routers"
    routed = [r for r in result["rows"] if r["routing"] == "routers"]
    selfr = [r for r in result["rows"] if r["routing"] == "experts route themselves"]
    assert len(routed) == 2 and len(selfr) == 2
    assert routed[0]["ppl"] == pytest.approx(read_json(run_dir / "eval" / "results.json")["mixture"]["ppl"],
                                             rel=1e-5)
    assert routed[0]["test_agreement_with_routers"] == 1.0
    assert 0.0 <= selfr[0]["test_agreement_with_routers"] <= 1.0
    assert routed[0]["router_params"] > 0
    assert np.allclose(result["train_partition"]["agreement"], 1.0)  # a run agrees with itself
    assert np.allclose(result["train_partition"]["adjusted_rand"], 1.0)


def test_cli(run_dir, capsys):
    assert main(["analyze", "specialisation", "--run", str(run_dir), "--max-seqs", str(EVAL_SEQS),
                 "--device", "cpu"]) == 0
    assert "| expert | train share |" in capsys.readouterr().out
    assert main(["analyze", "prefix-length", "--run", str(run_dir), "--prefix-lens", "0,8", "--max-seqs", "8"]) == 2
    assert "must be >= 2" in capsys.readouterr().err
    assert main(["analyze", "prefix-length", "--run", str(run_dir / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["analyze", "tfidf", "--run", str(run_dir), "--compare", str(run_dir)]) == 2


def test_report_includes_analyses(run_dir, tmp_path, capsys):
    """The report stage writes the FLOPs of each routing prefix, and `smalltalk analyze` re-renders the
    report with its section (on a copy: the shared run stays as the other tests expect it)."""
    import shutil

    from smalltalk.run.config import RunConfig
    from smalltalk.run.pipeline import run_pipeline

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("analysis"))
    run_pipeline(RunConfig.from_dict(read_json(run / "run_config.json")), run, until="report", progress=False,
                 log=lambda msg: None)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "| Inference FLOPs vs dense |" in report and "Expert specialisation" not in report
    sweep = read_json(run / "results.json")["eval"]["prefix_sweep"]
    overheads = [s["inference_overhead_pct"] for s in sorted(sweep, key=lambda s: s["prefix_len"])]
    assert all(o > 0 for o in overheads) and overheads == sorted(overheads)  # shorter prefix, cheaper routing
    assert main(["analyze", "specialisation", "--run", str(run), "--max-seqs", str(EVAL_SEQS), "--device", "cpu"]) == 0
    assert "updated" in capsys.readouterr().out
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "## Expert specialisation (cf. Figure 5)" in report
    assert "](analysis/specialisation/specialisation.png)" in report
