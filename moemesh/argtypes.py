"""argparse value types shared by every command: each rejects a bad value with a message saying why."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 picks a free port), got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def seconds_at_least(minimum: float):
    def parse(text: str) -> float:
        value = _number(text, float, "seconds")
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g} seconds, got {text}")
        return value

    return parse


def seed(text: str) -> int:
    value = _number(text, int, "an integer")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {value}")
    return value


def unit_fraction(text: str) -> float:
    """A number in (0, 1], like a balancedness target."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
