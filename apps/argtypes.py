"""Argument types that check numeric flags at parse time: argparse then prints one usage error
naming the flag (exit 2) instead of a traceback later."""

import argparse
import math


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def at_least(low, kind=int):
    """A type accepting numbers >= low."""
    def parse(text):
        value = _number(kind, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def above(low, kind=float):
    """A type accepting numbers > low."""
    def parse(text):
        value = _number(kind, text)
        if value <= low:
            raise argparse.ArgumentTypeError(f"{text} must be above {low}")
        return value
    parse.__name__ = f"{kind.__name__} > {low}"
    return parse


def fraction(text):
    """A number in (0, 1] (top-p)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


positive = at_least(1)  # counts, sizes, steps
non_negative = at_least(0)  # seeds, warm-ups, optional counts
non_negative_float = at_least(0.0, float)  # temperatures, weights, latencies
positive_float = above(0.0)  # learning rates, ridge strengths, timeouts
