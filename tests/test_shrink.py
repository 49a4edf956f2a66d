"""`smalltalk shrink`: an expert leaves the mixture (data opt-out); nothing else changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis_run import EVAL_SEQS, build_tiny_run
from smalltalk.cli import main
from smalltalk.errors import SmallTalkError
from smalltalk.mixture.bundle import read_bundle
from smalltalk.mixture.inference import Mixture
from smalltalk.mixture.shrink import opt_out_cost, shrink_bundle
from smalltalk.model.io import sha256_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    return build_tiny_run(tmp_path_factory, corpus_dir)


def _tree_hashes(root):
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_dropping_an_expert_keeps_everything_else(run_dir, tmp_path):
    bundle = run_dir / "bundle"
    before = _tree_hashes(bundle)
    new = shrink_bundle(bundle, [1], tmp_path / "without-1")
    assert _tree_hashes(bundle) == before  # the original bundle is not modified
    old = read_bundle(bundle)
    assert new.num_experts == 3
    assert [x.weights_sha256 for x in new.experts] == [old.experts[e].weights_sha256 for e in (0, 2, 3)]
    assert [x.weights_sha256 for x in new.routers] == [old.routers[e].weights_sha256 for e in (0, 2, 3)]
    lineage = json.loads((tmp_path / "without-1" / "lineage.json").read_text())
    assert lineage["dropped"] == [1] and lineage["kept"] == {"0": 0, "1": 2, "2": 3}
    # Prompts that did not go to expert 1 still go to the same expert; those that did go to the best other router.
    a, b = Mixture.load(bundle), Mixture.load(tmp_path / "without-1")
    prompts = ["The history of the city", "def main():\n    return 0", "Il était une fois", "Der Mann ging",
               "The court held that the contract", "import numpy as np", "Solve for x: 3x + 2 = 11"]
    for p in prompts:
        ra, rb = a.route(p), b.route(p)
        kept_scores = np.delete(ra.scores, 1)
        assert np.allclose(rb.scores, kept_scores, atol=1e-4)
        assert [0, 2, 3][rb.expert] == (ra.expert if ra.expert != 1 else [0, 2, 3][int(np.argmax(kept_scores))])


def test_opt_out_cost_on_the_test_split(run_dir, tmp_path, capsys):
    cost = opt_out_cost(run_dir / "bundle", [0], run_dir / "dense" / "model", run_dir / "data", max_seqs=EVAL_SEQS,
                        device="cpu")
    seg, rest = cost["dropped_segment"], cost["rest"]
    assert seg["num_seqs"] + rest["num_seqs"] == EVAL_SEQS
    assert rest["ppl_before"] == pytest.approx(rest["ppl_after"])  # other traffic is routed exactly as before
    assert sum(seg["moved_to"][0].values()) == seg["num_seqs"] and 0 not in seg["moved_to"][0]  # all moved elsewhere
    assert main(["shrink", str(run_dir), "--drop", "0", "--out", str(tmp_path / "s"), "--cost", "--max-seqs", "16",
                 "--device", "cpu"]) == 0
    assert "everything else" in capsys.readouterr().out and (tmp_path / "s" / "opt_out_cost.json").is_file()


@pytest.mark.parametrize("drop, message", [([7], "--drop 7: the bundle"), ([0, 1, 2, 3], "with no expert")])
def test_bad_drops_are_refused_and_change_nothing(run_dir, tmp_path, drop, message):
    with pytest.raises(SmallTalkError, match=message):
        shrink_bundle(run_dir / "bundle", drop, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_out_is_refused(run_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["shrink", str(run_dir / "bundle"), "--drop", "1", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_corrupt_bundle_is_refused_by_shrink_and_grow(run_dir, tmp_path):
    import shutil

    from smalltalk.mixture.grow import GrowConfig, grow_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", bundle)
    weights = bundle / "experts" / "expert_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-50:] = b"\x00" * 50
    weights.unlink()  # a hard link to the run's file: write a new one
    weights.write_bytes(bytes(data))
    with pytest.raises(SmallTalkError, match=r"expert 2: .*corrupt"):
        shrink_bundle(bundle, [0], tmp_path / "s")
    with pytest.raises(SmallTalkError, match=r"expert 2: .*corrupt"):
        grow_bundle(bundle, [str(tmp_path)], tmp_path / "g", GrowConfig())
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()
