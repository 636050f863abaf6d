"""
flagtypes.py: argparse that checks every value before any work. A companion of transformer.py and
prepare_data.py, whose command lines use it; it never imports either.

Each type below turns a bad value into one line ("must be >= 1, got 0"), and ArgumentParser prints it
as 'PROG: error: ...' with exit status 2, without argparse's usage block.
"""

import argparse
import math

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): 'transformer.py: error: ...', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(low, high=None):
    """An argparse type: an integer >= low (and <= high, when given)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}{f' and <= {high}' if high else ''}, got {value}")
        return value

    return parse


def in_range(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite number between low and high, each end included unless it is open."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            if high == math.inf:
                interval = f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def device_name(text):
    """An argparse type: 'auto' or a device torch knows and this machine has (cpu, cuda, cuda:1, mps)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine")
    return text
