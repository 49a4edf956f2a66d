"""`eval-mixture --text` / `evaluate --text`: a trained mixture (and its dense model) on your own files."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.mixture.inference import Mixture, token_logprobs
from smalltalk.mixture.text_eval import evaluate_text, text_sequences
from smalltalk.model.io import load_model_dir


@pytest.fixture(scope="module")
def my_text(corpus_dir, tmp_path_factory):
    """A folder as a user has it: two .txt files and a .jsonl with a domain field (real test-split text)."""
    root = tmp_path_factory.mktemp("my_text")

    def docs(domain, n):
        with gzip.open(corpus_dir / "test" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line) for _, line in zip(range(n), f)]

    (root / "notes.txt").write_text("\n\n".join(d["text"] for d in docs("wiki_en", 2))[:6000], encoding="utf-8")
    (root / "script.txt").write_text("\n\n".join(d["text"] for d in docs("code_python", 2))[:6000], encoding="utf-8")
    with open(root / "mixed.jsonl", "w", encoding="utf-8") as f:
        for d in docs("news_en", 2) + docs("code_python", 1):
            f.write(json.dumps({"text": d["text"][:3000], "domain": d["domain"]}) + "\n")
    return root


def test_every_token_is_scored_by_its_routed_expert(tiny_mixture, my_text):
    result = evaluate_text(tiny_mixture["bundle"], [str(my_text)], dense=tiny_mixture["dense"], progress=False)
    assert set(result["groups"]) == {"notes.txt", "script.txt", "news_en", "code_python"}
    total = result["total"]
    assert total["num_tokens"] == sum(g["num_tokens"] for g in result["groups"].values())
    assert total["num_seqs"] == sum(total["experts"].values())
    # The same numbers computed directly, sequence by sequence.
    mixture = Mixture.load(tiny_mixture["bundle"], max_loaded_experts=2)
    dense, _ = load_model_dir(tiny_mixture["dense"])
    nll = dense_nll = tokens = 0.0
    for _, ids in text_sequences([str(my_text)], mixture.tokenizer, mixture.info.seq_len):
        x = np.array([ids])
        expert = int(np.argmax(_prefix_scores(mixture, ids)))  # packed sequences: routed on their first M tokens
        nll -= token_logprobs(mixture.expert(expert), x).sum()
        dense_nll -= token_logprobs(dense, x).sum()
        tokens += len(ids) - 1
    assert total["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert total["dense_ppl"] == pytest.approx(math.exp(dense_nll / tokens), rel=1e-4)
    # code goes to the code expert, English prose to the wiki expert
    assert result["groups"]["script.txt"]["experts"].get(1, 0) > result["groups"]["script.txt"]["experts"].get(0, 0)
    assert result["groups"]["notes.txt"]["experts"].get(0, 0) > result["groups"]["notes.txt"]["experts"].get(1, 0)
    assert {r["expert"] for r in result["per_expert"]} == {0, 1}


def _prefix_scores(mixture, ids):
    from smalltalk.mixture.inference import router_scores

    window = np.array([ids[:mixture.info.prefix_len]])
    return router_scores(mixture.routers, window, [window.shape[1]])[0]


def test_cli_scores_a_folder_in_one_command(tiny_mixture, my_text, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval-mixture", str(tiny_mixture["bundle"]), "--text", str(my_text), "--dense",
                 str(tiny_mixture["dense"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixture, all text:" in printed and "script.txt:" in printed and "expert 1 (" in printed
    assert json.loads(out.read_text())["kind"] == "mixture"
    assert main(["evaluate", str(tiny_mixture["dense"]), "--text", str(my_text / "notes.txt"), "--max-seqs", "3"]) == 0
    assert "model, all text: 3 sequences" in capsys.readouterr().out
    assert main(["evaluate", str(tiny_mixture["dense"])]) == 2
    assert "give --data DATA_DIR" in capsys.readouterr().err
    assert main(["eval-mixture", str(tiny_mixture["bundle"]), "--text", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err


def test_empty_text_is_refused(tiny_mixture, tmp_path):
    (tmp_path / "a.txt").write_text("   \n")
    with pytest.raises(SmallTalkError, match=r"a.txt: empty file"):
        evaluate_text(tiny_mixture["bundle"], [str(tmp_path / "a.txt")], progress=False)
