"""Drop experts from a trained mixture (a data opt-out) without touching the others: `smalltalk shrink`.

    shrink_bundle("runs/x/bundle", drop=[2], out="runs/x/bundle-without-2")
    opt_out_cost("runs/x/bundle", drop=[2], dense="runs/x/dense/model", data_dir="runs/x/data")

Expert k and its router leave the bundle; nothing else changes (the kept models are linked or copied
byte for byte, so their files keep their sha256). Routing is an argmax over independent routers, so the
dropped expert's traffic falls to the best of the remaining routers (paper Eq. 7 over the kept experts)
and every other sequence is routed exactly as before. `lineage.json` in the new bundle records where it
came from and which expert indices it kept.

`opt_out_cost` measures what the opt-out costs on a split: perplexity on the dropped experts' former
segment and on everything else, before and after (one scoring pass of the original bundle: the kept
experts' scores and routes are the same in both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_write_json
from ..routing import rule
from .bundle import BundleInfo, build_bundle, read_bundle


def _check_drop(info: BundleInfo, drop: Sequence[int]) -> list[int]:
    drop = sorted(set(int(k) for k in drop))
    bad = [k for k in drop if not 0 <= k < info.num_experts]
    if bad:
        raise SmallTalkError(f"--drop {bad[0]}: the bundle {info.root} has experts 0..{info.num_experts - 1}")
    if len(drop) >= info.num_experts:
        raise SmallTalkError(f"--drop {','.join(map(str, drop))} would leave {info.root} with no expert; keep at least one")
    return drop


def shrink_bundle(bundle: str | Path, drop: Sequence[int], out: str | Path) -> BundleInfo:
    """A new bundle at `out` without experts `drop` (and their routers); the original is not modified."""
    info = read_bundle(bundle)
    drop = _check_drop(info, drop)
    out = Path(out)
    if out.exists():
        raise SmallTalkError(f"--out {out}: already exists; give a new directory (the original bundle is untouched)")
    damaged = info.damaged()
    if damaged:
        raise SmallTalkError(f"bundle {info.root}: {damaged[0]}; repair the bundle before shrinking it")
    keep = [e for e in range(info.num_experts) if e not in drop]
    new = build_bundle(out, router_dirs=[info.routers[e].dir for e in keep],
                       expert_dirs=[info.experts[e].dir for e in keep], tokenizer_file=info.tokenizer_file,
                       prefix_len=info.prefix_len, train_seqs=[int(info.experts[e].train_seqs or 1) for e in keep])
    for e_new, e_old in enumerate(keep):  # the files are the originals: same bytes, same recorded hash
        if new.experts[e_new].weights_sha256 != info.experts[e_old].weights_sha256:
            raise SmallTalkError(f"{new.experts[e_new].dir}: copy of expert {e_old} differs from the original")
    atomic_write_json(out / "lineage.json", {"from": str(info.root.resolve()), "dropped": drop,
                                             "kept": {str(n): o for n, o in enumerate(keep)}})
    return new


def opt_out_cost(bundle: str | Path, drop: Sequence[int], dense: str | Path, data_dir: str | Path, *,
                 split: str = "test", max_seqs: int = 0, batch_size: int = 16, device: str = "auto") -> dict:
    """Perplexity before / after dropping `drop`, on their former segment and on the rest of `split`."""
    return opt_out_table(bundle, [drop], dense, data_dir, split=split, max_seqs=max_seqs, batch_size=batch_size,
                         device=device)[0]


def opt_out_table(bundle: str | Path, drops: Sequence[Sequence[int]], dense: str | Path, data_dir: str | Path, *,
                  split: str = "test", max_seqs: int = 0, batch_size: int = 16, device: str = "auto") -> list[dict]:
    """`opt_out_cost` for several opt-outs from one scoring pass of the bundle (every expert, the routers and
    the dense model score `split` once; each opt-out only re-routes)."""
    from ..data.splits import evenly_spaced, load_split
    from .evaluate import score_tables
    from .inference import Mixture

    mixture = Mixture.load(bundle, device=device, max_loaded_experts=10**6)
    drops = [_check_drop(mixture.info, d) for d in drops]
    data = load_split(data_dir, split)
    indices = evenly_spaced(len(data.dataset), max_seqs)
    tokens = data.dataset.get(indices)
    tables = score_tables(mixture, dense, tokens, data.dataset.domains(indices), batch_size=batch_size)
    scores = tables.router_scores(mixture.info.prefix_len)  # (N, E)
    before = rule.route(scores)
    rows = np.arange(len(before))
    ppl, dense_ppl = tables.ppl, tables.dense_ppl
    out = []
    for drop in drops:
        kept = [e for e in range(mixture.num_experts) if e not in drop]
        after = np.asarray(kept)[rule.route(scores[:, kept])]  # the dropped experts' traffic: best kept router
        segment = np.isin(before, drop)
        moved = {int(k): {int(e): int(((before == k) & (after == e)).sum()) for e in kept} for k in drop}
        out.append({"bundle": str(mixture.info.root), "dropped": drop, "split": split, "num_seqs": len(rows),
                    "dropped_segment": {"num_seqs": int(segment.sum()), "ppl_before": ppl(before, segment),
                                        "ppl_after": ppl(after, segment), "dense_ppl": dense_ppl(segment),
                                        "moved_to": moved},
                    "rest": {"num_seqs": int((~segment).sum()), "ppl_before": ppl(before, ~segment),
                             "ppl_after": ppl(after, ~segment), "dense_ppl": dense_ppl(~segment)},
                    "all": {"ppl_before": ppl(before, rows >= 0), "ppl_after": ppl(after, rows >= 0),
                            "dense_ppl": dense_ppl(rows >= 0)}})
    return out
