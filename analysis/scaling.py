"""Scaling-law fits L(x) = a * x^(-b) + c (Kaplan et al. 2020; Hoffmann et al. 2022, eq. 2 in one variable).

x is training compute C (FLOPs) or the parameter count N (at a fixed token budget). The fit is nonlinear least
squares by Levenberg-Marquardt in numpy only, with x scaled by its geometric mean x0 and a = exp(u) * x0^b,
so that the three parameters (u, b, c) are of order one. Standard errors come from the Jacobian:
cov = s^2 (J^T J)^-1 with s^2 = RSS / (n - 3), which needs n > 3 points (n = 3: no error bars).

An irreducible loss c < 0 means the points bend the wrong way for this law (the least-squares optimum runs off
to b -> 0, c -> -inf). The fit then pins c = 0 and fits the pure power law log L = log a - b log x by ordinary
least squares (standard errors from it, n > 2), and says so (`c_fixed`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from mlflow.entities import Run

from analysis.runs import run_label

X_KEYS = {"flops": "train/flops_total", "params_active": "params_active", "params_total": "params_total"}
X_LABELS = {"flops": "training compute C (FLOPs)", "params_active": "active parameters N",
            "params_total": "total parameters N"}


@dataclass
class PowerLawFit:
    """L(x) = a * x^(-b) + c with standard errors (nan when they cannot be estimated)."""

    a: float
    b: float
    c: float
    se_a: float
    se_b: float
    se_c: float
    n: int
    rss: float
    converged: bool
    c_fixed: bool = False  # True: c was pinned at 0 (see the module docstring)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, dtype=np.float64) ** (-self.b) + self.c

    def describe(self) -> str:
        err = f" ± {self.se_b:.2g}" if math.isfinite(self.se_b) else " (no error bar: too few points)"
        note = ", c pinned at 0" if self.c_fixed else "" if self.converged else ", did not converge"
        return f"b = {self.b:.3g}{err}, c = {self.c:.4g}, a = {self.a:.3g} (n = {self.n}{note})"


def _model(theta: np.ndarray, lx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and Jacobian in (u, b, c) at log-scaled x."""
    u, b, c = theta
    g = np.exp(u - b * lx)
    return g + c, np.stack([g, -g * lx, np.ones_like(lx)], axis=1)


def _initial_guess(lx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The best of linear fits of log(y - c) on log x over a grid of c below min(y)."""
    best, best_rss = None, np.inf
    for frac in np.linspace(0.0, 0.99, 34):
        c = frac * y.min()
        slope, u = np.polyfit(lx, np.log(y - c), 1)
        theta = np.array([u, -slope, c])
        rss = np.sum((_model(theta, lx)[0] - y) ** 2)
        if rss < best_rss:
            best, best_rss = theta, rss
    return best


def fit_power_law(x: np.ndarray, y: np.ndarray, max_iter: int = 500) -> PowerLawFit:
    """Least-squares fit of y = a * x^(-b) + c (x > 0, y > 0, at least 3 distinct x); c = 0 when c < 0 fits best."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if len(np.unique(x)) < 3 or (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law with offset needs at least 3 distinct x, all x > 0 and y > 0")
    fit = _fit_with_offset(x, y, max_iter)
    return _fit_without_offset(x, y) if fit.c < 0 else fit


def _fit_without_offset(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """log y = log a - b log x by ordinary least squares (c = 0)."""
    lx, ly = np.log(x), np.log(y)
    n = len(x)
    slope, intercept = np.polyfit(lx, ly, 1)
    a, b = math.exp(intercept), -slope
    se_a = se_b = math.nan
    if n > 2:
        s2 = np.sum((ly - intercept - slope * lx) ** 2) / (n - 2)
        sxx = np.sum((lx - lx.mean()) ** 2)
        se_b = math.sqrt(s2 / sxx)
        se_a = a * math.sqrt(s2 * (1 / n + lx.mean() ** 2 / sxx))
    rss = float(np.sum((y - a * x ** (-b)) ** 2))
    return PowerLawFit(a, b, 0.0, se_a, se_b, math.nan, n, rss, True, c_fixed=True)


def _fit_with_offset(x: np.ndarray, y: np.ndarray, max_iter: int) -> PowerLawFit:
    log_x0 = np.log(x).mean()
    lx = np.log(x) - log_x0
    theta = _initial_guess(lx, y)
    pred, J = _model(theta, lx)
    rss = float(np.sum((y - pred) ** 2))
    lam, converged = 1e-3, False
    for _ in range(max_iter):
        JtJ, Jtr = J.T @ J, J.T @ (y - pred)
        step = np.linalg.solve(JtJ + lam * np.diag(np.diag(JtJ) + 1e-12), Jtr)
        new_pred, new_J = _model(theta + step, lx)
        new_rss = float(np.sum((y - new_pred) ** 2))
        if new_rss < rss:
            done = rss - new_rss <= 1e-12 * max(rss, 1e-300) or np.abs(step).max() < 1e-10
            theta, pred, J, rss, lam = theta + step, new_pred, new_J, new_rss, lam / 3
            if done:
                converged = True
                break
        else:
            lam *= 4
            if lam > 1e12:
                converged = True  # no step reduces the residual: a (local) minimum
                break
    n = len(x)
    u, b, c = theta
    a = math.exp(u + b * log_x0)
    se = np.full(3, np.nan)
    cov = np.full((3, 3), np.nan)
    if n > 3:
        try:
            cov = rss / (n - 3) * np.linalg.inv(J.T @ J)
            se = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            pass
    # delta method: a = exp(u + b log x0), so da = a (du + log x0 db)
    grad_a = np.array([a, a * log_x0, 0.0])
    se_a = float(math.sqrt(max(grad_a @ cov @ grad_a, 0.0))) if np.isfinite(cov).all() else math.nan
    return PowerLawFit(a, float(b), float(c), se_a, float(se[1]), float(se[2]), n, rss, converged)


@dataclass
class ScalingPoint:
    run_id: str
    label: str
    family: str
    loss: float
    params_total: float
    params_active: float
    flops: float
    tokens: float


def scaling_points(runs: list[Run], metric: str = "val/loss") -> list[ScalingPoint]:
    """One point per finished run that has `metric`, its sizes and its training compute."""
    points = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        if run.info.status != "FINISHED" or metric not in m or "params_total" not in p or X_KEYS["flops"] not in m:
            continue
        points.append(ScalingPoint(run.info.run_id, run_label(run), run.data.tags.get("family", "unknown"), m[metric],
                                   float(p["params_total"]), float(p["params_active"]), m["train/flops_total"],
                                   m.get("train/tokens_total", math.nan)))
    return points


@dataclass
class FamilyFit:
    """The points of one group (a family, and for x = parameters a token budget) and their fit, or why not."""

    group: str
    x: str
    points: list[ScalingPoint]
    fit: PowerLawFit | None
    note: str = ""

    def xs(self) -> np.ndarray:
        return np.array([getattr(p, self.x) for p in self.points])

    def ys(self) -> np.ndarray:
        return np.array([p.loss for p in self.points])


def fit_families(points: list[ScalingPoint], x: str = "flops", min_points: int = 3) -> list[FamilyFit]:
    """Fit L(x) per model family (x = flops), or per family and token budget (x = params_*: L(N) at fixed
    data). Groups with fewer than `min_points` distinct x values are returned unfitted, with a note."""
    if x not in X_KEYS:
        raise ValueError(f"x must be one of {', '.join(X_KEYS)}, got '{x}'")
    groups: dict[str, list[ScalingPoint]] = defaultdict(list)
    for p in points:
        groups[p.family if x == "flops" else f"{p.family} @ {p.tokens:,.0f} tokens"].append(p)
    out = []
    for group, members in sorted(groups.items()):
        members = sorted(members, key=lambda p: getattr(p, x))
        distinct = len({getattr(p, x) for p in members})
        if distinct < min_points:
            out.append(FamilyFit(group, x, members, None, f"{distinct} distinct {x} value(s): need {min_points} to fit"))
            continue
        fit = fit_power_law(np.array([getattr(p, x) for p in members]), np.array([p.loss for p in members]))
        note = "" if fit.b > 0 else "loss does not fall with x here: the fit is no power-law decay"
        out.append(FamilyFit(group, x, members, fit, note))
    return out
