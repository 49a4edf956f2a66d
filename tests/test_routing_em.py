"""Router EM (paper Alg. 1 lines 1-10) on real prepared text: balance, specialisation, logs, resume, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from smalltalk.errors import SmallTalkError
from smalltalk.routing import em as em_lib
from smalltalk.routing.analysis import normalized_mutual_info
from smalltalk.routing.config import RouterEMConfig, router_em_preset
from smalltalk.routing.em import sample_iteration_seqs, segments_of, train_routers
from smalltalk.routing.routers_dir import load_routers

CFG = router_em_preset("tiny", device="cpu")  # E=2, M=32, T=3 x 15 steps x 8 seqs, N=240, 64 held-out


@pytest.fixture(scope="module")
def em_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("em") / "run"
    manifest = train_routers(tiny_data, run, CFG, log=lambda msg: None)
    log = [json.loads(line) for line in (run / "routers" / "em_log.jsonl").read_text().splitlines()]
    return run, manifest, log


def _weights(run, E):
    return [load_file(run / "routers" / f"router_{e}" / "model.safetensors") for e in range(E)]


def test_em_balances_specialises_and_logs(em_run, tiny_data):
    run, manifest, log = em_run
    out = run / "routers"
    assert manifest["num_experts"] == 2 and manifest["prefix_len"] == 32 and manifest["iterations_completed"] == 3
    assert [r["iteration"] for r in log] == [1, 2, 3]
    for r in log:
        assert r["segment_sizes"] == [120, 120]  # balanced: N / E each
        assert r["heldout_segment_sizes"] == [32, 32]
        assert len(r["heldout_nll"]) == 2 and all(5.0 < x < np.log(2048) for x in r["heldout_nll"])
        assert np.array(r["domain_table"]).sum() == 240 and 0.0 <= r["nmi"] <= 1.0
        assert r["time_s"]["train"] > 0 and r["exchange_bytes"] == {"bytes_sent": 0, "bytes_received": 0}
    assert log[0]["heldout_changed_fraction"] is None and 0.0 < log[1]["heldout_changed_fraction"] < 1.0
    # Routers learn: held-out prefix NLL falls for each router over the iterations.
    assert all(a > b for a, b in zip(log[0]["heldout_nll"], log[-1]["heldout_nll"]))
    # Routers specialise: on each held-out segment its own router has the lowest NLL, and routing picks
    # up domains (NMI with domains, which routing never reads, grows above chance).
    assert log[-1]["own_router_best_on_segment"] == [True, True] and log[-1]["specialised"]
    assert log[-1]["nmi"] > 0.05
    assert manifest["final"]["specialised"] is True
    # Artefacts: state, plot, comm report, router model directories loadable with the manifest.
    assert json.loads((out / "em_state.json").read_text())["completed_iterations"] == 3
    assert (out / "em_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comm = json.loads((out / "comm.json").read_text())
    assert comm["world_size"] == 1 and comm["ranks"][0]["bytes_sent"] == 0 and comm["exchanges"] == 3
    models, m2 = load_routers(out)
    assert len(models) == 2 and m2 == manifest
    assert models[0].config.max_seq_len == 128 and models[0].config.vocab_size == 2048
    assert not (out / "work" / "router_0" / "model").exists()  # only one copy of the final weights
    assert len(list((out / "work" / "router_0" / "checkpoints").glob("step_*"))) == 2  # kept for resuming


def test_interrupted_run_resumes_to_the_same_result(em_run, tiny_data, tmp_path, monkeypatch):
    """Crash in iteration 2 after the routers trained (their checkpoints are one iteration ahead of the EM
    state), then re-run: the result equals the uninterrupted run exactly."""
    run_ref, _, log_ref = em_run
    run = tmp_path / "run"
    calls = {"n": 0}
    real = em_lib.StackedRouters

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(em_lib, "StackedRouters", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_routers(tiny_data, run, CFG, log=lambda msg: None)
    monkeypatch.setattr(em_lib, "StackedRouters", real)
    assert json.loads((run / "routers" / "em_state.json").read_text())["completed_iterations"] == 1
    messages = []
    train_routers(tiny_data, run, CFG, log=messages.append)
    assert "resuming after iteration 1" in messages[0]
    log = [json.loads(line) for line in (run / "routers" / "em_log.jsonl").read_text().splitlines()]
    assert [r["heldout_nll"] for r in log] == [r["heldout_nll"] for r in log_ref]
    for i in range(4):
        np.testing.assert_array_equal(np.load(run / "routers" / "work" / f"assign_{i:04d}.npy"),
                                      np.load(run_ref / "routers" / "work" / f"assign_{i:04d}.npy"))
    for a, b in zip(_weights(run, 2), _weights(run_ref, 2)):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sampling_is_without_replacement_and_seeded():
    seqs = [sample_iteration_seqs(1000, 300, i, seed=3) for i in range(5)]  # 3 batches per epoch of 1000
    assert len(np.unique(np.concatenate(seqs[:3]))) == 900  # no repeats within an epoch
    assert all(len(np.unique(s)) == 300 for s in seqs)
    assert not np.array_equal(np.sort(np.concatenate(seqs[:3])), np.sort(np.concatenate(seqs[3:5] + seqs[:1])))
    np.testing.assert_array_equal(seqs[1], sample_iteration_seqs(1000, 300, 1, seed=3))
    assert not np.array_equal(seqs[1], sample_iteration_seqs(1000, 300, 1, seed=4))


def test_nmi_matches_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    from smalltalk.routing.analysis import contingency

    rng = np.random.default_rng(0)
    a, d = rng.integers(0, 4, 500), rng.integers(0, 6, 500)
    d[:200] = a[:200]  # some dependence
    assert normalized_mutual_info(contingency(a, d, 4, 6)) == pytest.approx(normalized_mutual_info_score(d, a))
    assert normalized_mutual_info(np.ones((1, 3))) == 0.0


# ----------------------------------------------------------------------------- bad input


def test_too_few_experts_or_sequences():
    with pytest.raises(SmallTalkError, match="num_experts=1: a mixture needs at least 2"):
        RouterEMConfig(num_experts=1)
    with pytest.raises(SmallTalkError, match="num_experts=4 > seqs_per_iteration=3"):
        RouterEMConfig(num_experts=4, seqs_per_iteration=3)
    with pytest.raises(SmallTalkError, match="score_dtype"):
        RouterEMConfig(score_dtype="int8")


def test_prefix_longer_than_sequences(tiny_data, tmp_path):
    with pytest.raises(SmallTalkError, match="prefix_len=129 is longer than the data's sequences"):
        train_routers(tiny_data, tmp_path / "run", CFG.replace(prefix_len=129), log=lambda msg: None)
    with pytest.raises(SmallTalkError, match="more than the train split"):
        train_routers(tiny_data, tmp_path / "run", CFG.replace(seqs_per_iteration=10**6), log=lambda msg: None)


def test_empty_segment_is_refused(em_run, tiny_data, tmp_path):
    with pytest.raises(SmallTalkError, match=r"EM iteration 4: router\(s\) \[1\] got no sequences"):
        segments_of(np.arange(6), np.zeros(6, dtype=np.int64), 2, 4)
    # A damaged assignment on disk is caught on resume before any training.
    run = tmp_path / "run"
    shutil.copytree(em_run[0], run)
    np.save(run / "routers" / "work" / "assign_0003.npy", np.zeros(240, dtype=np.int64))
    with pytest.raises(SmallTalkError, match=r"router\(s\) \[1\] got no sequences"):
        train_routers(tiny_data, run, CFG.replace(iterations=4), log=lambda msg: None)


def test_resume_with_other_settings_or_data_is_refused(em_run, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(em_run[0], run)
    with pytest.raises(SmallTalkError, match="other EM settings .*prefix_len: 32 -> 16"):
        train_routers(tiny_data, run, CFG.replace(prefix_len=16), log=lambda msg: None)
    other = tmp_path / "data"
    shutil.copytree(tiny_data, other)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text() + "\n")  # another tokenizer file (sha256 differs)
    with pytest.raises(SmallTalkError, match="other data .*tokenizer_sha256"):
        train_routers(other, run, CFG, log=lambda msg: None)



def test_score_exchange_rounding_is_the_same_on_one_worker():
    from smalltalk.routing.distributed import Workers

    scores = np.array([[-2301.37, -2299.91], [-12.3456, -12.3457]], dtype=np.float32)
    one = Workers()
    np.testing.assert_array_equal(one.all_gather_scores(scores, 2, "float32"), scores)
    half = one.all_gather_scores(scores, 2, "float16")  # what 2 workers exchanging fp16 would see
    np.testing.assert_array_equal(half, scores.astype(np.float16).astype(np.float32))
    assert one.bytes_sent == 0 and one.owned(3) == [0, 1, 2]
