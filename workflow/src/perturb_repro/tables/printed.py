"""Printed numbers: how a value a paper printed is compared with ours and shown beside it."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

# A printed number: optional sign, digits, optional fraction. No exponents: papers print fixed point,
# and an exponent would make "number of decimals" ambiguous.
PRINTED_NUMBER_RE = re.compile(r"^[+-]?\d+(\.\d+)?$")


def decimals(printed: str) -> int:
    """Number of printed decimals of a fixed-point string (its precision)."""
    return len(str(printed).partition(".")[2])


def is_match(reproduced: float, reported: str) -> bool:
    """Whether ``reproduced`` prints as ``reported`` at the reported precision.

    Rounding goes through Python's fixed-point formatting (round-half-even on the exact binary
    value), i.e. the way the published number was most likely produced from a float.

    Args:
        reproduced: Our value (finite).
        reported: The printed string, e.g. ``"0.5630"``.

    Returns:
        True when ``f"{reproduced:.{decimals}f}"`` equals the printed number numerically
        (so ``-0.0000`` equals ``0.0000``).
    """
    return Decimal(f"{reproduced:.{decimals(reported)}f}") == Decimal(reported)


def format_value(value: Any, reported: str, extra_digits: int = 2, signed: bool = False) -> str:
    """Format ``value`` at the printed precision of ``reported`` plus ``extra_digits``.

    Two extra digits show how close a value is to the rounding boundary without pretending to more
    precision than the comparison uses.

    Args:
        value: Number to format; NaN/None/non-numeric gives ``"n/a"`` (never 0).
        reported: The printed string whose decimals set the precision; when it is not a number (a
            blank cell) there is no printed precision and 6 significant digits are shown.
        extra_digits: Digits beyond the printed precision.
        signed: Prefix positive numbers with ``+`` (for differences).

    Returns:
        The formatted string.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"
    if not PRINTED_NUMBER_RE.match(str(reported).strip()):
        return f"{number:+.6g}" if signed else f"{number:.6g}"
    places = decimals(str(reported).strip()) + extra_digits
    return f"{number:+.{places}f}" if signed else f"{number:.{places}f}"
