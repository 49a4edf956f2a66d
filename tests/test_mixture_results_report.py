"""`benchmarks/mixture_results.py`'s report of a finished run: the numbers are the run's own, and the FLOPs table
adds up to the mixture's training cost (paper App. A.3)."""

from __future__ import annotations

import json
import shutil

import pytest

from analysis_run import RUN_CONFIG, build_tiny_run
from benchmark_import import import_benchmark


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    """A copy of the shared tiny run (evaluated), taken on through the pipeline's report stage."""
    from smalltalk.run.config import RunConfig
    from smalltalk.run.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("mixture_results") / "run"
    shutil.copytree(build_tiny_run(tmp_path_factory, corpus_dir), run)
    cfg = dict(RUN_CONFIG, data=dict(RUN_CONFIG["data"], corpus=[str(corpus_dir)]))
    run_pipeline(RunConfig.from_dict(cfg), run, until="report", progress=False, log=lambda msg: None)
    return run


@pytest.fixture(scope="module")
def mixture_results():
    return import_benchmark("mixture_results")


def test_report_quotes_the_runs_results_and_a_flops_table_that_adds_up(run_dir, mixture_results):
    results = json.loads((run_dir / "eval" / "results.json").read_text())  # the evaluate stage's own output
    row = mixture_results.summarize_run(run_dir, 1.0, ([0.0], [0.0]))
    assert row["mixture_ppl"] == results["mixture"]["ppl"] and row["dense_ppl"] == results["dense"]["ppl"]
    c = row["costs"]
    parts = c["experts_training"] + c["routers_training"] + c["routers_sharding"] + c["experts_sharding"]
    assert c["mixture_training"] == parts and c["routers_training"] > 0 and c["experts_sharding"] > 0

    md = mixture_results.to_markdown({"preset": "tiny", "machine": "test", "runs": [row]})
    flops_section = md.split("## FLOPs", 1)[1].split("\n\n")[1].splitlines()
    (flops_row,) = [line for line in flops_section if line.startswith("| 4 | ")]
    cells = [cell.strip() for cell in flops_row.strip("|").split("|")]
    assert float(cells[4]) == pytest.approx(c["mixture_training"], rel=1e-3)
    assert float(cells[6]) == pytest.approx(c["mixture_training"] / c["dense_training"], abs=1e-4)
    assert float(cells[3]) == pytest.approx(c["routers_sharding"] + c["experts_sharding"], rel=1e-3)
