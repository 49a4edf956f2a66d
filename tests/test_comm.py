"""Paper App. A.4 communication estimates, and reading a run's measured bytes."""

from __future__ import annotations

import json
import math

import pytest

from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json
from smalltalk.routing.comm import (
    allgather_bytes_per_worker,
    bytes_per_router_per_comm,
    comm_estimate,
    data_parallel_bytes_per_step,
    expert_comm_interval,
    num_communications,
    read_measured_comm,
    sequences_per_comm,
    tokens_between_comms_for,
)


def test_paper_numbers():
    # 128k router steps, B_r = 32, S = 1024, T = 45M: "N_comm ~ 94 < 1e2" (93.2, rounded up).
    n = num_communications(128_000, 1024, 32, 45e6)
    assert n == pytest.approx(93.2067, abs=1e-4)
    assert math.ceil(n) == 94
    # "4 x 45e6 x 32 / 1024 = 5.625 MB" per router.
    assert bytes_per_router_per_comm(32, 1024, 45e6) == 5_625_000
    assert sequences_per_comm(32, 1024, 45e6) == 1_406_250
    # Sec. 2.2: "2MB per 1M sequences" in 16-bit floats (one score per sequence).
    assert bytes_per_router_per_comm(1, 1, 1e6) / 2 == 2e6
    # Eq. 17: (2^31 - 1) / (2 x 128 x E) ~ 2^23 / E, = 2^18 at E = 32.
    for E in (4, 8, 16, 32):
        assert expert_comm_interval(2**31 - 1, 128, E) == pytest.approx(2**23 / E, rel=1e-9)
    assert round(expert_comm_interval(2**31 - 1, 128, 32)) == 2**18
    # Data parallel, W = 1.3e9 in fp32: 10.4 GB per node per step.
    assert data_parallel_bytes_per_step(1.3e9) == pytest.approx(10.4e9)


def test_comm_estimate_dict():
    est = comm_estimate(32, 1024, 45e6, router_steps=128_000, router_batch_size=32, world_size=32,
                        expert_batch_size=128, message_bytes=2**31 - 1, dense_params=1.3e9)
    assert est["num_comms"] == 94 and est["num_comms_exact"] == pytest.approx(93.2067, abs=1e-4)
    assert est["paper_bytes_per_router_per_comm"] == 5_625_000
    assert est["paper_bytes_per_router_total"] == 94 * 5_625_000
    # All-gather of 32 scores per sequence over 32 workers: each receives 31/32 of N * E * 2 bytes.
    assert est["allgather_bytes_per_worker_per_comm"] == pytest.approx(31 / 32 * 1_406_250 * 32 * 2)
    assert est["data_parallel_bytes_per_step"] == pytest.approx(10.4e9)
    json.dumps(est)  # JSON-ready
    small = comm_estimate(4, 128, tokens_between_comms_for(64, 4, 128), bytes_per_score=4, num_comms=3)
    assert small["sequences_per_comm"] == pytest.approx(64)
    assert small["paper_bytes_per_router_total"] == pytest.approx(3 * 2 * 4 * 64)
    assert small["allgather_bytes_per_worker_per_comm"] is None and small["data_parallel_bytes_per_step"] is None


def test_allgather_two_workers():
    # 2 workers, 4 routers, 100 sequences, fp32: each worker owns 2 x 100 scores, receives the other 200.
    assert allgather_bytes_per_worker(100, 4, 2, bytes_per_score=4) == 200 * 4


@pytest.mark.parametrize("call, match", [
    (lambda: num_communications(0, 1024, 32, 45e6), "router_steps=0"),
    (lambda: sequences_per_comm(32, 1024, -1), "tokens_between_comms=-1"),
    (lambda: comm_estimate(4, 128, 1000, num_comms=0), "num_comms=0"),
    (lambda: allgather_bytes_per_worker(10, 4, 0), "world_size=0"),
])
def test_bad_input(call, match):
    with pytest.raises(SmallTalkError, match=match):
        call()


@pytest.mark.parametrize("payload", [
    {"bytes_sent": [800, 800], "bytes_received": [800, 800]},
    {"bytes_sent": {"0": 800, "1": 800}, "bytes_received": {"0": 800, "1": 800}},
    {"ranks": [{"rank": 0, "bytes_sent": 800, "bytes_received": 800},
               {"rank": 1, "bytes_sent": 800, "bytes_received": 800}]},
])
def test_read_measured_comm_shapes(tmp_path, payload):
    atomic_write_json(tmp_path / "routers" / "comm.json", payload)
    m = read_measured_comm(tmp_path)
    assert m["per_rank"] == [{"rank": 0, "bytes_sent": 800, "bytes_received": 800},
                             {"rank": 1, "bytes_sent": 800, "bytes_received": 800}]


def test_read_measured_comm_missing_and_bad(tmp_path):
    assert read_measured_comm(tmp_path) is None
    atomic_write_json(tmp_path / "routers" / "comm.json", {"bytes_sent": [1, 2], "bytes_received": [1]})
    with pytest.raises(SmallTalkError, match="bytes_sent ranks"):
        read_measured_comm(tmp_path)
    atomic_write_json(tmp_path / "routers" / "comm.json", {"bytes_sent": [-1], "bytes_received": [1]})
    with pytest.raises(SmallTalkError, match="must be a non-negative number"):
        read_measured_comm(tmp_path)


def test_cli_paper_defaults(capsys):
    assert main(["comm"]) == 0
    out = capsys.readouterr().out
    assert "93.2 -> 94" in out and "5.625 MB" in out and "10.40 GB per node per step" in out
    assert "262,144 expert steps" in out


def test_cli_with_run(tmp_path, capsys):
    # No comm.json yet: estimate only, with a clear note.
    assert main(["comm", "--run", str(tmp_path)]) == 0
    assert "routers/comm.json (written by" in capsys.readouterr().out
    # Settings recorded by the run fill in the flags not given.
    atomic_write_json(tmp_path / "routers" / "comm.json", {
        "bytes_sent": [800, 800], "bytes_received": [800, 800],
        "num_experts": 4, "seq_len": 128, "tokens_between_comms": 3200, "bytes_per_score": 4, "num_comms": 1})
    assert main(["comm", "--run", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est = out["estimate"]
    assert est["sequences_per_comm"] == 100 and est["world_size"] == 2 and est["num_comms"] == 1
    assert est["allgather_bytes_per_worker_total"] == 800  # 1/2 of 100 seqs x 4 scores x 4 bytes
    assert [r["bytes_received"] for r in out["measured"]["per_rank"]] == [800, 800]
    assert main(["comm", "--run", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
