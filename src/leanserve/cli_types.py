"""argparse ``type=`` validators shared by the ``leanserve`` commands.

Each takes the flag's text and returns the parsed value, or raises ``argparse.ArgumentTypeError``,
which argparse turns into a one-line usage error with exit status 2. ``float()`` alone accepts
"nan", "inf" and negatives, which then flow into arithmetic and come out as NaN or negative
dollars, so every number here is finite and signed as its meaning requires.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def finite_float(text: str) -> float:
    """Any finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def integer(text: str) -> int:
    """Any whole number."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def ranged(parse: Callable[[str], T], ok: Callable[[T], bool], rule: str) -> Callable[[str], T]:
    """A validator: ``parse`` the text, then require ``ok`` of the value ("must be {rule}" otherwise)."""
    def validate(text: str) -> T:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return validate


positive_float = ranged(finite_float, lambda v: v > 0, "greater than 0")
non_negative_float = ranged(finite_float, lambda v: v >= 0, "0 or more")
fraction = ranged(finite_float, lambda v: 0 < v <= 1, "in (0, 1]")
unit_interval = ranged(finite_float, lambda v: 0 <= v <= 1, "in [0, 1]")  # a share that may be none or all
positive_int = ranged(integer, lambda v: v > 0, "greater than 0")
port = ranged(integer, lambda v: 0 <= v <= 65535, "a port number in 0-65535")  # 0: any free port
