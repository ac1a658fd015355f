"""Argument types that check a number's range as the command line is parsed.

A count of 0 or -1, a NaN, or a seed no generator takes is refused before
anything loads, in argparse's one line, instead of failing after minutes of
loading or, worse, giving a silently wrong result (`--eval-batches 0` once
recorded a held-out loss of 0.0).
"""

from __future__ import annotations

import argparse
import math

# torch.Generator.manual_seed and numpy's default_rng take seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**64 - 1], got {value}")
    return value


def finite_float(text: str) -> float:
    return _number(text)


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {value}")
    return value


def gib_as_bytes(text: str) -> int:
    """A size given in GiB, as bytes; at least 1 KiB (less is a slip of units, and rounds to nothing)."""
    value = _number(text)
    if value * 2**30 < 2**10:
        raise argparse.ArgumentTypeError(f"must be at least 1 KiB (about 1e-6 GiB), got {value}")
    return int(value * 2**30)
