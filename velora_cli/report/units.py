"""Units for display: the only place bytes, percentages and seconds become text."""

from __future__ import annotations

from velora_cli.budget import format_bytes

__all__ = ["format_bytes", "fmt_bytes", "fmt_delta", "fmt_seconds"]


def fmt_bytes(value: int | None) -> str:
    return "—" if value is None else format_bytes(value)


def fmt_delta(pct: float | None) -> str:
    """A change against the reference row in percent (the bytes are in json/csv)."""
    if pct is None:
        return ""
    return f"{pct:+.0f}%".replace("-", "−") if round(pct) else "±0%"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 0.1:  # predicted GPU steps of small models: a few ms
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"
