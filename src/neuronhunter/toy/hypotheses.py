"""Small, dependency-free significance tests for judging the toy experiments' hypotheses across seeds.

One seed proves nothing, so each hypothesis is measured once per seed and judged on the per-seed values:

* :func:`one_sample_t` — one-sided Student t test of the per-seed values (e.g. per-seed differences
  ``mean(poly) - mean(mono)``) against 0.
* :func:`sign_test` — exact one-sided binomial sign test on the same values (no normality assumption; with 5
  seeds its smallest possible p is ``1/32 ≈ 0.031``).
* :func:`welch_t` — Welch's unequal-variance t test, used on neurons pooled over seeds as a secondary check.

:func:`judge` turns per-seed values into the verdict used in ``summary.json``: **supported** when the mean lies in
the predicted direction *and* the one-sided t test gives ``p < alpha``; otherwise **not supported** (with the
reason). The Student t distribution is evaluated through the regularised incomplete beta function (continued
fraction, Numerical Recipes §6.4), so no SciPy is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

Direction = Literal["greater", "less"]


def _betacf(a: float, b: float, x: float, max_iter: int = 300, eps: float = 3e-16) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """Survival function ``P(T > t)`` of Student's t distribution with ``df`` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _one_sided_p(t: float, df: float, direction: Direction) -> float:
    return student_t_sf(t, df) if direction == "greater" else student_t_sf(-t, df)


def one_sample_t(values: Sequence[float], direction: Direction = "greater") -> dict[str, float]:
    """One-sided one-sample t test of ``mean(values)`` against 0.

    Args:
        values: the per-seed values (at least 2).
        direction: ``"greater"`` tests mean > 0, ``"less"`` tests mean < 0.

    Returns:
        ``{"t", "df", "p"}``; NaN where undefined (fewer than 2 values). Zero spread gives ``t = ±inf``.
    """
    n = len(values)
    mean, std = _mean_std(values)
    if n < 2:
        return {"t": float("nan"), "df": float(max(n - 1, 0)), "p": float("nan")}
    se = std / math.sqrt(n)
    t = (mean / se) if se > 0 else (math.copysign(math.inf, mean) if mean != 0 else 0.0)
    return {"t": t, "df": float(n - 1), "p": _one_sided_p(t, n - 1, direction)}


def welch_t(a: Sequence[float], b: Sequence[float], direction: Direction = "greater") -> dict[str, float]:
    """One-sided Welch t test of ``mean(a) - mean(b)`` (``greater``: a > b; ``less``: a < b)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return {"t": float("nan"), "df": float("nan"), "p": float("nan")}
    ma, sa = _mean_std(a)
    mb, sb = _mean_std(b)
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        diff = ma - mb
        t = math.copysign(math.inf, diff) if diff != 0 else 0.0
        return {"t": t, "df": float(na + nb - 2), "p": _one_sided_p(t, na + nb - 2, direction)}
    t = (ma - mb) / se
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    return {"t": t, "df": df, "p": _one_sided_p(t, df, direction)}


def sign_test(values: Sequence[float], direction: Direction = "greater") -> dict[str, float]:
    """Exact one-sided sign test: ``P(at least k of n signs in the predicted direction | p = 1/2)``; zeros dropped."""
    nonzero = [v for v in values if v != 0]
    n = len(nonzero)
    k = sum(1 for v in nonzero if (v > 0) == (direction == "greater"))
    if n == 0:
        return {"n": 0, "k": 0, "p": float("nan")}
    p = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
    return {"n": n, "k": k, "p": p}


def judge(
    values: Sequence[float], direction: Direction, alpha: float = 0.05, min_seeds: int = 3
) -> dict[str, Any]:
    """Judge a hypothesis from its per-seed values.

    Args:
        values: one value per seed (NaNs, e.g. seeds where a group was empty, are dropped).
        direction: the predicted sign of the values.
        alpha: significance level of the one-sided t test.
        min_seeds: fewest usable seeds needed to call the hypothesis supported.

    Returns:
        ``mean``, ``std``, ``n_seeds``, the t test (``t``, ``df``, ``p``), the sign test (``sign_k``, ``sign_n``,
        ``sign_p``), ``verdict`` (``"supported"``/``"not supported"``) and a one-line ``reason``.
    """
    vals = [float(v) for v in values if not math.isnan(float(v))]
    mean, std = _mean_std(vals)
    tt = one_sample_t(vals, direction)
    st = sign_test(vals, direction)
    if len(vals) < min_seeds:
        verdict, reason = "not supported", f"only {len(vals)} usable seed(s) (< {min_seeds}); cannot judge"
    elif (mean > 0) != (direction == "greater") or mean == 0:
        verdict, reason = "not supported", f"mean {mean:+.4g} is not in the predicted direction ({direction})"
    elif not tt["p"] < alpha:
        verdict, reason = "not supported", f"direction as predicted but t-test p = {tt['p']:.3g} >= {alpha}"
    else:
        verdict, reason = (
            "supported",
            f"mean {mean:+.4g} in the predicted direction, t-test p = {tt['p']:.3g}",
        )
    return {
        "mean": mean,
        "std": std,
        "n_seeds": len(vals),
        "t": tt["t"],
        "df": tt["df"],
        "p": tt["p"],
        "sign_k": st["k"],
        "sign_n": st["n"],
        "sign_p": st["p"],
        "alpha": alpha,
        "verdict": verdict,
        "reason": reason,
    }
