"""Hugging Face export: transformers loads the directory without custom code and reproduces our logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sample_text import documents
from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.model.config import preset
from smalltalk.model.generate import encode, eos_token_id, generate
from smalltalk.model.hf_export import export_hf
from smalltalk.model.io import save_model_dir
from smalltalk.model.transformer import Transformer

os.environ["HF_HUB_OFFLINE"] = "1"  # everything below is local files
transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def text_domains() -> tuple[str, ...]:
    """The domains of the tokenizer and test texts here (overrides conftest's)."""
    return ("wiki_en", "code_python", "novels_de", "legal_en", "math_en")


@pytest.fixture(scope="module")
def test_texts(corpus_dir, text_domains):
    return [text[:1500] for text in documents(corpus_dir, "test", text_domains, 1, min_chars=1500)]


def nontrivial_model(vocab_size: int, tie: bool) -> Transformer:
    """Random init where every tensor matters: larger weights, random biases and LayerNorm affines."""
    torch.manual_seed(1 if tie else 2)
    model = Transformer(preset("tiny", vocab_size=vocab_size, tie_embeddings=tie, init_std=0.1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tokenizer, tokenizer_file, tmp_path_factory):
    tie = request.param
    model = nontrivial_model(tokenizer.vocab_size, tie)
    root = tmp_path_factory.mktemp("tied" if tie else "untied")
    model_dir = save_model_dir(root / "model", model, tokenizer_file)
    out = export_hf(model_dir, None, root / "hf")
    return model, model_dir, out


def test_transformers_loads_export_and_logits_match(exported, tokenizer, test_texts):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    model, _, out = exported
    hf_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    hf_model.eval()
    assert isinstance(hf_model, GPTNeoXForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = hf_model.config
    assert (cfg.hidden_act, cfg.use_parallel_residual, cfg.tie_word_embeddings) == \
        ("gelu", False, model.config.tie_embeddings)
    assert cfg.rope_parameters["partial_rotary_factor"] == 1.0
    assert next(hf_model.parameters()).dtype == torch.float32
    tied = hf_model.lm_head.weight.data_ptr() == hf_model.gpt_neox.embed_in.weight.data_ptr()
    assert tied == model.config.tie_embeddings

    for text in test_texts:  # wiki, code, German novel, legal, math
        ids = torch.tensor([encode(tokenizer, text)[:model.config.max_seq_len]])
        assert ids.shape[1] >= 100
        with torch.no_grad():
            ours, theirs = model(ids), hf_model(ids).logits
        assert ours.abs().max().item() > 1.0  # non-trivial logits
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_autotokenizer_matches_ours(exported, tokenizer, test_texts):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(exported[2])
    for text in test_texts:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == encode(tokenizer, text)
        assert hf_tokenizer.decode(encode(tokenizer, text)) == text
    assert hf_tokenizer.eos_token_id == eos_token_id(tokenizer) is not None
    config = json.loads((exported[2] / "config.json").read_text())
    assert config["eos_token_id"] == eos_token_id(tokenizer)


def test_transformers_greedy_generate_matches_ours(exported, tokenizer, test_texts):
    from transformers import AutoModelForCausalLM

    model, _, out = exported
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = encode(tokenizer, test_texts[0])[:40]
    ours = generate(model, tokenizer, prompt, 25, greedy=True, ignore_eos=True)
    theirs = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 40, dtype=torch.long),
                               max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0)
    assert theirs[0, 40:].tolist() == ours.token_ids


def test_cli_export_checks_and_replaces(exported, tmp_path, capsys):
    _, model_dir, _ = exported
    out = tmp_path / "hf"
    for _ in range(2):  # the second run replaces the first
        assert main(["export", str(model_dir), "--out", str(out)]) == 0
        assert "logits match ours" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary leftovers
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= \
        {p.name for p in out.iterdir()}

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(SmallTalkError, match="tokenizer file not found"):
        export_hf(model_dir, tmp_path / "nope.json", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_a_bundle_exports_every_model_and_says_how_to_route(tiny_mixture, tmp_path, capsys):
    from smalltalk.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(tiny_mixture["bundle"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("logits match ours") == 4  # 2 experts + 2 routers, each loaded by transformers
    manifest = json.loads((out / "bundle_hf.json").read_text())
    assert manifest["experts"] == ["expert-0", "expert-1"] and manifest["routers"] == ["router-0", "router-1"]
    assert manifest["prefix_len"] == 32 and "highest-scoring router" in manifest["routing"]
    for name in manifest["experts"] + manifest["routers"]:
        assert (out / name / "model.safetensors").is_file() and (out / name / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "neither a model directory" in capsys.readouterr().err
