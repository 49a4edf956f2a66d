"""`smalltalk plan`: the law's fit, its crossover, the planner's choice and warnings, the CLI and its bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from smalltalk.errors import SmallTalkError
from smalltalk.plan.law import Law, Point, bootstrap_crossover, fit
from smalltalk.plan.planner import default_law, effective_tokens, recommend
from test_pipeline import sharded_run  # noqa: F401  (module fixtures reused)
from test_split_training import split_run  # noqa: F401

TRUE = Law(e=1.8, a=30.0, alpha=0.35, b=60.0, beta=0.30, gain={"4": 0.09, "8": 0.07}, split={"0.5": 0.6})


def synthetic(law: Law, sizes=(40_000, 200_000, 1_000_000), tpps=(2, 8, 30, 100), experts=(4, 8), noise=0.0) -> list[Point]:
    """Points a known law would measure (the fit must give that law's predictions back)."""
    out, i = [], 0
    for N in sizes:
        for E in experts:
            for tpp in tpps:
                D = tpp * E * N
                jitter = noise * math.sin(7.0 * i)
                i += 1
                out.append(Point(N, int(D), E, law.dense(N, D) + jitter, law.mixture(N, D, E) - jitter, 0.0, f"p{i}"))
                if E == 4:
                    out.append(Point(N, int(D), E, law.dense(N, D), law.split_loss(N, D, E, 0.5), 0.5, f"s{i}"))
    return out


def test_the_fit_recovers_a_known_law_and_its_crossover():
    law = fit(synthetic(TRUE))
    for N, D, E in ((40_000, 5e6, 4), (1_000_000, 3e8, 8), (500_000, 4e7, 4)):
        assert law.dense(N, D) == pytest.approx(TRUE.dense(N, D), abs=5e-3)
        assert law.mixture(N, D, E) == pytest.approx(TRUE.mixture(N, D, E), abs=5e-3)
        assert law.split_loss(N, D, E, 0.5) == pytest.approx(TRUE.split_loss(N, D, E, 0.5), abs=5e-3)
    assert law.rmse["dense"] < 5e-3 and law.rmse["mixture"] < 5e-3
    x_true, x_fit = TRUE.crossover(1_000_000, 4), law.crossover(1_000_000, 4)
    assert x_true is not None and x_fit == pytest.approx(x_true, rel=0.05)
    # Below the crossover the mixture loses, above it wins.
    N, E = 1_000_000, 4
    assert TRUE.mixture(N, 0.5 * x_true * E * N, E) > TRUE.dense(N, 0.5 * x_true * E * N)
    assert TRUE.mixture(N, 2 * x_true * E * N, E) < TRUE.dense(N, 2 * x_true * E * N)
    boot = bootstrap_crossover(synthetic(TRUE, noise=0.01), N, E, rounds=30)
    assert boot["p10"] <= boot["median"] <= boot["p90"] and boot["median"] == pytest.approx(x_true, rel=0.5)


def test_one_size_folds_the_size_term_and_flags_extrapolation():
    points = [p for p in synthetic(TRUE, sizes=(40_000,)) if p.fraction == 0]
    law = fit(points)
    assert law.a == 0 and law.measured["params"] == [40_000, 40_000]
    assert law.dense(40_000, 30 * 4 * 40_000) == pytest.approx(TRUE.dense(40_000, 30 * 4 * 40_000), abs=0.02)
    assert law.outside(40_000, 30 * 4 * 40_000, 4) == []
    assert any("outside the measured sizes" in n for n in law.outside(5_000_000, 1e9, 4))
    rec = recommend(5_000_000, 10**9, 4, law=law)
    assert any(w.startswith("extrapolating") for w in rec.warnings)


def test_two_sizes_fit_the_gap_between_them_and_assume_the_size_exponent():
    # Two sizes pin a N^-alpha at both (any alpha spans the same two values), so alpha is set, not fitted, and a
    # third size is flagged as resting on it.
    law = fit(synthetic(TRUE, sizes=(40_000, 1_000_000)))
    assert law.assumed == ["alpha"] and law.alpha == 0.34
    for N in (40_000, 1_000_000):
        for tpp in (3, 50):
            D = tpp * 4 * N
            assert law.dense(N, D) == pytest.approx(TRUE.dense(N, D), abs=5e-3)
            assert law.mixture(N, D, 4) == pytest.approx(TRUE.mixture(N, D, 4), abs=5e-3)
            assert law.outside(N, D, 4) == []
    assert any("alpha = 0.34 is assumed" in n for n in law.outside(20_000_000, 1e10, 4))
    assert Law.from_dict(law.to_dict()).assumed == ["alpha"]
    assert fit(synthetic(TRUE)).assumed == []  # three sizes fit alpha


def test_a_data_term_that_grows_with_size_is_fitted_and_moves_the_crossover_with_it():
    # gamma > 0: a larger model at the same tokens loses more by splitting them, so its crossover in tokens per
    # parameter is not where the smaller model's is; two sizes are enough to see it.
    true = Law(e=1.8, a=30.0, alpha=0.34, b=8.0, beta=0.30, gamma=0.15, gain={"4": 0.09, "8": 0.07})
    law = fit([p for p in synthetic(true, sizes=(40_000, 1_000_000)) if p.fraction == 0])
    assert law.gamma == pytest.approx(0.15, abs=0.03)
    small, large = law.crossover(40_000, 4), law.crossover(1_000_000, 4)
    assert small == pytest.approx(true.crossover(40_000, 4), rel=0.1)
    assert large == pytest.approx(true.crossover(1_000_000, 4), rel=0.1)
    assert large > small * (40_000 / 1_000_000)  # not at the same absolute tokens (that is gamma = 0)
    assert fit([p for p in synthetic(TRUE, sizes=(40_000,)) if p.fraction == 0]).gamma == 0


def test_the_planner_chooses_the_lowest_prediction_and_warns_past_four_epochs():
    law = fit(synthetic(TRUE))
    N, E = 1_000_000, 4
    x = law.crossover(N, E)
    low, high = recommend(N, int(0.3 * x * E * N), E, law=law), recommend(N, int(3 * x * E * N), E, law=law)
    for rec in (low, high):
        options = {"dense": rec.dense_ppl, "mixture": rec.mixture_ppl, **{f"split f={f}": v for f, v in rec.split_ppl.items()}}
        assert rec.choice == min(options, key=options.get) and rec.line.startswith("train ")
    assert high.mixture_ppl < high.dense_ppl and low.mixture_ppl > low.dense_ppl
    assert effective_tokens(100, 200) == 100 and 200 < effective_tokens(1000, 200) < 1000
    repeated = recommend(N, 10**9, E, corpus_tokens=10**8, law=law)
    assert any("10.0 epochs" in w and "unique-equivalent" in w for w in repeated.warnings)
    assert repeated.dense_ppl > recommend(N, 10**9, E, law=law).dense_ppl  # repetition costs
    with pytest.raises(SmallTalkError, match="--experts 1"):
        recommend(N, 10**9, 1, law=law)
    with pytest.raises(SmallTalkError, match="--params -5"):
        recommend(-5, 10**9, 4, law=law)


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "smalltalk", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_cli_answers_in_one_line_from_the_shipped_law():
    law = default_law()
    assert law.gain and law.fitted_on and law.measured["params"][0] > 0
    N = int(law.measured["params"][0])
    done = _plan("--params", str(N), "--tokens", str(30 * 4 * N), "--experts", "4")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("train ") and "tokens per expert parameter" in first
    as_json = _plan("--params", "42k", "--tokens", "17M", "--experts", "4", "--json")
    assert as_json.returncode == 0 and '"choice"' in as_json.stdout


@pytest.mark.parametrize("args, message", [
    (["--params", "-1", "--tokens", "1M", "--experts", "4"], "'-1' must be positive"),
    (["--params", "lots", "--tokens", "1M", "--experts", "4"], "'lots' is not a count"),
    (["--params", "1M", "--tokens", "1M", "--experts", "1"], "--experts 1: a mixture needs at least 2"),
    (["--params", "1M", "--tokens", "1M", "--experts", "4", "--fit", "/nonexistent/run"],
     "--fit /nonexistent/run: no such run directory"),
])
def test_bad_plan_input_exits_2_with_one_line(args, message):
    done = _plan(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len([x for x in done.stderr.splitlines() if "error" in x]) == 1


def test_fit_refuses_an_unfinished_run(tmp_path):
    done = _plan("--params", "1M", "--tokens", "1M", "--experts", "4", "--fit", str(tmp_path))
    assert done.returncode == 2 and "not a finished run" in done.stderr


def test_fit_on_a_finished_run_directory(split_run):
    run, _ = split_run
    done = _plan("--params", "200k", "--tokens", "10M", "--experts", "2", "--fit", str(run), "--json")
    assert done.returncode == 0, done.stderr
    import json

    law = json.loads(done.stdout)["law"]
    # One dense point: the shipped law shifted to this corpus; the split gain refitted on this run's f.
    assert law["fitted_on"] == [str(run)] and "0.5" in law["split"]
    assert law["alpha"] == default_law().alpha and law["e"] != default_law().e


def test_a_reader_that_stops_early_gets_no_traceback():
    # `smalltalk plan ... | head -1`: the reader may close before the second line is written. Here it is closed
    # before anything is written, so the write always fails.
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run([sys.executable, "-m", "smalltalk", "plan", "--params", "42k", "--tokens", "17M",
                           "--experts", "4"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr
