"""Sizes written as text, both ways: parsing sizes people give, formatting sizes for people.

bigmodel's own arguments (``max_resident=``, ``write_store(shard_size=)``, the command line's
``--shard-size`` and ``--budget``) follow one rule, with no surprises (`parse_size`): a size
is a number of bytes, given as an integer, an integer string, or a number with a unit.
``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000 and ``KiB``, ``MiB``, ``GiB``, ``TiB``
powers of 1024, in any letter case (``"256mb"`` is 256 megabytes, never bits).

accelerate's functions (``max_memory`` budgets, ``fallback_allocate``'s limit) keep
accelerate's rule (`convert_file_size_to_int`): a trailing lowercase "b" means bits, there
is no TB, and a bare number string is refused.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from fractions import Fraction

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_HOW = (
    "use a number of bytes (1000000) or a number with a unit: KB, MB, GB, TB (powers of 1000) "
    "or KiB, MiB, GiB, TiB (powers of 1024), e.g. '256MB' or '2GiB'"
)


def parse_size(value: int | float | str, argument: str) -> int:
    """The number of bytes ``value`` stands for; ``argument`` names it in errors.

    Raises:
        ValueError: not a size, negative, an unknown unit, or a fraction of a byte.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{argument}={value!r} is not a size: {_HOW}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):  # NaN and infinities
            raise ValueError(f"{argument}={value!r} is not a size: {_HOW}")
        nbytes = Fraction(value)
    else:
        match = _SIZE.fullmatch(value)
        unit = match and _UNITS.get(match.group(2).upper())
        if unit is None:
            raise ValueError(f"{argument}={value!r} is not a size: {_HOW}")
        nbytes = Fraction(match.group(1)) * unit
    if nbytes < 0:
        raise ValueError(f"{argument}={value!r}: a size cannot be negative")
    if nbytes.denominator != 1:
        raise ValueError(f"{argument}={value!r} is not a whole number of bytes")
    return int(nbytes)


def size_option(option: str) -> Callable[[str], int]:
    """An argparse ``type=`` for a size option: a bad value is a usage error naming it."""

    def parse(value: str) -> int:
        try:
            return parse_size(value, option)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def format_size(nbytes: float) -> str:
    """``nbytes`` for people: "512 B", "1.87 GB" (powers of 1000, as the sizes above)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


# Suffix, multiplier, and whether a trailing lowercase "b" turns bytes into bits. Binary
# suffixes come first so that "GIB" is not read as "B".
_ACCELERATE_UNITS = (
    ("GIB", 2**30, False),
    ("MIB", 2**20, False),
    ("KIB", 2**10, False),
    ("GB", 10**9, True),
    ("MB", 10**6, True),
    ("KB", 10**3, True),
)


def convert_file_size_to_int(size: int | str) -> int:
    """Converts a size such as ``"5GB"``, ``"1.5GiB"`` or ``"10Mb"`` to a number of bytes.

    Units: GiB/MiB/KiB (powers of 2) and GB/MB/KB (powers of 10), any case. A decimal unit
    ending in a lowercase ``b`` is in bits (``"10Gb"`` is 1.25 GB). Ints are returned as they
    are. There is no TB unit and a bare number string is refused, as in accelerate.

    Raises:
        ValueError: unknown unit, not a number, or negative.
    """
    error = (
        f"`size` {size} is not in a valid format. Use an integer for bytes, or a string with an "
        "unit (like '5.0GB')."
    )
    if isinstance(size, int):
        if size < 0:
            raise ValueError(error)
        return size
    for suffix, multiplier, bits_allowed in _ACCELERATE_UNITS:
        if size.upper().endswith(suffix):
            try:
                n_bytes = int(float(size[: -len(suffix)]) * multiplier)
            except ValueError:
                raise ValueError(error) from None
            if bits_allowed and size.endswith("b"):
                n_bytes //= 8
            if n_bytes < 0:
                raise ValueError(error)
            return n_bytes
    raise ValueError(error)
