"""Nothing silent: one writer per directory, damaged weights and data found by name, stages that refuse
inputs made by another producer. Each test reproduces a failure that used to pass silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smalltalk.cli import main
from smalltalk.data.shards import HEADER_BYTES, TokenDataset
from smalltalk.errors import SmallTalkError
from smalltalk.io import atomic_write_json, read_json
from smalltalk.locks import DirLock
from smalltalk.run.experts import train_expert
from smalltalk.run.layout import RunLayout
from smalltalk.run.pipeline import run_pipeline
from smalltalk.model.config import preset
from smalltalk.model.io import load_model_dir, save_model_dir
from smalltalk.model.transformer import Transformer
from smalltalk.data.splits import load_split
from smalltalk.train.trainer import model_config_for_data
from test_pipeline import copy_run, fast_config, sharded_run  # noqa: F401  (module fixture reused)


# -- 1. one writer per directory ---------------------------------------------------------------------------

def test_second_run_on_the_same_directory_is_refused_naming_the_holder(sharded_run, tmp_path, capsys):
    run = copy_run(sharded_run, tmp_path / "run")
    stages = RunLayout(run).stages.read_text()
    with DirLock(run, "smalltalk run"):
        with pytest.raises(SmallTalkError, match=rf"is in use by smalltalk run \(pid {os.getpid()} on .*, since "):
            run_pipeline(fast_config(), run, log=lambda m: None)
        cfg = tmp_path / "fast.json"
        cfg.write_text(json.dumps(fast_config().to_dict()))
        assert main(["run", "--config", str(cfg), "--out", str(run)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert RunLayout(run).stages.read_text() == stages  # the refused run changed nothing


def test_experts_lock_their_own_directory_only(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    with DirLock(RunLayout(run).expert(0), "training expert 0"):
        with pytest.raises(SmallTalkError, match="is in use by training expert 0"):
            train_expert(run, 0, log=lambda m: None)
        train_expert(run, 1, log=lambda m: None)  # another expert of the same run trains meanwhile
    assert (RunLayout(run).expert(1) / "model" / "model.safetensors").is_file()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from smalltalk.locks import DirLock\n"
        f"lock = DirLock({str(tmp_path / 'd')!r}, 'test holder').__enter__(); print('held', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SmallTalkError, match=rf"in use by test holder \(pid {holder.pid} "):
            DirLock(tmp_path / "d", "me").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with DirLock(tmp_path / "d", "me"):
        pass


def test_out_pointing_at_a_file_is_a_one_line_error(tmp_path, tiny_data, capsys):
    file = tmp_path / "afile"
    file.write_text("x")
    assert main(["train", "--data", str(tiny_data), "--model-preset", "tiny", "--train-preset", "tiny",
                 "--out", str(file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["run", "--config", "tiny", "--out", str(file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["train-routers", "--data", str(tiny_data), "--out", str(file), "--preset", "tiny"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["shard", "--data", str(tiny_data), "--routers", str(tmp_path), "--out", str(file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


# -- 2. damaged weights --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory):
    split = load_split(tiny_data, "test")
    torch.manual_seed(0)
    model = Transformer(model_config_for_data(preset("tiny"), split))
    return save_model_dir(tmp_path_factory.mktemp("m") / "model", model, split.tokenizer_file)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_weight_bytes_are_refused_by_every_command(model_dir, tiny_data, tmp_path, capsys):
    bad = _copy(model_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # still a readable safetensors file, one weight changed
    weights.write_bytes(bytes(raw))
    for argv in (["evaluate", str(bad), "--data", str(tiny_data), "--max-seqs", "4"],
                 ["generate", str(bad), "--prompt", "The", "--max-new-tokens", "3"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "model.safetensors: corrupt or truncated, its sha256 differs" in err and err.count("\n") == 1


def test_nan_weights_with_a_valid_checksum_are_refused(model_dir, tiny_data, tmp_path, capsys):
    model, _ = load_model_dir(model_dir)
    with torch.no_grad():
        model.layers[0].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    nan_dir = save_model_dir(tmp_path / "nan", model, model_dir / "tokenizer.json")
    assert main(["evaluate", str(nan_dir), "--data", str(tiny_data), "--max-seqs", "4"]) == 2
    assert "layers.0.mlp.dense_h_to_4h.weight holds NaN" in capsys.readouterr().err
    assert main(["generate", str(nan_dir), "--prompt", "The", "--max-new-tokens", "3"]) == 2
    assert "holds NaN" in capsys.readouterr().err


def test_swapped_tokenizer_of_the_same_size_is_refused(model_dir, tmp_path, corpus_dir):
    from smalltalk.data.tokenizer import train_tokenizer

    other = _copy(model_dir, tmp_path / "other")
    vocab = json.loads((model_dir / "config.json").read_text())["model"]["vocab_size"]
    texts = [json.loads(line)["text"] for line in __import__("gzip").open(corpus_dir / "train" / "code_python.jsonl.gz",
                                                                         "rt").readlines()[:200]]
    train_tokenizer(texts, vocab, other / "tokenizer.json")
    with pytest.raises(SmallTalkError, match=r"tokenizer.json: not the tokenizer this model was trained with"):
        load_model_dir(other)


# -- 3. inputs made by another producer ------------------------------------------------------------------------

def test_shards_routed_by_other_routers_are_refused(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    layout = RunLayout(run)
    manifest = read_json(layout.shards_manifest)
    manifest["routers"]["weights_sha256"] = ["0" * 64] * len(manifest["routers"]["weights_sha256"])
    manifest["routers"]["dir"] = "/elsewhere/routers"
    atomic_write_json(layout.shards_manifest, manifest)
    with pytest.raises(SmallTalkError, match=r"routed by other routers \(/elsewhere/routers\)"):
        train_expert(run, 0, log=lambda m: None)
    assert not layout.expert(0).exists()


def test_bundle_refuses_an_expert_trained_on_other_shards(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path / "run")
    layout = RunLayout(run)
    train_expert(run, 0, log=lambda m: None)
    train_expert(run, 1, log=lambda m: None)
    manifest = read_json(layout.shards_manifest)
    manifest["elapsed_s"] = 0.0  # the shards were re-made after expert 0 trained
    atomic_write_json(layout.shards_manifest, manifest)
    with pytest.raises(SmallTalkError, match=r"expert 0 was trained on other shards"):
        run_pipeline(fast_config(), run, until="bundle", log=lambda m: None)


# -- 4. corrupt token data -------------------------------------------------------------------------------------

def test_overwritten_shard_bytes_are_found_when_opened(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted((data / "test").glob("shard_*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 100:HEADER_BYTES + 104] = b"\xff\xff\xff\xff"  # two token ids past any vocabulary
    shard.write_bytes(bytes(raw))
    with pytest.raises(SmallTalkError, match=rf"{shard.name}: CRC-32 .* differs"):
        TokenDataset.from_dir(data / "test")


def test_out_of_vocabulary_ids_in_an_unchecked_shard_are_found(tiny_data, tmp_path):
    from smalltalk.data.shards import write_shard

    path = tmp_path / "shard_00000.bin"
    tokens = TokenDataset.from_dir(tiny_data / "test").get(np.arange(4))
    write_shard(path, tokens, None, 2048)
    raw = bytearray(path.read_bytes())
    raw[40:52] = bytes(12)  # a shard written before checksums were recorded
    np.frombuffer(raw, dtype="<u2", count=1, offset=HEADER_BYTES + 2 * 7)  # (layout check)
    raw[HEADER_BYTES + 14:HEADER_BYTES + 16] = (5000).to_bytes(2, "little")  # id 5000 >= vocab 2048
    path.write_bytes(bytes(raw))
    with pytest.raises(SmallTalkError, match=r"token id 5000 is outside the vocabulary \(size 2048\)"):
        TokenDataset.from_dir(tmp_path)


# -- stage time of interrupted runs -----------------------------------------------------------------------------

def test_stage_clock_keeps_the_time_of_an_interrupted_attempt(tmp_path):
    from smalltalk.run.pipeline import StageClock

    path = tmp_path / "stages.json"
    timings = {"experts": 100.0}  # a killed attempt recorded 100 s
    with StageClock(path, timings, "experts", every_s=0.01):
        deadline = time.monotonic() + 60
        while read_json(path).get("experts", 0) <= 100.0 if path.exists() else True:
            assert time.monotonic() < deadline, "the clock never wrote the running stage"
            time.sleep(0.01)
    assert read_json(path)["experts"] > 100.0  # the attempts add up
    with pytest.raises(RuntimeError):
        with StageClock(path, timings, "evaluate", every_s=60):
            raise RuntimeError("stage failed")
    assert "evaluate" in read_json(path)  # a failed attempt's time is kept too


# -- one-line errors where tracebacks were, and quiet surprises ----------------------------------------------

def _smalltalk(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smalltalk", *args], input=stdin, capture_output=True, timeout=600)


def test_non_utf8_prompts_are_refused_by_generate_and_route(model_dir, tiny_mixture):
    for cmd in (["generate", str(model_dir)], ["route", str(tiny_mixture["bundle"])]):
        proc = _smalltalk(*cmd, "--prompt", b"caf\xe9 au lait")  # Latin-1 bytes on the command line
        assert proc.returncode == 2 and b"--prompt: not UTF-8 text" in proc.stderr and b"Traceback" not in proc.stderr
        proc = _smalltalk(*cmd, "--prompt", "-", stdin=b"caf\xe9 au lait")
        assert proc.returncode == 2 and b"standard input is not UTF-8 text (byte 0xe9 at offset 3)" in proc.stderr


def test_eval_mixture_out_is_checked_before_the_work(tiny_mixture, tiny_data, tmp_path, capsys):
    argv = ["eval-mixture", "--bundle", str(tiny_mixture["bundle"]), "--dense", str(tiny_mixture["dense"]),
            "--data", str(tmp_path / "does-not-matter"), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert f"--out {tmp_path}: is a directory" in capsys.readouterr().err


def test_lower_or_higher_is_worded_for_humans():
    from smalltalk.cli.eval_mixture import lower_or_higher

    assert lower_or_higher(3.1) == "3.10% lower" and lower_or_higher(-0.8) == "0.80% higher (worse)"


def test_yaml_mistakes_are_named_before_any_stage_runs(tmp_path, capsys):
    cases = {"preset: tiny\nexpert_train: {lr: fast}\n": "expert_train: train config: lr='fast' must be a float",
             "name: only-a-name\n": "no `preset:` line and no num_experts, prefix_len, data",
             "preset: tiny\nprefix_len: 500\n": "prefix_len=500 is longer than the data's sequences (data.seq_len=128)",
             "preset: tiny\nexpert_model: {num_layers: two}\n": "num_layers='two' must be an int"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        assert main(["run", "--config", str(path), "--out", str(tmp_path / f"run{i}")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / f"run{i}").exists()  # nothing prepared


def test_written_directories_respect_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        model, _ = load_model_dir(model_dir)
        out = save_model_dir(tmp_path / "shared", model, model_dir / "tokenizer.json")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
