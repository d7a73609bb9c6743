"""Calibrated heads: the model's outputs as probabilities a team can use.

Training weights each positive label (Table 7: up to 100 for a repin), so the heads learn
odds inflated by those weights: a click head's mean output of 0.4 where 11% of the rows are
clicks. A ranking within one head does not mind; a team that thresholds a head, blends it
with another model, or adds heads into ``S = sum_h w_h f_h`` does.

Each head is recalibrated by **beta calibration** (Kull, Silva Filho & Flach, 2017) of its
sigmoid ``s = sigmoid(logit)``::

    p_h = sigmoid(c_h + a_h ln s - b_h ln(1 - s))
        = sigmoid(c_h - a_h softplus(-logit) + b_h softplus(logit))     (a, b >= 0: monotone)

fitted by Newton's method to the unweighted log-loss of a **held-out slice at the end of the
training window** (the most recent :data:`HOLDOUT` of its rows, which no optimiser step saw,
just before the evaluation window), stored in the model's config.json and applied by the model
itself (:meth:`TransActModel.probabilities`): evaluation, the ablation, ``/rank``, the served
log and monitoring read the same calibrated numbers. a = b = 1, c = 0 is the raw sigmoid;
a = b gives Platt scaling (a temperature and a bias on the logit), which undoes a pure label
weight exactly (weighting positives by w adds ln w to the learned logit).

Why beta, measured on the demo world (docs/calibration.md, ``transact bench calibration``):
Platt's single slope cannot bend -- fitted on the evaluation window itself it still leaves an ECE
of 0.018 on click: the heads' miscalibration is not a temperature -- while the beta family's
third number (the two tails apart) brings the ECE to 0.006 (click) and 0.007 (repin) with the
lowest log-loss of every candidate. Isotonic regression, fitted on the same 8,792 held-out rows,
ends between the two (ECE 0.011 and 0.009) with a higher log-loss: a step function needs far more
rows than three numbers per head do, and candidates within a step tie, coarsening the ranking
inside a request.

Measures: log-loss and the expected calibration error over equal-mass bins,

    ECE = sum_b (n_b / N) |mean(y in b) - mean(p in b)|,   bins of equal row counts by p,

and a reliability diagram (:func:`reliability_plot`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transact.model.metrics import log_loss

#: the calibration methods a model may carry
METHODS: tuple[str, ...] = ("beta",)
#: equal-mass bins of the ECE and the reliability diagram
ECE_BINS = 15
#: share of the training window's rows (its most recent) held out to fit the calibration
HOLDOUT = 0.05


@dataclass
class Calibration:
    """Per head ``p = sigmoid(c - a softplus(-logit) + b softplus(logit))``; ``fitted_on``: the
    slice it was fitted on (ts range, rows, positives per head), ``logloss``: raw and calibrated
    on that slice."""

    heads: tuple[str, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    method: str = "beta"
    fitted_on: dict = field(default_factory=dict)
    logloss: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        self.a, self.b, self.c = (tuple(float(x) for x in v) for v in (self.a, self.b, self.c))
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if not (len(self.heads) == len(self.a) == len(self.b) == len(self.c)):
            raise ValueError(f"calibration: {len(self.heads)} heads, but {len(self.a)}/{len(self.b)}/{len(self.c)} "
                             "values of a/b/c")
        bad = [h for h, *v in zip(self.heads, self.a, self.b, self.c) if not all(map(math.isfinite, v))]
        if bad:
            raise ValueError(f"calibration: a non-finite value for {', '.join(bad)}")
        falling = [h for h, a, b in zip(self.heads, self.a, self.b) if a < 0 or b < 0]
        if falling:
            raise ValueError(f"calibration: a or b below 0 for {', '.join(falling)} (the map would not be monotone)")

    @staticmethod
    def identity(heads: tuple[str, ...]) -> Calibration:
        n = len(heads)
        return Calibration(heads, (1.0,) * n, (1.0,) * n, (0.0,) * n, fitted_on={"identity": True})

    @property
    def is_identity(self) -> bool:
        return bool(self.fitted_on.get("identity"))

    def to_dict(self) -> dict:
        return {"method": self.method,
                "heads": {h: {"a": a, "b": b, "c": c} for h, a, b, c in zip(self.heads, self.a, self.b, self.c)},
                "fitted_on": self.fitted_on, "logloss": self.logloss}

    @staticmethod
    def from_dict(d: dict, heads: tuple[str, ...], where: str = "calibration") -> Calibration:
        """The calibration stored for a model with ``heads`` (every head must have one)."""
        per = d.get("heads", {})
        missing = [h for h in heads if h not in per]
        if missing:
            raise ValueError(f"{where}: no calibration for head(s) {', '.join(missing)}")
        try:
            a, b, c = ([per[h][k] for h in heads] for k in "abc")
        except KeyError as e:
            raise ValueError(f"{where}: a head lacks its {e.args[0]!r} value") from None
        return Calibration(heads, tuple(a), tuple(b), tuple(c), d.get("method", "beta"), d.get("fitted_on", {}),
                           d.get("logloss", {}))


def softplus(z: np.ndarray) -> np.ndarray:
    """ln(1 + e^z) without overflow."""
    return np.logaddexp(0.0, np.asarray(z, dtype=np.float64))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """float64 sigmoid without overflow warnings for large |z|."""
    return np.exp(-softplus(-np.asarray(z, dtype=np.float64)))


def beta_features(logit: np.ndarray) -> np.ndarray:
    """[N, 2]: (ln s, -ln(1 - s)) of s = sigmoid(logit), computed from the logit (no rounding
    of s to 0 or 1 at the tails)."""
    z = np.asarray(logit, dtype=np.float64)
    return np.stack([-softplus(-z), softplus(z)], axis=1)


def apply(logit: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """The calibrated probability of head logits (the numpy twin of the model's map)."""
    f = beta_features(logit)
    return sigmoid(c + a * f[:, 0] + b * f[:, 1])


def fit_logistic(x: np.ndarray, y: np.ndarray, start: np.ndarray, ridge: float = 1e-6,
                 iters: int = 100) -> np.ndarray:
    """Weights w [F] (the last feature is the intercept) minimising the mean log-loss of
    ``sigmoid(x @ w)`` against 0/1 ``y``: Newton's method on a convex function, each step halved
    until the loss falls (a full step overshoots from far away), with a small ridge towards
    ``start`` for a slice where one class is missing or a feature is constant."""
    x, t, w = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.array(start, dtype=np.float64)

    def loss(v: np.ndarray) -> float:
        z = x @ v  # [N]
        # -[t ln s(z) + (1 - t) ln(1 - s(z))] = softplus(z) - t z, without overflow
        return float(np.mean(softplus(z) - t * z) + 0.5 * ridge * np.sum((v - start) ** 2))

    f = loss(w)
    for _ in range(iters):
        p = sigmoid(x @ w)  # [N]
        g = x.T @ (p - t) / len(t) + ridge * (w - start)  # [F]
        h = (x * (p * (1 - p))[:, None]).T @ x / len(t) + ridge * np.eye(len(w))  # [F, F]
        step = np.linalg.solve(h, g)  # [F]
        size = 1.0
        while size > 1e-10:
            nf = loss(w - size * step)
            if nf <= f:
                break
            size *= 0.5
        else:
            break  # no step lowers the loss: at the minimum to float precision
        w, done = w - size * step, f - nf < 1e-15
        f = nf
        if done or np.abs(size * step).max() < 1e-10:
            break
    return w


def fit_beta(logit: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of the beta map for one head, a and b kept >= 0 (monotone): when the free fit
    gives one below 0, that feature is dropped (its coefficient 0) and the rest refitted, as the
    method's authors do."""
    if len(logit) == 0:
        return 1.0, 1.0, 0.0
    feats = beta_features(logit)  # [N, 2]
    x = np.column_stack([feats, np.ones(len(logit))])  # [N, 3]
    a, b, c = fit_logistic(x, y, np.array([1.0, 1.0, 0.0]))
    if a < 0 or b < 0:
        keep = 1 if a < 0 else 0  # the feature whose coefficient stays
        w = fit_logistic(x[:, [keep, 2]], y, np.array([1.0, 0.0]))
        a, b, c = (0.0, max(w[0], 0.0), w[1]) if keep == 1 else (max(w[0], 0.0), 0.0, w[1])
    return float(a), float(b), float(c)


def fit(logits: np.ndarray, labels: np.ndarray, heads: tuple[str, ...], fitted_on: dict) -> Calibration:
    """Beta calibration of every head: logits float [N, H] (the model's raw head logits),
    labels 0/1 [N, H] (the same heads' labels)."""
    abc, before, after = [], {}, {}
    for j, h in enumerate(heads):
        abc.append(fit_beta(logits[:, j], labels[:, j]))
        before[h] = log_loss(labels[:, j], sigmoid(logits[:, j]))
        after[h] = log_loss(labels[:, j], apply(logits[:, j], *abc[-1]))
    a, b, c = zip(*abc) if abc else ((), (), ())
    positives = {h: int(labels[:, j].sum()) for j, h in enumerate(heads)}
    return Calibration(heads, a, b, c, fitted_on={**fitted_on, "rows": int(len(logits)), "positives": positives},
                       logloss={"raw": before, "calibrated": after})


def fit_platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(scale, bias) of Platt scaling, ``sigmoid(scale * logit + bias)``: the comparison the choice
    of method rests on (``transact bench calibration``)."""
    w = fit_logistic(np.column_stack([np.asarray(logit, dtype=np.float64), np.ones(len(logit))]), y,
                     np.array([1.0, 0.0]))
    return float(w[0]), float(w[1])


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression of y on x by pool-adjacent-violators: (knots x [K], fitted values [K]),
    a non-decreasing step function (the comparison of ``transact bench calibration``)."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    vals, wts, ends = [], [], []
    for i, v in enumerate(ys):
        vals.append(v)
        wts.append(1.0)
        ends.append(i)
        while len(vals) > 1 and vals[-2] > vals[-1]:  # pool the violating pair
            w = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            wts[-2], ends[-2] = w, ends[-1]
            del vals[-1], wts[-1], ends[-1]
    return xs[np.array(ends, dtype=np.int64)], np.array(vals)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Equal-mass bins of ``p`` (rows sorted by p, cut into ``bins`` runs of equal size):
    mean prediction, observed rate and rows of each, and the ECE."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return {"ece": float("nan"), "bins": []}
    order = np.argsort(p, kind="stable")
    out, ece = [], 0.0
    for idx in np.array_split(order, min(bins, len(p))):
        if len(idx) == 0:
            continue
        mp, rate = float(p[idx].mean()), float(y[idx].mean())
        ece += len(idx) / len(p) * abs(rate - mp)
        out.append({"mean_prediction": mp, "observed_rate": rate, "rows": int(len(idx))})
    return {"ece": float(ece), "bins": out}


def reliability_plot(curves: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """A reliability diagram per head: ``curves[head][label]`` is a :func:`reliability` result
    (e.g. label "raw" and "calibrated"); observed rate against mean prediction, the diagonal
    being perfect calibration. Written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(curves)
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 4.2), squeeze=False)
    for ax, h in zip(axes[0], heads):
        top = 0.0
        for label, rel in curves[h].items():
            xs = [b["mean_prediction"] for b in rel["bins"]]
            ys = [b["observed_rate"] for b in rel["bins"]]
            top = max([top, *xs, *ys])
            ax.plot(xs, ys, marker="o", ms=3, label=f"{label} (ECE {rel['ece']:.3f})")
        top = min(1.0, top * 1.05 or 1.0)
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="perfect")
        ax.set(title=h, xlabel="mean prediction (equal-mass bins)", ylabel="observed rate", xlim=(0, top), ylim=(0, top))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
