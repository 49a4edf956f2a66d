"""The planner: for N parameters per expert, D training tokens and E experts, predict the tuned dense model, the
pure mixture and each measured split fraction, and say which to train.

    from smalltalk.plan.planner import recommend
    print(recommend(params=1_000_000, tokens=200_000_000, experts=4).line)

Past the corpus's size the tokens repeat; the prediction then uses the effective data of a data-constrained law
(Muennighoff et al., 2023: D' = U (1 + R* (1 - exp(-R / R*))), R = D / U - 1 repetitions, R* = 15.4), and past
about 4 epochs it warns that more tokens buy little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SmallTalkError
from ..io import read_json
from .law import Law

DEFAULT_LAW = Path(__file__).resolve().parent / "default_law.json"
REPEAT_DECAY = 15.4
MAX_EPOCHS = 4.0


def default_law() -> Law:
    """The law fitted to this project's map (benchmarks/map_fit.py writes it)."""
    if not DEFAULT_LAW.is_file():
        raise SmallTalkError(f"{DEFAULT_LAW}: the shipped law is missing; reinstall smalltalk or give --fit")
    return Law.from_dict(read_json(DEFAULT_LAW)["law"])


def effective_tokens(tokens: float, corpus_tokens: float | None) -> float:
    if not corpus_tokens or tokens <= corpus_tokens:
        return tokens
    repeats = tokens / corpus_tokens - 1
    return corpus_tokens * (1 + REPEAT_DECAY * (1 - math.exp(-repeats / REPEAT_DECAY)))


@dataclass
class Recommendation:
    params: int
    tokens: int
    experts: int
    dense_ppl: float
    mixture_ppl: float
    split_ppl: dict[str, float] = field(default_factory=dict)
    choice: str = ""
    line: str = ""
    warnings: list[str] = field(default_factory=list)
    crossover_tokens_per_param: float | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def recommend(params: int, tokens: int, experts: int, corpus_tokens: int | None = None,
              law: Law | None = None) -> Recommendation:
    for name, value in (("--params", params), ("--tokens", tokens), ("--experts", experts)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise SmallTalkError(f"{name} {value!r}: must be a positive number")
    if experts < 2:
        raise SmallTalkError(f"--experts {experts}: a mixture needs at least 2 experts")
    if corpus_tokens is not None and corpus_tokens <= 0:
        raise SmallTalkError(f"--corpus-tokens {corpus_tokens!r}: must be a positive number")
    law = law or default_law()
    warnings = []
    D = effective_tokens(tokens, corpus_tokens)
    if corpus_tokens and tokens > MAX_EPOCHS * corpus_tokens:
        warnings.append(f"{tokens:,} tokens are {tokens / corpus_tokens:.1f} epochs of a {corpus_tokens:,}-token corpus: "
                        f"repeated tokens are worth less (predicted as {D:,.0f} unique-equivalent tokens); past ~4 "
                        "epochs more data or a larger model usually pays more")
    warnings += [f"extrapolating: {note}" for note in law.outside(params, D, experts)]
    _, measured = law.gain_of(experts)
    if not measured:
        warnings.append(f"E={experts} was not measured; the specialisation gain of the nearest measured E is used")
    dense = math.exp(law.dense(params, D))
    mixture = math.exp(law.mixture(params, D, experts))
    split = {f: math.exp(law.split_loss(params, D, experts, float(f))) for f in sorted(law.split)}
    options = {"dense": dense, "mixture": mixture, **{f"split f={f}": v for f, v in split.items()}}
    choice = min(options, key=options.get)
    rec = Recommendation(int(params), int(tokens), int(experts), dense, mixture, split, choice, warnings=warnings,
                         crossover_tokens_per_param=law.crossover(params, experts))
    tpp = tokens / (experts * params)
    if choice == "dense":
        rec.line = (f"train the dense model: predicted test ppl {dense:.2f} vs pure mixture {mixture:.2f} "
                    f"({100 * (1 - mixture / dense):+.1f}%) at {tpp:.1f} tokens per expert parameter")
    else:
        what = "the pure mixture" if choice == "mixture" else f"split training ({choice})"
        rec.line = (f"train {what} of {experts} experts: predicted test ppl {options[choice]:.2f} vs tuned dense "
                    f"{dense:.2f} ({100 * (1 - options[choice] / dense):+.1f}%) at {tpp:.1f} tokens per expert parameter")
    return rec
