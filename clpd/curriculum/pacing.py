"""Pacing functions: the fraction of the difficulty-ordered training set available at progress p.

Every function here is pure and takes the *saturated* progress ``x = min(1, p / saturate)`` in
[0, 1] and the start fraction ``c0`` in (0, 1]. Each is non-decreasing in ``x``, equals ``c0`` at
``x = 0`` (``none``: 1 everywhere), equals exactly 1 at ``x = 1``, and stays in [c0, 1].

The two parameters are those of Wu, Dyer & Neyshabur 2021 ("When Do Curricula Work?", ICLR),
whose pacing functions take ``b`` (our ``start``: the fraction of the data available at the first
step) and ``a`` (our ``saturate``: the fraction of training after which all the data is
available); Platanios et al. 2019 call the first one c0 and the step at which it saturates T.

:func:`pacing_fraction` validates the arguments and applies a function by name;
:func:`pool_size` turns the fraction into a number of examples for an optimizer step, the
``pool_size(step)`` that :class:`~clpd.curriculum.sampler.Sampler` asks for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict

# Growth rate of ``exponential``: (e^(a x) - 1) / (e^a - 1). With a = 5 a quarter of the way
# through the pool has grown by 1.6% of (1 - c0), half way by 7.6%, three quarters by 28%.
# Wu et al. 2021 use a = 10, which keeps the pool at c0 for most of the run (0.7% at half way).
EXP_RATE = 5.0


def _clamp(value: float, c0: float) -> float:
    # Guards against rounding (c0 + (1 - c0) * 1 need not be exactly 1 in floating point);
    # clamping is monotone, so it keeps every function non-decreasing.
    return min(1.0, max(c0, value))


def none(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """No curriculum: the whole training set at every step (``c0`` is ignored)."""
    return 1.0


def linear(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """Linear competence of Platanios et al. 2019 ("Competence-based Curriculum Learning for
    Neural Machine Translation", NAACL): ``c(t) = min(1, t (1 - c0) / T + c0)``.

    With ``x = t / T``: ``c0 + (1 - c0) x``. Also Wu et al. 2021's ``linear``.
    """
    if x >= 1.0:
        return 1.0
    return _clamp(c0 + (1.0 - c0) * x, c0)


def root(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """Root-p competence of Platanios et al. 2019:
    ``c(t) = min(1, (t (1 - c0^p) / T + c0^p)^(1/p))``; p = 2 is their ``sqrt`` competence.

    With ``x = t / T``: ``(x (1 - c0^p) + c0^p)^(1/p)``. Fast start, slow end: new examples
    arrive more slowly as the pool grows, so each one still gets a fair share of the batches
    while the pool is large (their argument against ``linear``). p = 1 is ``linear``.
    """
    if x >= 1.0:
        return 1.0
    if x <= 0.0:
        return c0  # (c0^p)^(1/p) need not round back to c0
    c0p = c0 ** root_p
    return _clamp((x * (1.0 - c0p) + c0p) ** (1.0 / root_p), c0)


def quadratic(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """``c0 + (1 - c0) x^2``: slow start, fast end. Wu et al. 2021's ``quad`` pacing."""
    if x >= 1.0:
        return 1.0
    return _clamp(c0 + (1.0 - c0) * x * x, c0)


def exponential(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """``c0 + (1 - c0) (e^(a x) - 1) / (e^a - 1)`` with ``a = EXP_RATE = 5``: slower start and
    faster end than ``quadratic``. Wu et al. 2021's ``exp`` pacing, which uses a = 10."""
    if x >= 1.0:
        return 1.0
    return _clamp(c0 + (1.0 - c0) * math.expm1(EXP_RATE * x) / math.expm1(EXP_RATE), c0)


def log(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """``c0 + (1 - c0) ln(1 + (e - 1) x)``: fast start, slow end (the mirror of ``exponential``).

    The logarithmic family is Wu et al. 2021's ``log`` pacing (one of the families the survey of
    Wang, Chen & Zhu 2021, "A Survey on Curriculum Learning", TPAMI, lists); their form
    ``1 + (1/a) ln(x + e^-a)`` with a = 10 is at 54% of (1 - c0) after 1% of the ramp and reaches
    1 only up to rounding. This parametrisation is ours: ``ln(1 + (e - 1) x)`` goes from exactly
    0 at x = 0 to exactly 1 at x = 1, and is at 36% of (1 - c0) at x = 0.25, 62% at x = 0.5.
    """
    if x >= 1.0:
        return 1.0
    return _clamp(c0 + (1.0 - c0) * math.log1p((math.e - 1.0) * x), c0)


def geometric(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """``c0^(1 - x)`` = ``c0 (1 / c0)^x``: the pool grows by the same factor in every equal
    stretch of progress (doubling every ``ln 2 / ln(1 / c0)`` of the ramp).

    The continuous form of Hacohen & Weinshall 2019's "exponential pacing" ("On the Power of
    Curriculum Learning in Training Deep Networks", ICML), which multiplies the pool by a fixed
    ``inc`` every ``step_length`` iterations: ``min(1, starting_percent * inc^floor(i / step_length))``.
    """
    if x >= 1.0:
        return 1.0
    return _clamp(c0 ** (1.0 - x), c0)


def step(x: float, c0: float, *, root_p: float = 2.0, num_buckets: int = 4) -> float:
    """Baby steps (Spitkovsky, Alshawi & Jurafsky 2010, "From Baby Steps to Leapfrog", NAACL;
    Bengio et al. 2009's two-stage curriculum is the case B = 2): the data is cut into ``B =
    num_buckets`` buckets, added one at a time in B equal stretches of the ramp.

    ``c = c0 + (1 - c0) k / (B - 1)`` with ``k = min(B - 1, floor(x B))``. The first bucket is the
    ``c0`` start set, available from the first step; the other B - 1 buckets split the rest
    equally, so with ``start = 1 / B`` all B buckets are equal (c = (k + 1) / B). The last bucket
    arrives at ``x = (B - 1) / B``, not at x = 1, so every bucket, the hardest included, gets a
    stretch of 1/B of the ramp (with ``saturate = 1`` a bucket added at x = 1 would never be
    trained on). Needs B >= 2: one bucket is the whole set, which is ``none``.
    """
    if x >= 1.0:
        return 1.0
    # The 1e-9 lets a boundary that is exact on paper count as reached: 0.6 / 0.8 computes as
    # 0.7499999999999999, which would otherwise hold the third bucket back for a step.
    k = min(num_buckets - 1, math.floor(x * num_buckets + 1e-9))
    return _clamp(c0 + (1.0 - c0) * k / (num_buckets - 1), c0)


PACING: Dict[str, Callable[..., float]] = {
    "none": none,
    "linear": linear,
    "root": root,
    "quadratic": quadratic,
    "exponential": exponential,
    "log": log,
    "geometric": geometric,
    "step": step,
}


def _name(name: Any) -> str:
    # Accept the config's str Enum as well as a plain string.
    return getattr(name, "value", name)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} must be {allowed}")


def pacing_fraction(name: Any, progress: float, *, start: float, saturate: float,
                    root_p: float = 2.0, num_buckets: int = 4) -> float:
    """The fraction of the ordered training set available at training progress ``progress``.

    ``x = min(1, progress / saturate)`` goes into ``PACING[name]``. Arguments out of range raise
    ``ValueError`` naming the parameter and its range: ``progress`` in [0, 1], ``start`` in (0, 1],
    ``saturate`` in (0, 1], ``root_p`` >= 1, ``num_buckets`` an integer >= 2. They are checked for
    every ``name`` (``none`` included), so a bad config fails whichever pacing it names.
    """
    key = _name(name)
    if key not in PACING:
        raise ValueError(f"unknown pacing {key!r}; allowed: {', '.join(PACING)}")
    _check_number("progress", progress, 0.0 <= progress <= 1.0, "in [0, 1]")
    _check_number("start", start, 0.0 < start <= 1.0, "in (0, 1]")
    _check_number("saturate", saturate, 0.0 < saturate <= 1.0, "in (0, 1]")
    _check_number("root_p", root_p, root_p >= 1.0 and math.isfinite(root_p), "a finite number >= 1")
    _check_number("num_buckets", num_buckets, _is_int(num_buckets) and num_buckets >= 2, "an integer >= 2")
    x = min(1.0, progress / saturate)
    return PACING[key](x, start, root_p=root_p, num_buckets=num_buckets)


def pool_size(name: Any, step: int, max_steps: int, n: int, *, start: float, saturate: float,
              root_p: float = 2.0, num_buckets: int = 4) -> int:
    """How many of the ``n`` ordered examples are available at optimizer step ``step`` (0-based)
    of ``max_steps``: ``max(1, ceil(fraction * n))``, at most ``n``, with progress
    ``step / max_steps``. Non-decreasing in ``step``.

    The product is rounded down by 1e-9 before the ceiling, so a fraction that is a multiple of
    1/n in exact arithmetic (0.1 of 30 computes as 3.0000000000000004) gives that multiple.
    For a :class:`~clpd.curriculum.sampler.Sampler`:
    ``lambda s: pool_size(name, s, max_steps, n, start=..., saturate=...)``.
    """
    _check_number("max_steps", max_steps, _is_int(max_steps) and max_steps >= 1, "an integer >= 1")
    _check_number("step", step, _is_int(step) and 0 <= step <= max_steps, f"an integer in [0, {max_steps}]")
    _check_number("n", n, _is_int(n) and n >= 1, "an integer >= 1")
    fraction = pacing_fraction(name, step / max_steps, start=start, saturate=saturate,
                               root_p=root_p, num_buckets=num_buckets)
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))
