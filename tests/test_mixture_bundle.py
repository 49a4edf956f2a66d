"""The mixture bundle and inference on a real tiny mixture (router/expert 0: English wiki, 1: Python code):
routing rule, prefix lengths, fallback, lazy loading, and the bad inputs of issue 5."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.io import read_json
from smalltalk.mixture.bundle import build_bundle, read_bundle
from smalltalk.mixture.evaluate import score_tables, summarize
from smalltalk.mixture.inference import Mixture


def _test_docs(corpus_dir, domain: str, n: int, chars: int = 400) -> list[str]:
    out = []
    with gzip.open(corpus_dir / "test" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            if len(text) >= chars:
                out.append(text[:chars])
            if len(out) == n:
                break
    return out


@pytest.fixture
def bundle_copy(tiny_mixture, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_mixture["bundle"], dst)
    return dst


def test_bundle_is_self_describing(tiny_mixture):
    root = tiny_mixture["bundle"]
    raw = read_json(root / "bundle.json")
    assert raw["format"] == "smalltalk-mixture" and raw["num_experts"] == 2 and raw["prefix_len"] == 32
    info = read_bundle(root)
    for entry in info.routers + info.experts:
        assert (entry.dir / "model.safetensors").is_file() and (entry.dir / "config.json").is_file()
        assert len(entry.weights_sha256) == 64
    assert (root / "tokenizer.json").is_file() and info.tokenizer_sha256
    shares = [x.train_share for x in info.experts]
    assert sum(shares) == pytest.approx(1.0)
    assert info.fallback_expert == int(np.argmax([x.train_seqs for x in info.experts]))


def test_routes_prose_and_code_to_their_experts(tiny_mixture, corpus_dir):
    mixture = Mixture.load(tiny_mixture["bundle"])
    wiki, code = _test_docs(corpus_dir, "wiki_en", 8), _test_docs(corpus_dir, "code_python", 8)
    routes = [r.expert for r in mixture.route_ids([mixture.encode(t) for t in wiki + code])]
    accuracy = np.mean(np.array(routes) == np.array([0] * 8 + [1] * 8))
    assert accuracy >= 0.85, routes
    assert mixture.loaded_experts == []  # routing needs only the routers


def test_prefix_length_rules(tiny_mixture):
    mixture = Mixture.load(tiny_mixture["bundle"])
    short = mixture.route("def f(x):")
    assert short.num_tokens == short.prompt_tokens == len(mixture.encode("def f(x):")) < 32
    long_text = "The history of the region goes back to the Roman period, when " * 20
    route = mixture.route(long_text)
    assert route.num_tokens == 32 and route.prompt_tokens > 100
    r8 = mixture.route(long_text, prefix_len=8)
    assert r8.num_tokens == 8 and r8.scores.shape == (2,) and np.all(r8.scores > route.scores)
    # M-hat tokens of the prompt decide, whatever follows them.
    ids = mixture.encode(long_text)
    assert mixture.route(ids[:8] + mixture.encode("import os\nimport sys\n" * 10), 8).scores == pytest.approx(
        r8.scores, rel=1e-5)
    with pytest.raises(SmallTalkError, match="prefix_len=0"):
        mixture.route("hello", prefix_len=0)
    with pytest.raises(SmallTalkError, match="prefix_len=500"):
        mixture.route("hello", prefix_len=500)


def test_empty_prompt_goes_to_the_fallback_expert(tiny_mixture):
    mixture = Mixture.load(tiny_mixture["bundle"])
    route = mixture.route("")
    assert route.fallback and route.expert == mixture.info.fallback_expert and route.num_tokens == 0
    out = mixture.generate("", max_new_tokens=5, seed=0)
    assert out.route.fallback and len(out.result.token_ids) <= 5


def test_experts_load_lazily_into_a_bounded_cache(tiny_mixture):
    mixture = Mixture.load(tiny_mixture["bundle"], max_loaded_experts=1)
    out = mixture.generate("def add(a, b):\n    return", max_new_tokens=6, seed=0)
    assert mixture.loaded_experts == [out.route.expert]
    other = 1 - out.route.expert
    mixture.generate("anything", max_new_tokens=2, expert=other, seed=0)
    assert mixture.loaded_experts == [other]  # the first was evicted
    big = Mixture.load(tiny_mixture["bundle"], max_loaded_experts=2)
    big.expert(0), big.expert(1), big.expert(0)
    assert big.loaded_experts == [1, 0]  # least recently used first


@pytest.mark.parametrize("prompt", ["北京是中华人民共和国的首都，也是全国的政治中心。", "Москва — столица России.",
                                    "🙂🚀🎉 ¿qué tal? ∑∫√"])
def test_prompt_in_a_script_never_seen_in_training(tiny_mixture, prompt):
    mixture = Mixture.load(tiny_mixture["bundle"])
    route = mixture.route(prompt)
    assert route.expert in (0, 1) and np.all(np.isfinite(route.scores)) and route.num_tokens > 0
    assert mixture.tokenizer.decode(mixture.encode(prompt)) == prompt  # byte-level: nothing is lost
    out = mixture.generate(prompt, max_new_tokens=4, seed=1)
    assert out.route.expert == route.expert and len(out.result.token_ids) <= 4


def test_over_long_prompt_routes_on_its_start_and_is_truncated_or_refused(tiny_mixture):
    mixture = Mixture.load(tiny_mixture["bundle"])
    prompt = "import numpy as np\n" + "x = np.zeros(3) + 1\n" * 200
    ids = mixture.encode(prompt)
    assert len(ids) > 128
    out = mixture.generate(prompt, max_new_tokens=3, seed=0)
    assert out.route.num_tokens == 32 and out.result.prompt_truncated
    assert len(out.result.prompt_ids) == 128
    with pytest.raises(SmallTalkError, match=f"prompt has {len(ids)} tokens"):
        mixture.generate(prompt, max_new_tokens=3, on_long_prompt="error")


def test_missing_expert_is_named_and_routing_still_works(bundle_copy):
    (bundle_copy / "experts" / "expert_1" / "model.safetensors").unlink()
    mixture = Mixture.load(bundle_copy)
    route = mixture.route("def f(x):\n    return x\n")
    assert route.scores.shape == (2,)
    status = mixture.status()
    assert status[0]["problem"] is None and "expert_1" in status[1]["problem"]
    with pytest.raises(SmallTalkError, match="expert 1 is missing"):
        mixture.expert(1)
    assert mixture.generate("Hello", max_new_tokens=2, expert=0, seed=0).route.expert == 0


def test_corrupt_expert_is_named(bundle_copy):
    weights = bundle_copy / "experts" / "expert_0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\x00" * 100  # same size, different bytes: only the checksum can tell
    weights.unlink()  # break the hard link to the fixture's file before writing
    weights.write_bytes(bytes(data))
    mixture = Mixture.load(bundle_copy)
    assert mixture.status()[0]["problem"] is None  # files present
    assert "corrupt" in mixture.status(verify=True)[0]["problem"]
    with pytest.raises(SmallTalkError, match="expert 0 is corrupt"):
        mixture.expert(0)
    mixture.expert(1)  # the others still load
    truncated = bundle_copy / "experts" / "expert_1" / "model.safetensors"
    content = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(content[:50])
    unverified = Mixture.load(bundle_copy, verify=False)
    with pytest.raises(SmallTalkError, match="expert 1 cannot be loaded"):
        unverified.expert(1)


def test_route_cli_reports_a_missing_expert_but_still_routes(bundle_copy, capsys):
    assert main(["route", str(bundle_copy), "--prompt", "def f(x):", "--prompt", ""]) == 0
    out = capsys.readouterr().out
    assert "-> expert" in out and "fallback" in out and "posterior" in out
    assert main(["route", str(bundle_copy), "--prompt", "import os", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["expert"] in (0, 1) and len(record["posterior"]) == 2
    shutil.rmtree(bundle_copy / "experts" / "expert_0")
    assert main(["route", str(bundle_copy), "--prompt", "Hello world"]) == 2
    captured = capsys.readouterr()
    assert "-> expert" in captured.out and "expert(s) [0]" in captured.err


def test_generate_cli_accepts_a_bundle(tiny_mixture, capsys):
    assert main(["generate", str(tiny_mixture["bundle"]), "--prompt", "def main():", "--max-new-tokens", "5",
                 "--seed", "0", "--device", "cpu"]) == 0
    assert "[expert " in capsys.readouterr().err


def test_bundle_refuses_models_of_another_tokenizer(tiny_mixture, tmp_path):
    other = tmp_path / "other_tokenizer.json"
    other.write_text(tiny_mixture["tokenizer"].read_text().replace('"<|pad|>"', '"<|pod|>"'))
    info = read_bundle(tiny_mixture["bundle"])
    with pytest.raises(SmallTalkError, match="must share one tokenizer"):
        build_bundle(tmp_path / "b", router_dirs=[r.dir for r in info.routers], expert_dirs=[x.dir for x in info.experts],
                     tokenizer_file=other, prefix_len=32, train_seqs=[1, 1])
    with pytest.raises(SmallTalkError, match="not a mixture bundle"):
        Mixture.load(tmp_path)


def test_experts_specialise_on_their_domain(tiny_mixture, corpus_dir):
    """Evaluation math on real models: each expert is best on the domain it was trained on."""
    mixture = Mixture.load(tiny_mixture["bundle"])
    docs = _test_docs(corpus_dir, "wiki_en", 6, 600) + _test_docs(corpus_dir, "code_python", 6, 600)
    tokens = np.stack([mixture.encode(d)[:64] for d in docs])  # (12, 64)
    domains = np.array([0] * 6 + [1] * 6, dtype=np.int16)
    tables = score_tables(mixture, tiny_mixture["dense"], tokens, domains, keep_token_logp=True)
    nll = tables.expert_nll  # (12, 2)
    assert (nll[:6, 0] < nll[:6, 1]).mean() >= 0.8 and (nll[6:, 1] < nll[6:, 0]).mean() >= 0.8
    out = summarize(tables, prefix_len=32, prefix_lens=[8], top_k=2, domain_names=["wiki", "code"])
    assert out["mixture"]["ppl"] < out["oracle"]["ppl"] * 1.2
    assert np.array(out["domains"]["counts"]).sum() == 12
