"""``velora models``: the built-in architectures."""

from __future__ import annotations

from velora_cli.commands.errors import guarded
from velora_cli.commands.output import wide_console


@guarded
def models() -> None:
    """List the built-in architectures (usable offline, random weights)."""
    from rich.table import Table

    from velora_cli.budget import format_bytes
    from velora_cli.models import list_builtins

    table = Table(title="built-in architectures", title_justify="left")
    for column in ("name", "type", "params", "layers", "hidden", "fp32 weights", "hub ids"):
        table.add_column(
            column,
            justify="right" if column in ("params", "layers", "hidden", "fp32 weights") else "left",
        )
    for row in list_builtins():
        table.add_row(
            row["name"],
            row["model_type"],
            _millions(row["params"]),
            str(row["layers"]),
            str(row["hidden"]),
            format_bytes(row["params"] * 4),
            ", ".join(row.get("hub_ids", [])),
        )
    wide_console().print(table)


def _millions(params: int) -> str:
    """``58M``, ``6,738M``; under ten million with two significant decimals (``0.23M``)."""
    return f"{params / 1e6:,.0f}M" if params >= 1e7 else f"{params / 1e6:.2g}M"
