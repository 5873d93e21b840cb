"""Memory budgets: parse what the user typed into bytes, and say back what it means.

Decimal units are powers of 1000 (`10GB` = 10^9 bytes, as disk and GPU vendors count), binary units
powers of 1024 (`10GiB`). A bare letter means the decimal unit (`9.5G` = 9.5 GB). A number without a
unit is refused: `10` could be bytes or gigabytes, and guessing wrong is the mistake users of
batch-size finders complain about (REFERENCE.md §3).

Bytes stay ints everywhere; `format_bytes` is the one place that turns them into text here.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["MAX_BYTES", "BudgetError", "describe_budget", "format_bytes", "parse_budget"]

# canonical spelling -> bytes per unit
_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
# lower-case spelling the user may type -> canonical spelling
_ALIASES: dict[str, str] = {u.lower(): u for u in _UNITS}
_ALIASES.update({"k": "KB", "m": "MB", "g": "GB", "t": "TB"})

# The largest budget: torch counts bytes in int64, and no machine holds more than 8 EiB.
MAX_BYTES = 2**63 - 1
_ACCEPTED = (
    "a positive number with a unit, e.g. 10GB, 10GiB, 9.5G, 10240MB, 10240MiB, 123456B, 1.5TB"
)
_PATTERN = re.compile(
    r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$"
)


class BudgetError(ValueError):
    """A memory budget that cannot be understood; the message names the accepted forms."""


def _split(text: str) -> tuple[Decimal, str]:
    """Return (number, canonical unit) for `text`, or raise BudgetError."""
    if not isinstance(text, str):
        raise BudgetError(f"budget must be text like '10GB', got {type(text).__name__}")
    if text.strip().startswith("-"):
        raise BudgetError(f"budget {text!r} is negative: expected {_ACCEPTED}")
    match = _PATTERN.match(text)
    if match is None:
        raise BudgetError(f"cannot read budget {text!r}: expected {_ACCEPTED}")
    unit_text = match["unit"]
    if not unit_text and Decimal(match["number"]) == 0:
        raise BudgetError(f"budget {text!r} is zero: expected {_ACCEPTED}")
    if not unit_text:
        raise BudgetError(
            f"budget {text!r} has no unit: write e.g. {text.strip()}GB or {text.strip()}GiB "
            f"(accepted: {_ACCEPTED})"
        )
    unit = _ALIASES.get(unit_text.lower())
    if unit is None:
        raise BudgetError(f"unknown unit {unit_text!r} in budget {text!r}: expected {_ACCEPTED}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:  # pragma: no cover - the pattern only admits valid decimals
        raise BudgetError(f"cannot read budget {text!r}: expected {_ACCEPTED}") from None
    return number, unit


def parse_budget(text: str) -> int:
    """Parse a memory budget such as ``10GB`` into a whole number of bytes.

    Args:
        text: number and unit, case-insensitive, optional space: ``10GB`` (10^9 bytes each),
            ``10GiB`` (2^30), ``9.5G`` (= GB), ``10240MB``, ``10240MiB``, ``123456B``, ``1.5TB``.

    Returns:
        The budget in bytes.

    Raises:
        BudgetError: no unit, unknown unit, not a number (including nan/inf), zero, negative,
            less than one byte, a fraction of a byte typed in bytes (``1.5B``: never rounded
            silently), or more than `MAX_BYTES`. The one-line message names the accepted forms.

    A larger unit is rounded down to whole bytes (``1.3GiB`` = 1395864371 B, the fraction of a
    byte dropped: a budget is never rounded up).
    """
    number, unit = _split(text)
    if number == 0:
        raise BudgetError(f"budget {text!r} is zero: expected {_ACCEPTED}")
    exact = number * _UNITS[unit]  # Decimal: 9.5 * 10**9 is exact, no float rounding
    if exact < 1:
        raise BudgetError(f"budget {text!r} is less than one byte: expected {_ACCEPTED}")
    if exact > MAX_BYTES:
        raise BudgetError(
            f"budget {text!r} is more than 8 EiB, beyond any machine (and int64 byte counts): "
            f"expected {_ACCEPTED}"
        )
    if exact != exact.to_integral_value() and unit == "B":
        raise BudgetError(
            f"budget {text!r} is {exact.normalize():f} bytes, not a whole number of bytes: "
            f"expected {_ACCEPTED}"
        )
    return int(exact)  # int() truncates: rounds a positive budget down


def describe_budget(nbytes: int, text: str | None = None) -> str:
    """Echo how a budget was understood, e.g. ``10 GB = 9.31 GiB``.

    Args:
        nbytes: the budget in bytes (what `parse_budget` returned).
        text: what the user typed; None when the budget did not come from the user (e.g. the
            device's free memory), in which case the left side is the byte count.

    Returns:
        ``"<number> <unit> = <GiB with 2 decimals> GiB"``; budgets under 0.01 GiB show the right
        side with `format_bytes` instead, so it never reads ``0.00 GiB``.

    Raises:
        BudgetError: `text` is given and is not a valid budget.
    """
    if text is None:
        left = f"{nbytes} B"
    else:
        number, unit = _split(text)
        left = f"{number:f} {unit}"  # 1e3GB -> "1000 GB"
    right = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 100 else format_bytes(nbytes)
    return f"{left} = {right}"


def format_bytes(n: int) -> str:
    """Format a byte count with binary units: ``9.31 GiB``, ``512 MiB``, ``100 B``.

    Args:
        n: bytes; negative values (differences) keep their sign.

    Returns:
        The largest unit whose value is at least 1; whole values without decimals, others with
        two decimals.
    """
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n // size} {unit}" if n % size == 0 else f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"
