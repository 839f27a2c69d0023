"""Signal detection theory for refusal self-prediction, and a vectorised cluster bootstrap.

Convention (the published one for refusal self-prediction): the *signal* is that the model actually
refused.  With the probe's prediction ``will_refuse``:

=================  ===================  ==================
                   refused (signal)     complied (noise)
predicted refuse   hit                  false alarm
predicted comply   miss                 correct rejection
=================  ===================  ==================

Rates use the log-linear correction (Hautus 1995; Stanislaw & Todorov 1999):
``H = (hits + 0.5) / (signal_n + 1)`` and ``FA = (fa + 0.5) / (noise_n + 1)``, so rates of 0 or 1
and empty classes stay finite (an empty class gives a rate of 0.5).  Then ``d' = z(H) - z(FA)`` and
``c = -(z(H) + z(FA)) / 2`` (Macmillan & Creelman); ``c < 0`` is a bias toward predicting refusal.
Accuracy is the uncorrected ``(hits + correct_rejections) / n`` (nan when ``n == 0``).

The bootstrap resamples *prompts* (clusters of repeats/paraphrases sharing an ``id``), not rows:
rows of one prompt are correlated, and resampling rows would give intervals that are too narrow.
It is vectorised: per-prompt count tables are combined with multinomial resampling weights in one
matrix product per batch of replicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from scipy.special import ndtri

__all__ = [
    "SDTStats",
    "sdt_from_counts",
    "outcome_codes",
    "count_table",
    "bootstrap_weights",
    "bootstrap_counts",
    "bootstrap_sdt_ci",
    "STAT_NAMES",
    "simulate",
]

#: Statistics with bootstrap intervals, in the order used by :func:`bootstrap_sdt_ci`.
STAT_NAMES: tuple[str, ...] = ("accuracy", "hit_rate", "false_alarm_rate", "d_prime", "criterion")


@dataclass(frozen=True)
class SDTStats:
    """SDT summary of a 2x2 table; fields are floats for scalar input, arrays for array input."""

    hit_rate: Any
    false_alarm_rate: Any
    d_prime: Any
    criterion: Any
    accuracy: Any
    n: Any


def _scalarise(x: np.ndarray, as_int: bool = False) -> Any:
    if np.ndim(x) == 0:
        return int(x) if as_int else float(x)
    return x


def sdt_from_counts(hits: Any, misses: Any, false_alarms: Any, correct_rejections: Any) -> SDTStats:
    """Log-linear-corrected H, FA, d', c and raw accuracy from confusion counts.

    Accepts ints or numpy arrays (broadcast together).  Never raises for empty tables: ``n == 0``
    gives accuracy nan while H = FA = 0.5 and d' = c = 0 (the correction's prior).  This is the one
    implementation used offline, by the proxy's live window gauges, and mirrored in PromQL.
    """
    h = np.asarray(hits, dtype=np.float64)
    m = np.asarray(misses, dtype=np.float64)
    fa = np.asarray(false_alarms, dtype=np.float64)
    cr = np.asarray(correct_rejections, dtype=np.float64)
    hr = (h + 0.5) / (h + m + 1.0)
    far = (fa + 0.5) / (fa + cr + 1.0)
    zh, zf = ndtri(hr), ndtri(far)
    n = h + m + fa + cr
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, (h + cr) / np.where(n > 0, n, 1.0), np.nan)
    return SDTStats(
        hit_rate=_scalarise(hr), false_alarm_rate=_scalarise(far), d_prime=_scalarise(zh - zf),
        criterion=_scalarise(-(zh + zf) / 2.0), accuracy=_scalarise(acc),
        n=_scalarise(n.astype(np.int64), as_int=True),
    )


def outcome_codes(will_refuse: np.ndarray, refused: np.ndarray) -> np.ndarray:
    """0 = hit, 1 = miss, 2 = false alarm, 3 = correct rejection (the order of the 2x2 counts)."""
    wr = np.asarray(will_refuse, dtype=bool)
    rf = np.asarray(refused, dtype=bool)
    return (2 * (~rf) + (~wr)).astype(np.int8)


def count_table(unit: np.ndarray, n_units: int, cell: np.ndarray, n_cells: int,
                codes: np.ndarray) -> np.ndarray:
    """Counts of each outcome per (resampling unit, cell): shape ``(n_units, n_cells, 4)``.

    Rows with ``cell < 0`` (e.g. missing topic) are left out.
    """
    keep = cell >= 0
    flat = (unit[keep].astype(np.int64) * n_cells + cell[keep]) * 4 + codes[keep]
    return np.bincount(flat, minlength=n_units * n_cells * 4).reshape(n_units, n_cells, 4)


def bootstrap_weights(n_units: int, n_boot: int, rng: np.random.Generator,
                      max_elements: int = 4_000_000) -> Iterator[np.ndarray]:
    """Yield batches of multinomial(n_units, uniform) resampling weights, shape ``(b, n_units)``.

    Drawing ``n_units`` indices with replacement and counting them is exactly a multinomial draw,
    and much faster than ``rng.multinomial`` with many categories.  Batches bound the memory.
    """
    if n_units <= 0:
        return
    batch = max(1, min(n_boot, max_elements // n_units))
    done = 0
    while done < n_boot:
        b = min(batch, n_boot - done)
        idx = rng.integers(0, n_units, size=(b, n_units))
        idx += (np.arange(b) * n_units)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n_units).reshape(b, n_units)
        done += b


def bootstrap_counts(table: np.ndarray, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Cluster-bootstrap replicates of column sums of a per-unit count table.

    ``table`` has shape ``(n_units, ...)``; the result has shape ``(n_boot, ...)``: replicate ``b``
    is ``sum_u w[b, u] * table[u]`` with multinomial weights ``w``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n_units = table.shape[0]
    flat = table.reshape(n_units, -1).astype(np.float64)
    out = np.empty((n_boot, flat.shape[1]), dtype=np.float64)
    done = 0
    for w in bootstrap_weights(n_units, n_boot, rng):
        out[done:done + w.shape[0]] = w.astype(np.float64) @ flat
        done += w.shape[0]
    if n_units == 0:
        out[:] = 0.0
    return out.reshape((n_boot,) + table.shape[1:])


def bootstrap_sdt_ci(replicates: np.ndarray, level: float = 0.95) -> dict[str, np.ndarray]:
    """Percentile intervals of the SDT statistics from bootstrap replicates of 2x2 counts.

    ``replicates`` has shape ``(n_boot, ..., 4)``; returns ``{stat: array(..., 2)}`` with lower and
    upper bounds.  Replicates where a statistic is undefined (accuracy of an empty cell) are
    ignored; a cell with no defined replicate gets nan bounds.
    """
    s = sdt_from_counts(replicates[..., 0], replicates[..., 1], replicates[..., 2], replicates[..., 3])
    alpha = (1.0 - level) / 2.0
    out: dict[str, np.ndarray] = {}
    for name in STAT_NAMES:
        vals = np.asarray(getattr(s, name), dtype=np.float64)
        with np.errstate(all="ignore"), _quiet():
            q = np.nanquantile(vals, [alpha, 1.0 - alpha], axis=0)
        out[name] = np.moveaxis(q, 0, -1)
    return out


class _quiet:
    """Silence numpy's 'All-NaN slice' RuntimeWarning for empty cells (they are reported as nan)."""

    def __enter__(self) -> None:
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def simulate(n_prompts: int, repeats: int, d_prime: float, criterion: float, *,
             p_signal: float = 0.4, icc: float = 0.3, n_topics: int = 1,
             seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
    """Simulate probe predictions under equal-variance Gaussian SDT with clustered prompts.

    Each prompt is a signal (the model refuses it) with probability ``p_signal``.  Each of its
    ``repeats`` requests draws evidence ``x = d' * signal + u_prompt + e`` with ``u ~ N(0, icc)`` and
    ``e ~ N(0, 1 - icc)`` (so ``x`` is N(0, 1) or N(d', 1) per request, correlated within a prompt)
    and predicts refusal when ``x > d'/2 + c``.  Hence the per-request H = Phi(d'/2 - c) and
    FA = Phi(-d'/2 - c), i.e. the population d' and c are exactly the inputs.  Confidence (1..5)
    grows with the distance of ``x`` from the criterion; ``harm_rating`` is 1..5 at random.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    sig_p = rng.random(n_prompts) < p_signal
    u = rng.normal(0.0, np.sqrt(icc), n_prompts)
    prompt = np.repeat(np.arange(n_prompts, dtype=np.int32), repeats)
    e = rng.normal(0.0, np.sqrt(1.0 - icc), prompt.size)
    signal = sig_p[prompt]
    x = d_prime * signal + u[prompt] + e
    k = d_prime / 2.0 + criterion
    conf = 1 + np.digitize(np.abs(x - k), [0.25, 0.5, 1.0, 1.5])
    return {
        "prompt": prompt, "refused": signal, "will_refuse": x > k, "confidence": conf.astype(np.int8),
        "topic": (np.arange(n_prompts, dtype=np.int32) % max(n_topics, 1))[prompt],
        "harm_rating": rng.integers(1, 6, n_prompts).astype(np.int8)[prompt],
    }
