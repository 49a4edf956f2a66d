"""The Transformer and its configs: validation, parameter counts, init, KV cache, padding, context limit."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from smalltalk.errors import SmallTalkError
from smalltalk.model.config import PRESETS, ModelConfig, preset
from smalltalk.model.transformer import Transformer


def real_token_ids(corpus_dir, domain: str, n: int) -> list[int]:
    """The first `n` UTF-8 bytes of a real document, as token ids (a byte-level tokenizer, vocab 256)."""
    with gzip.open(corpus_dir / "valid" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)["text"].encode("utf-8")
            if len(data) >= n:
                return list(data[:n])
    raise AssertionError(f"no {domain} document with {n} bytes")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **overrides)).eval()


def test_heads_must_divide_hidden_size():
    with pytest.raises(SmallTalkError, match="num_heads=5 does not divide hidden_size=64"):
        ModelConfig(hidden_size=64, num_heads=5)
    with pytest.raises(SmallTalkError, match="head size 3 must be even"):
        ModelConfig(hidden_size=12, num_heads=4)
    with pytest.raises(SmallTalkError, match="num_layers=0"):
        ModelConfig(num_layers=0)
    with pytest.raises(SmallTalkError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(SmallTalkError, match=r"unknown keys \['n_embd'\]"):
        ModelConfig.from_dict({"n_embd": 64})


def test_config_round_trips_through_dict():
    cfg = preset("cpu-small", vocab_size=5000, tie_embeddings=False)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sequence_longer_than_context_is_refused():
    model = tiny(max_seq_len=16)
    model(torch.zeros(2, 16, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(SmallTalkError, match=r"sequence of 17 tokens is longer than the model's context \(16\)"):
        model(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(SmallTalkError, match="sequence of 17 tokens"):  # a cache counts too
        model(torch.zeros(1, 2, dtype=torch.long), kv_caches=[None] * 2, start_pos=15)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_config(name):
    for tie in (True, False):
        cfg = preset(name, tie_embeddings=tie)
        with torch.device("meta"):  # the 1.3B preset would need 5 GB of real memory
            model = Transformer(cfg)
        counted = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
        assert counted == model.num_params() == cfg.num_params()
        embeddings = cfg.vocab_size * cfg.hidden_size * (1 if tie else 2)
        assert cfg.num_params(include_embeddings=False) == counted - embeddings


def test_paper_sizes_and_describe():
    # Paper Table 1 names (parameter counts with the paper's 32k vocabulary, tied embeddings).
    assert round(preset("router-4.4m").num_params() / 1e6, 1) == 4.4
    assert round(preset("router-110m").num_params() / 1e6) == 110
    assert round(preset("expert-335m").num_params() / 1e6) == 335
    assert round(preset("expert-1.3b").num_params() / 1e9, 1) == 1.3
    text = str(preset("cpu-small"))
    assert text.startswith("cpu-small: 5.26M params (3.16M non-embedding;")
    assert "hidden 256, layers 4, heads 4" in text and "tied embeddings" in text
    assert str(preset("expert-1.3b")).startswith("expert-1.3b: 1.27B params")
    for name, cfg in PRESETS.items():
        assert cfg.describe().startswith(f"{name}: ")


def test_init_is_deterministic_and_as_documented():
    cfg = preset("cpu-small", vocab_size=4096)
    torch.manual_seed(3)
    a = Transformer(cfg).state_dict()
    torch.manual_seed(3)
    b = Transformer(cfg).state_dict()
    torch.manual_seed(4)
    c = Transformer(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed_in.weight"], c["embed_in.weight"])

    std, L = cfg.init_std, cfg.num_layers
    assert a["embed_in.weight"].std().item() == pytest.approx(std, rel=0.02)
    assert a["layers.0.mlp.dense_h_to_4h.weight"].std().item() == pytest.approx(std, rel=0.02)
    residual_std = std / math.sqrt(2 * L)
    assert a["layers.1.attention.dense.weight"].std().item() == pytest.approx(residual_std, rel=0.03)
    assert a["layers.3.mlp.dense_4h_to_h.weight"].std().item() == pytest.approx(residual_std, rel=0.03)
    assert torch.count_nonzero(a["layers.0.attention.query_key_value.bias"]) == 0
    assert torch.all(a["layers.2.input_layernorm.weight"] == 1)
    assert torch.all(a["final_layer_norm.weight"] == 1) and torch.count_nonzero(a["final_layer_norm.bias"]) == 0


def test_tied_embeddings_share_storage():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.embed_out.weight.data_ptr() == tied.embed_in.weight.data_ptr()
    assert untied.embed_out.weight.data_ptr() != untied.embed_in.weight.data_ptr()


def test_initial_loss_is_uniform_and_matches_cross_entropy(corpus_dir):
    model = tiny()
    ids = torch.tensor([real_token_ids(corpus_dir, "wiki_en", 129)])
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    manual = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    # Small init -> near-uniform predictions: loss ~ ln(V).
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.05
    targets = ids[:, 1:].clone()
    targets[:, 64:] = -100  # ignored positions do not count
    _, half = model(ids[:, :-1], targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :64], ids[0, 1:65])
    assert half.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_logits_equal_full_forward(corpus_dir, tie):
    model = tiny(tie_embeddings=tie, init_std=0.1)
    ids = torch.tensor([real_token_ids(corpus_dir, "code_python", 128), real_token_ids(corpus_dir, "novels_fr", 128)])
    with torch.no_grad():
        full = model(ids)  # (2, 128, V)
        caches, pos, pieces = [None] * model.config.num_layers, 0, []
        for chunk in (50, 1, 1, 13, 1, 62):  # prefill, single steps and multi-token steps
            logits, caches = model(ids[:, pos:pos + chunk], kv_caches=caches, start_pos=pos)
            pieces.append(logits)
            pos += chunk
        last = model(ids, last_only=True)  # (2, 1, V), what generation asks for
    assert pos == 128 and caches[0][0].shape == (2, 4, 128, 16)  # (B, A, S, D)
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max().item() < 1e-5
    assert last.shape == (2, 1, model.config.vocab_size) and (last - full[:, -1:]).abs().max().item() < 1e-5
    assert full.abs().max().item() > 1.0  # the comparison is not between near-zero numbers


def test_left_padding_with_attention_mask_matches_unpadded_rows(corpus_dir):
    model = tiny(init_std=0.1)
    long_row = real_token_ids(corpus_dir, "legal_en", 40)
    short_row = real_token_ids(corpus_dir, "math_en", 25)
    batch = torch.zeros(2, 40, dtype=torch.long)
    batch[0] = torch.tensor(long_row)
    batch[1, 15:] = torch.tensor(short_row)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :15] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        alone_long = model(torch.tensor([long_row]))
        alone_short = model(torch.tensor([short_row]))
        # and one step further with a cache over the padded batch
        _, caches = model(batch, kv_caches=[None] * 2, attention_mask=mask)
        step = torch.tensor([[7], [9]])
        stepped, _ = model(step, kv_caches=caches, start_pos=40,
                           attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        ref_short = model(torch.tensor([short_row + [9]]))
    assert not torch.isnan(padded).any()
    assert (padded[0] - alone_long[0]).abs().max().item() < 1e-5
    assert (padded[1, 15:] - alone_short[0]).abs().max().item() < 1e-5
    assert (stepped[1, -1] - ref_short[0, -1]).abs().max().item() < 1e-5


def test_small_models_are_described_with_exact_parameter_counts():
    from smalltalk.model.config import preset

    micro = preset("micro")
    assert f"{micro.num_params():,} params ({micro.num_params(include_embeddings=False):,} non-embedding" in micro.describe()
    assert "0.00M" not in micro.describe() and "M params" in preset("cpu-small").describe()
