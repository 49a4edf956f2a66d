"""The scaling law behind `smalltalk plan`: tuned dense, pure mixture and split training at equal FLOPs.

Losses are per-token cross-entropy in nats (ppl = exp(loss)); N is one expert's (= the dense model's)
parameter count, D the training tokens of the whole budget (the dense model's, all experts' together), E the
number of experts, f the split training seed fraction.

    dense     L_d(N, D)       = e + a N^-alpha + b N^gamma D^-beta             (Chinchilla form when gamma = 0)
    mixture   L_m(N, D, E)    = e - s_E ln E + a N^-alpha + b N^gamma (D / E)^-beta
    split     L_s(N, D, E, f) = e - phi_f s_E ln E + a N^-alpha + b N^gamma (f D + (1 - f) D / E)^-beta

gamma lets a larger model lean harder on its data: with gamma = 0 the cost of splitting the data (the data term at
D / E against D) depends on D alone, so the crossover sits at fixed training tokens whatever the size; with
gamma = beta the data term is a function of tokens per parameter, and so is the crossover. Measured sizes decide
(gamma is fitted from two sizes on; 0 with one).

Each expert sees a 1/E share of the tokens (the data term at D / E) but only its segment of the distribution,
whose entropy is lower: s_E ln E is that specialisation gain, fitted per E from the mixture's measured points.
So the mixture loses where the data term dominates (few tokens per parameter) and wins where it has flattened:
the crossover. A split mixture's experts share a seed trained on f D tokens of all the data, so its data term
sits between the two (the seed's tokens count fully, the branches' by 1/E, as in the follow-up work's
pretrain-then-specialise law L(N, D, D')), and phi_f is the share of the specialisation gain that survives a
seed fraction f (fitted per measured f; 1 when unmeasured, flagged).

The dense constants are fitted by least squares on log-spaced exponent grids (exact linear least squares for
e, a, b at each (alpha, beta, gamma)); s_E and phi_f in closed form given those. Two measured sizes fit a (the gap
between them) but not alpha (any alpha spans the same two values of N^-alpha): alpha is then fixed at
ALPHA_TWO_SIZES, Hoffmann et al.'s fitted value, and recorded in `assumed`. With fewer than five dense points
(`--fit` on a user's own runs), only e is refitted (a shift for another corpus or tokenizer) and the shipped
exponents kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import SmallTalkError


@dataclass(frozen=True)
class Point:
    """One measured comparison: the tuned dense model and the mixture (pure when fraction is 0) at equal tokens."""

    params: int
    tokens: int
    num_experts: int
    dense_loss: float
    mixture_loss: float
    fraction: float = 0.0
    source: str = ""


@dataclass
class Law:
    e: float
    a: float
    alpha: float
    b: float
    beta: float
    gamma: float = 0.0
    gain: dict[str, float] = field(default_factory=dict)
    """s_E by str(E)."""
    split: dict[str, float] = field(default_factory=dict)
    """phi_f by str(f)."""
    fitted_on: list[str] = field(default_factory=list)
    rmse: dict[str, float] = field(default_factory=dict)
    measured: dict[str, list[float]] = field(default_factory=dict)
    """The fitted points' range: params [min, max], tokens_per_param [min, max], experts (the values)."""
    assumed: list[str] = field(default_factory=list)
    """Constants set, not fitted, because the points cannot identify them (e.g. "alpha")."""

    def outside(self, N: float, D: float, E: int) -> list[str]:
        """Why a prediction at (N, D, E) is an extrapolation (empty when it is inside the measured range)."""
        notes = []
        lo, hi = self.measured.get("params", [N, N])
        if not lo / 2 <= N <= hi * 2:
            # One measured size leaves a N^-alpha unidentified: only D moves the prediction, which is unverified.
            why = ("; one size was measured, so the size term is not fitted" if lo == hi else
                   f"; the size exponent alpha = {self.alpha:g} is assumed, not fitted" if "alpha" in self.assumed
                   else "")
            notes.append(f"{N:,.0f} parameters is outside the measured sizes ({lo:,.0f}-{hi:,.0f}){why}")
        tlo, thi = self.measured.get("tokens_per_param", [0, math.inf])
        tpp = D / (E * N)
        if not tlo / 2 <= tpp <= thi * 2:
            notes.append(f"{tpp:.1f} tokens per expert parameter is outside the measured {tlo:.1f}-{thi:.1f}")
        return notes

    # -- predictions ------------------------------------------------------------------------------

    def data(self, N: float, D: float) -> float:
        """The data term: what the loss still owes to training tokens D at size N."""
        return self.b * N ** self.gamma * D ** -self.beta

    def dense(self, N: float, D: float) -> float:
        return self.e + self.a * N ** -self.alpha + self.data(N, D)

    def gain_of(self, E: int) -> tuple[float, bool]:
        """(s_E, measured?): an unmeasured E takes the nearest measured one's gain."""
        if str(E) in self.gain:
            return self.gain[str(E)], True
        if not self.gain:
            return 0.0, False
        nearest = min(self.gain, key=lambda k: abs(math.log(int(k) / E)))
        return self.gain[nearest], False

    def mixture(self, N: float, D: float, E: int) -> float:
        s, _ = self.gain_of(E)
        return self.dense(N, D / E) - s * math.log(E)

    def split_loss(self, N: float, D: float, E: int, f: float) -> float:
        s, _ = self.gain_of(E)
        phi = self.split.get(_fkey(f), 1.0)
        return self.dense(N, split_tokens(D, E, f)) - phi * s * math.log(E)

    def crossover(self, N: float, E: int) -> float | None:
        """Tokens per expert parameter (D / (E N)) above which the pure mixture beats the dense model; None when it
        never does, 0 when it always does (in 0.01 .. 1e6 tokens per parameter)."""
        diff = lambda tpp: self.mixture(N, tpp * E * N, E) - self.dense(N, tpp * E * N)  # noqa: E731
        lo, hi = math.log(1e-2), math.log(1e6)
        if diff(math.exp(hi)) >= 0:
            return None
        if diff(math.exp(lo)) < 0:
            return 0.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if diff(math.exp(mid)) >= 0 else (lo, mid)
        return math.exp(hi)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Law":
        return Law(**d)


def _fkey(f: float) -> str:
    return f"{f:g}"


ALPHAS = np.exp(np.linspace(math.log(0.05), math.log(1.5), 30))
GAMMAS = np.linspace(-0.2, 1.0, 13)
ALPHA_TWO_SIZES = 0.34
"""Hoffmann et al. (2022), approach 3: the size exponent used when only two sizes were measured."""


def _best_on_grid(N, D, loss, alphas, betas, gammas, with_params: bool):
    """(err, e, a, alpha, b, beta, gamma): exact least squares for e, a, b >= 0 at each exponent triple."""
    best = None
    for alpha in alphas:
        size_term = N ** -alpha if with_params else np.zeros_like(loss)
        for gamma in gammas:
            for beta in betas:
                X = np.stack([np.ones_like(loss), size_term, N ** gamma * D ** -beta], axis=1)
                coef, *_ = np.linalg.lstsq(X, loss, rcond=None)
                if coef[1] < 0 or coef[2] < 0:  # refit with the offending term dropped
                    keep = [0] + [i for i in (1, 2) if coef[i] >= 0]
                    sub, *_ = np.linalg.lstsq(X[:, keep], loss, rcond=None)
                    coef = np.zeros(3)
                    coef[keep] = sub
                err = float(np.sum((X @ coef - loss) ** 2))
                if best is None or err < best[0]:
                    best = (err, float(coef[0]), float(coef[1]), float(alpha), float(coef[2]), float(beta),
                            float(gamma))
    return best


def fit_dense(N: np.ndarray, D: np.ndarray, loss: np.ndarray, sizes: int = 3, alpha: float | None = None
              ) -> tuple[float, float, float, float, float, float]:
    """(e, a, alpha, b, beta, gamma) minimising squared error, with a, b >= 0: log-spaced grids of exponents, then
    finer ones around the best. One size (`sizes` 1): a = alpha = gamma = 0; `alpha` given: that exponent kept."""
    a_step = float(np.log(ALPHAS[1] / ALPHAS[0]))
    g_step = float(GAMMAS[1] - GAMMAS[0])
    fine = lambda x, step: np.exp(np.linspace(np.log(x) - step, np.log(x) + step, 11))  # noqa: E731
    with_params = sizes > 1
    alphas = [alpha] if alpha is not None else ALPHAS if with_params else [0.0]
    best = _best_on_grid(N, D, loss, alphas, ALPHAS, GAMMAS if with_params else [0.0], with_params)
    for zoom in (1, 5, 25):  # each pass searches a grid five times finer around the best so far
        if with_params and alpha is None:  # three exponents: alpha on its own keeps each grid small
            best = _best_on_grid(N, D, loss, fine(best[3], a_step / zoom), [best[5]], [best[6]], with_params)
        gammas = np.linspace(best[6] - g_step / zoom, best[6] + g_step / zoom, 11) if with_params else [0.0]
        best = _best_on_grid(N, D, loss, [best[3]], fine(best[5], a_step / zoom), gammas, with_params)
    return best[1:]


def split_tokens(D: float, E: int, f: float) -> float:
    """The data term's tokens under split training: the seed's f D count fully, each branch sees 1/E of the rest."""
    return f * D + (1 - f) * D / E


def fit(points: list[Point], base: Law | None = None) -> Law:
    """The law fitted to `points` (see the module docstring); `base` supplies the exponents when there are too
    few distinct dense points to fit them."""
    if not points:
        raise SmallTalkError("no measured points to fit the law on")
    dense_pts = {(p.params, p.tokens): p.dense_loss for p in points}
    N = np.array([k[0] for k in dense_pts], dtype=np.float64)
    D = np.array([k[1] for k in dense_pts], dtype=np.float64)
    y = np.array(list(dense_pts.values()), dtype=np.float64)
    sizes, assumed = len(set(N.tolist())), []
    if len(dense_pts) >= 3 and sizes == 1:
        # One size: the N terms are constants, not identifiable: folded into e and b (no extrapolation in N).
        e, a, alpha, b, beta, gamma = fit_dense(N, D, y, sizes=1)
    elif len(dense_pts) >= 5 and sizes == 2:
        e, a, alpha, b, beta, gamma = fit_dense(N, D, y, sizes=2, alpha=ALPHA_TWO_SIZES)
        assumed = ["alpha"]
    elif len(dense_pts) >= 5:
        e, a, alpha, b, beta, gamma = fit_dense(N, D, y, sizes=sizes)
    elif base is not None:
        shift = float(np.mean(y - np.array([base.dense(n, d) for n, d in zip(N, D)])))
        e, a, alpha, b, beta, gamma = base.e + shift, base.a, base.alpha, base.b, base.beta, base.gamma
        assumed = list(base.assumed)
    else:
        raise SmallTalkError(f"{len(dense_pts)} distinct dense points: at least 5 (two sizes, several budgets) are "
                             "needed to fit the exponents; give more runs or fit on top of the shipped law")
    law = Law(e, a, alpha, b, beta, gamma, gain=dict(base.gain) if base else {}, split=dict(base.split) if base else {},
              assumed=assumed)
    for E in sorted({p.num_experts for p in points}):
        pure = [p for p in points if p.num_experts == E and p.fraction == 0]
        if pure:
            # L_m = L_d(N, D / E) - s ln E  =>  s = mean of (dense prediction at D / E - measured) / ln E
            law.gain[str(E)] = float(np.mean([(law.dense(p.params, p.tokens / E) - p.mixture_loss) / math.log(E)
                                              for p in pure]))
    for f in sorted({p.fraction for p in points if p.fraction > 0}):
        phis = []
        for p in points:
            if p.fraction != f:
                continue
            s, _ = law.gain_of(p.num_experts)
            if s == 0:
                continue
            d_eff = split_tokens(p.tokens, p.num_experts, f)
            phis.append((law.dense(p.params, d_eff) - p.mixture_loss) / (s * math.log(p.num_experts)))
        if phis:
            law.split[_fkey(f)] = float(np.mean(phis))
    law.fitted_on = sorted({p.source for p in points if p.source})
    tpp = [p.tokens / (p.num_experts * p.params) for p in points]
    law.measured = {"params": [float(min(N)), float(max(N))], "tokens_per_param": [min(tpp), max(tpp)],
                    "experts": sorted({float(p.num_experts) for p in points})}
    law.rmse = residuals(law, points)
    return law


def residuals(law: Law, points: list[Point]) -> dict[str, float]:
    """Root-mean-square error (nats) of each side's prediction on `points`."""
    dense = [law.dense(p.params, p.tokens) - p.dense_loss for p in points]
    mix = [(law.mixture(p.params, p.tokens, p.num_experts) if p.fraction == 0 else
            law.split_loss(p.params, p.tokens, p.num_experts, p.fraction)) - p.mixture_loss for p in points]
    rms = lambda xs: float(math.sqrt(sum(x * x for x in xs) / len(xs))) if xs else 0.0  # noqa: E731
    return {"dense": rms(dense), "mixture": rms(mix)}


def bootstrap_crossover(points: list[Point], N: float, E: int, rounds: int = 200, seed: int = 0,
                        base: Law | None = None) -> dict:
    """The crossover (tokens per expert parameter) refitted on resampled points: median and 10th-90th percentile;
    `never` counts the resamples in which the mixture never wins."""
    rng = np.random.default_rng(seed)
    values, never = [], 0
    for _ in range(rounds):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        if not any(p.num_experts == E and p.fraction == 0 for p in sample):
            continue
        try:
            x = fit(sample, base).crossover(N, E)
        except SmallTalkError:
            continue
        if x is None:
            never += 1
        else:
            values.append(x)
    if not values:
        return {"median": None, "p10": None, "p90": None, "never": never, "rounds": rounds}
    q = np.percentile(values, [10, 50, 90])
    return {"median": float(q[1]), "p10": float(q[0]), "p90": float(q[2]), "never": never, "rounds": rounds}
