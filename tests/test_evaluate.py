"""Evaluation: exact token weighting, bits per byte from the manifest, the `smalltalk evaluate` CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.io import save_model_dir
from smalltalk.model.transformer import Transformer
from smalltalk.train.evaluate import evaluate, evaluate_model_dir
from smalltalk.data.splits import evenly_spaced, load_split
from smalltalk.train.trainer import model_config_for_data


@pytest.fixture(scope="module")
def test_split(tiny_data):
    return load_split(tiny_data, "test")


@pytest.fixture(scope="module")
def model_dir(test_split, tmp_path_factory):
    torch.manual_seed(3)
    model = Transformer(model_config_for_data(preset("tiny"), test_split))
    return save_model_dir(tmp_path_factory.mktemp("eval") / "model", model, test_split.tokenizer_file)


def test_loss_is_token_weighted_and_batch_size_independent(test_split):
    torch.manual_seed(0)
    model = Transformer(model_config_for_data(preset("tiny"), test_split)).eval()
    indices = evenly_spaced(len(test_split.dataset), 11)
    a = evaluate(model, test_split.dataset, indices, batch_size=3)
    b = evaluate(model, test_split.dataset, indices, batch_size=11)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    S = test_split.dataset.seq_len
    assert (a.num_seqs, a.num_tokens) == (11, 11 * (S - 1))
    # Reference: one forward over all 11 sequences, mean cross-entropy over every predicted token.
    x = torch.from_numpy(test_split.dataset.get(indices))
    with torch.no_grad():
        _, ref = model(x[:, :-1], x[:, 1:])
    assert a.loss == pytest.approx(ref.item(), rel=1e-5)
    assert a.ppl == pytest.approx(math.exp(a.loss))
    # An untrained model is close to uniform over the vocabulary.
    assert abs(a.loss - math.log(model.config.vocab_size)) < 0.3


def test_bits_per_byte_uses_the_manifest_byte_count(tiny_data, test_split):
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    info = manifest["splits"]["test"]
    torch.manual_seed(0)
    model = Transformer(model_config_for_data(preset("tiny"), test_split)).eval()
    indices = evenly_spaced(len(test_split.dataset), 8)
    result = evaluate(model, test_split.dataset, indices, batch_size=8, bytes_per_token=test_split.bytes_per_token)
    bytes_covered = info["num_bytes"] * result.num_tokens / info["num_tokens"]
    assert result.bpb == pytest.approx(result.loss * result.num_tokens / math.log(2) / bytes_covered, rel=1e-9)
    assert 0.5 < info["num_bytes"] / info["num_tokens"] < 10  # a BPE token is a few bytes of text


def test_prefix_scoring_and_evenly_spaced_subset(test_split):
    assert evenly_spaced(10, 0).tolist() == list(range(10))
    assert evenly_spaced(10, 3).tolist() == [0, 4, 9] or evenly_spaced(10, 3).tolist() == [0, 5, 9]
    torch.manual_seed(0)
    model = Transformer(model_config_for_data(preset("tiny"), test_split)).eval()
    result = evaluate(model, test_split.dataset, np.arange(4), prefix_len=9)
    assert result.num_tokens == 4 * 8


def test_evaluate_model_dir_and_cli(model_dir, tiny_data, tmp_path, capsys):
    direct = evaluate_model_dir(model_dir, tiny_data, "test", max_seqs=16, batch_size=8)
    code = main(["evaluate", str(model_dir), "--data", str(tiny_data), "--split", "test", "--max-seqs", "16",
                 "--json", str(tmp_path / "eval.json")])
    assert code == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["loss"] == pytest.approx(direct.loss, rel=1e-6) and record["num_seqs"] == 16
    assert "test: loss" in capsys.readouterr().out


def test_evaluate_refuses_other_tokenizer(model_dir, tiny_data, tmp_path, capsys):
    import shutil

    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["tokenizer_sha256"] = "f" * 64  # a model trained with another tokenizer, shipped without it
    (other / "config.json").write_text(json.dumps(config))
    (other / "tokenizer.json").unlink()
    with pytest.raises(SmallTalkError, match="tokenizer sha256 ffffffffffff"):
        evaluate_model_dir(other, tiny_data, "test", max_seqs=4)
    assert main(["evaluate", str(other), "--data", str(tiny_data)]) == 2
    assert "error:" in capsys.readouterr().err


def test_evaluate_refuses_short_context_and_missing_split(test_split, tiny_data, tmp_path):
    cfg = model_config_for_data(preset("tiny"), test_split)
    short = save_model_dir(tmp_path / "short", Transformer(cfg.replace(max_seq_len=cfg.max_seq_len // 2)), None)
    with pytest.raises(SmallTalkError, match="longer than the context"):
        evaluate_model_dir(short, tiny_data, "test", max_seqs=4)
    with pytest.raises(SmallTalkError, match="no split 'dev'"):
        evaluate_model_dir(short, tiny_data, "dev")
    with pytest.raises(SmallTalkError, match="model directory not found"):
        evaluate_model_dir(tmp_path / "nope", tiny_data, "test")
