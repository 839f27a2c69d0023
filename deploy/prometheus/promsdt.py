"""The SDT arithmetic of the recording rules, in Python and as PromQL text, from one definition.

PromQL has no inverse normal CDF, so the rules use the Abramowitz & Stegun 26.2.23 rational
approximation (Handbook of Mathematical Functions, 1964). For ``0 < q <= 0.5``::

    t = sqrt(-2 ln q)
    x = t - (c0 + c1 t + c2 t^2) / (1 + d1 t + d2 t^2 + d3 t^3)      # upper-tail quantile: Q(x) = q

with ``|error| < 4.5e-4`` in x. The lower-tail quantile (``ppf``) of any ``0 < p < 1`` follows by
symmetry: ``q = 0.5 - |p - 0.5|`` and ``z(p) = sgn(p - 0.5) * x(q)`` (so ``z(0.5) = 0`` exactly).
d' = z(H) - z(FA) is then within 9e-4 of the exact value and c = -(z(H) + z(FA)) / 2 within 4.5e-4.

:func:`as_ppf` evaluates exactly the operations that :func:`promql_z` writes, in the same order,
so the promtool tests' expected values are Python's and match Prometheus to rounding error.
This file is imported by ``rules/build_rules.py`` and ``tests/generate.py``; it needs only the
standard library.
"""

from __future__ import annotations

import math

C0, C1, C2 = 2.515517, 0.802853, 0.010328
D1, D2, D3 = 1.432788, 0.189269, 0.001308
#: Abramowitz & Stegun's stated bound on |x_approx - x| for 26.2.23.
AS_MAX_ABS_ERROR = 4.5e-4


def _sgn(x: float) -> float:
    return 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)


def as_tail_t(p: float) -> float:
    """``t = sqrt(-2 ln q)`` with ``q = 0.5 - |p - 0.5|`` (the rule ``..._t``)."""
    return math.sqrt(-2 * math.log(0.5 - abs(p - 0.5)))


def as_z_from_t(p: float, t: float) -> float:
    """The rule ``z_...``: symmetric A-S 26.2.23 from p and its t."""
    return _sgn(p - 0.5) * (t - (C0 + C1 * t + C2 * (t * t)) / (1 + D1 * t + D2 * (t * t) + D3 * (t * t * t)))


def as_ppf(p: float) -> float:
    """Approximate inverse standard normal CDF, as the recording rules compute it."""
    return as_z_from_t(p, as_tail_t(p))


def promql_tail_t(p: str) -> str:
    """PromQL for ``t`` given the PromQL of a probability vector ``p``."""
    return f"sqrt(-2 * ln(0.5 - abs({p} - 0.5)))"


def promql_z(p: str, t: str) -> str:
    """PromQL for z(p) given vectors ``p`` and its ``t`` (same label sets)."""
    return (
        f"sgn({p} - 0.5) * ({t} - ({C0} + {C1} * {t} + {C2} * ({t} * {t}))"
        f" / (1 + {D1} * {t} + {D2} * ({t} * {t}) + {D3} * ({t} * {t} * {t})))"
    )


def round_like_promql(value: float, to_nearest: float) -> float:
    """PromQL's ``round(v, to_nearest)``: ``floor(v * (1/to_nearest) + 0.5) / (1/to_nearest)``."""
    inverse = 1.0 / to_nearest
    return math.floor(value * inverse + 0.5) / inverse
