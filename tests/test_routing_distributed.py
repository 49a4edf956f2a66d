"""Router EM and sharding from the CLI, on 1 process and on 2 torchrun workers (gloo, real processes).

The single-process runs happen in this process through the CLI entry point; the 2-worker runs are
`torchrun --nproc_per_node 2 -m smalltalk ...` subprocesses. One thread per process everywhere, so
that float results can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from smalltalk.cli import main
from smalltalk.data.shards import TokenDataset
from smalltalk.routing.routers_dir import routers_dir
from smalltalk.routing.sharding import load_assignment

E, T = 3, 3  # 3 routers over 2 workers: rank 0 owns routers 0 and 2, rank 1 owns router 1
EM_FLAGS = ["--preset", "tiny", "--num-experts", str(E), "--iterations", str(T), "--threads", "1", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--monitor-interval", "0.2", "-m", "smalltalk"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _in_process(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _weights(routers: Path) -> list[dict]:
    return [load_file(routers / f"router_{e}" / "model.safetensors") for e in range(E)]


def _workers(parent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of the launcher)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid != parent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One uninterrupted single-process run, and a 2-worker run whose worker 1 is killed mid-iteration and
    which is then resumed with 2 workers."""
    root = tmp_path_factory.mktemp("dist")
    single, double = root / "single", root / "double"
    assert _in_process(["train-routers", "--data", str(tiny_data), "--out", str(single), *EM_FLAGS]) == 0

    cmd = [*TORCHRUN, "train-routers", "--data", str(tiny_data), "--out", str(double), *EM_FLAGS]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = routers_dir(double) / "em_state.json"
    deadline = time.time() + 120
    killed = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["completed_iterations"] >= 1:
            killed = _workers(proc.pid).get(1)
            if killed:
                os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    crash = {"returncode": proc.returncode, "stderr": err, "killed": killed,
             "state": json.loads(state.read_text())}
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"single": single, "double": double, "crash": crash, "resumed": resumed}


def test_worker_death_fails_clearly_and_resumes(runs):
    crash = runs["crash"]
    assert crash["killed"] is not None, "worker 1 was not found to kill"
    assert crash["returncode"] != 0
    assert 1 <= crash["state"]["completed_iterations"] < T  # the iterations done before the kill are kept
    # The surviving worker says what happened and how to go on.
    assert "re-run the same command to resume" in crash["stderr"], crash["stderr"][-3000:]
    assert f"resuming after iteration {crash['state']['completed_iterations']}" in runs["resumed"].stderr


def test_one_process_and_two_workers_give_identical_routers(runs):
    single, double = routers_dir(runs["single"]), routers_dir(runs["double"])
    for i in range(T + 1):
        np.testing.assert_array_equal(np.load(single / "work" / f"assign_{i:04d}.npy"),
                                      np.load(double / "work" / f"assign_{i:04d}.npy"))
    for a, b in zip(_weights(single), _weights(double)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    log1 = [json.loads(line) for line in (single / "em_log.jsonl").read_text().splitlines()]
    log2 = [json.loads(line) for line in (double / "em_log.jsonl").read_text().splitlines()]
    for r1, r2 in zip(log1, log2, strict=True):
        for key in ("segment_sizes", "heldout_nll", "heldout_nll_by_segment", "train_loss", "domain_table"):
            assert r1[key] == r2[key], key
        assert r1["segment_sizes"] == [120, 120, 120]  # N = 15 steps x 8 x 3
    assert log1[-1]["own_router_best_on_segment"] == [True] * E


def test_score_exchange_bytes_are_counted(runs):
    comm = json.loads((routers_dir(runs["double"]) / "comm.json").read_text())
    manifest = json.loads((routers_dir(runs["double"]) / "manifest.json").read_text())
    N, H = manifest["em"]["num_seqs_resolved"], manifest["em"]["heldout_seqs"]
    assert comm["world_size"] == 2 and [r["rank"] for r in comm["ranks"]] == [0, 1]
    # Per exchange a rank sends (P - 1) = 1 block of (N + H + 1) rows x ceil(E / P) = 2 float32 scores.
    per_exchange = (N + H + 1) * 2 * 4
    for r in comm["ranks"]:
        assert r["bytes_sent"] == r["bytes_received"] == per_exchange * r["exchanges"]
        assert r["routing_bytes_sent"] == N * 2 * 4 * r["exchanges"]
    # Rank 1 was killed after at least one exchange and redid none; every exchange is counted once per run.
    assert comm["ranks"][0]["exchanges"] >= T
    est = comm["estimate"]
    assert est["sequences_per_comm"] == pytest.approx(N) and est["bytes_per_score"] == 4
    assert est["allgather_bytes_per_worker_per_comm"] == pytest.approx(0.5 * N * E * 4)


@pytest.fixture(scope="module")
def small_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data with its train split cut to the first 1500 sequences (same tokenizer), to shard quickly."""
    from smalltalk.data.shards import write_shard

    root = tmp_path_factory.mktemp("small") / "data"
    shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns("train"))
    source = TokenDataset.from_dir(tiny_data / "train")
    keep = np.arange(1500)
    write_shard(root / "train" / "shard_00000.bin", source.get(keep), source.domains(keep), source.vocab_size)
    manifest = json.loads((root / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    train.update(shards=[{"file": "train/shard_00000.bin", "num_seqs": 1500}], num_seqs=1500,
                 num_tokens=1500 * source.seq_len, num_bytes=int(train["num_bytes"] * 1500 / len(source)))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_shard_on_two_workers_matches_one_process_and_loses_nothing(runs, small_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    rdir = routers_dir(runs["single"])
    tiny_data = small_data
    assert _in_process(["shard", "--data", str(tiny_data), "--routers", str(rdir), "--out", str(one),
                        "--chunk-size", "400", "--threads", "1"]) == 0
    res = subprocess.run([*TORCHRUN, "shard", "--data", str(tiny_data), "--routers", str(routers_dir(runs["double"])),
                          "--out", str(two), "--chunk-size", "400", "--threads", "1"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["splits"] == m2["splits"]
    for e in range(E):
        for p1 in sorted((one / f"expert_{e}" / "train").glob("shard_*.bin")):
            assert p1.read_bytes() == (two / f"expert_{e}" / "train" / p1.name).read_bytes()

    # Union of the expert datasets == the input, none lost or duplicated (tokens and domain ids).
    source = TokenDataset.from_dir(tiny_data / "train")
    n = len(source)
    info = m1["splits"]["train"]
    assert info["num_seqs"] == n == 1500 and sum(info["counts"]) == n and info["num_chunks"] == 4
    assert max(info["counts"]) - min(info["counts"]) <= info["num_chunks"]  # balanced within every chunk
    assignment = load_assignment(one)
    # Chunks are seeded samples of the whole split, not runs of consecutive sequences: prepared data is stored one
    # domain after another, and balancing a one-domain chunk would spread that domain evenly over every expert.
    split_domains = np.bincount(source.domains(), minlength=10)
    for c in range(info["num_chunks"]):
        per_domain = np.asarray(json.loads((one / "work" / f"train_chunk_{c:06d}.json").read_text())
                                ["domain_counts"]).sum(axis=0)  # (D,)
        assert (per_domain[:len(split_domains)][split_domains >= 40] > 0).all(), (c, per_domain, split_domains)
    chunks = [(np.load(one / "work" / f"train_index_{c:06d}.npy"), np.load(one / "work" / f"train_assign_{c:06d}.npy"))
              for c in range(info["num_chunks"])]
    for e in range(E):
        expert = TokenDataset.from_dir(one / f"expert_{e}" / "train")
        mine = np.concatenate([idx[a == e] for idx, a in chunks])  # chunk by chunk, ascending within a chunk
        np.testing.assert_array_equal(np.sort(mine), np.flatnonzero(assignment == e))
        assert len(expert) == len(mine) == info["counts"][e]
        np.testing.assert_array_equal(expert.get(np.arange(len(expert))), source.get(mine))
        np.testing.assert_array_equal(expert.domains(), source.domains(mine))
        # Each expert directory is a prepared-data directory the trainer can read.
        em = json.loads((one / f"expert_{e}" / "manifest.json").read_text())
        assert em["splits"]["train"]["num_seqs"] == len(expert) and (one / f"expert_{e}" / "tokenizer.json").is_file()
    # Resuming a finished sharding does nothing new and gives the same manifest counts.
    assert _in_process(["shard", "--data", str(tiny_data), "--routers", str(rdir), "--out", str(one),
                        "--chunk-size", "400", "--threads", "1"]) == 0
    assert json.loads((one / "manifest.json").read_text())["splits"] == m1["splits"]
    # An interrupted sharding (chunk 2 never finished) redoes only that chunk, with the same bytes.
    before = {p: p.read_bytes() for p in one.glob("expert_*/train/shard_00002.bin")}
    (one / "work" / "train_chunk_000002.json").unlink()
    for p in before:
        p.unlink()
    assert _in_process(["shard", "--data", str(tiny_data), "--routers", str(rdir), "--out", str(one),
                        "--chunk-size", "400", "--threads", "1"]) == 0
    assert all(p.read_bytes() == data for p, data in before.items()) and len(before) == E


def test_shard_refuses_routers_of_another_tokenizer(runs, small_data, tmp_path, capsys):
    other = tmp_path / "data"
    shutil.copytree(small_data, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    code = _in_process(["shard", "--data", str(other), "--routers", str(routers_dir(runs["single"])),
                        "--out", str(tmp_path / "out")])
    assert code == 2
    assert "routers were trained with tokenizer sha256" in capsys.readouterr().err
    assert not (tmp_path / "out" / "expert_0").exists()
