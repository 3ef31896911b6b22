"""One compact, fixed format for every number lipverify prints (terminal, Markdown, HTML).

Every function returns a string of at most 11 characters for any float (so a table column sized for it
never has to cut a number), and never hides the order of magnitude: ``6570.5`` is ``6570.5``,
``10886353.0`` is ``1.089e+07``, a ratio ``10886353.0`` is ``1.09e+07x``.

Warnings
--------
The formats round: 4-5 significant digits for values, 3 for ratios.  The JSON report keeps full precision.
"""

from __future__ import annotations

import math
from fractions import Fraction

#: widest string :func:`num` returns (``-1.234e+300``)
NUM_WIDTH = 11


def num(v) -> str:
    """``v`` with 5 significant digits below 1e5, 4 in scientific notation notation outside [1e-3, 1e5); ``-`` for None."""
    if v is None:
        return "-"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        s = f"{v:.5g}"
        return s if "e" not in s else f"{v:.3e}"
    return f"{v:.3e}"


def ratio(r) -> str:
    """A ratio (upper / lower, a slowdown) as ``12.3x``, ``1.09e+07x``; ``-`` for None, ``inf`` for infinity."""
    if r is None:
        return "-"
    r = float(r)
    if math.isnan(r):
        return "nan"
    if math.isinf(r):
        return "inf"
    if 0.01 <= abs(r) < 1e4:
        return f"{r:.3g}x"
    return f"{r:.2e}x"


def pct(f, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``0.123`` -> ``12.3%``; a small non-zero fraction is
    never ``0.0%`` (``3e-10`` -> ``3.0e-08%``); ``-`` for None (at most 11 characters
    for any float: far outside [0, 1] in scientific notation)."""
    if f is None:
        return "-"
    v = 100 * float(f)
    if not math.isfinite(v):
        return num(v)
    s = f"{v:.{digits}f}%"
    if v != 0 and float(s[:-1]) == 0:  # a small non-zero fraction never prints as 0.0%
        return f"{v:.2g}%" if abs(v) >= 1e-4 else f"{v:.1e}%"
    return s if len(s) <= NUM_WIDTH else f"{v:.2e}%"


def eps(e, norm: str | None = None) -> str:
    """A radius: ``k/255`` when it is one (to 1e-9; the usual image budgets under l_inf), else :func:`num`.

    ``8/255`` prints as ``8/255``; ``0.141176...`` (36/255) as ``36/255``; ``0.3`` as ``0.3``.
    """
    if e is None:
        return "-"
    e = float(e)
    if not math.isfinite(e) or e <= 0:
        return num(e)
    k = e * 255
    kk = round(k)
    if 1 <= kk <= 4 * 255 and abs(k - kk) < 1e-9 * k:
        # 51/255 = 0.2 and 255/255 = 1 have short decimals; 36/255 = 0.14117... does not
        return num(e) if Fraction(kk, 255).denominator in (1, 5) else f"{kk}/255"
    return num(e)
