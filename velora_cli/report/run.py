"""Rendering ``velora profile --compare RUN``: a run's measured figures beside the prediction."""

from __future__ import annotations

from typing import Any

from velora_cli.report.units import fmt_bytes

FIGURES = {
    "allocated_bytes": "peak allocated (torch.cuda)",
    "reserved_bytes": "peak reserved (torch.cuda)",
    "device_used_bytes": "device used (NVML)",
    "tensor_peak_bytes": "tracked tensor peak",
    "rss_peak_bytes": "peak RSS, whole process",
    "rss_peak_since_start_bytes": "peak RSS since start, whole process",
    "tokens_per_second": "tokens/s",
}


def _value(figure: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if figure == "tokens_per_second" else fmt_bytes(int(value))


def _error(error: float | None, like: bool) -> str:
    if error is None:
        return ""
    return f"{error:+.1%}".replace("-", "−") if like else "not like for like"


def comparison_table(document: dict[str, Any]):
    """A rich Table: figure | run | prediction | error | plan | error."""
    from rich.table import Table

    title = (
        f"run {document['run']} · {document['spec']['model']} · micro-batch "
        f"{document['spec']['batch_size'] // document['spec']['grad_accum_steps']} × "
        f"{document['spec']['grad_accum_steps']} · seq {document['spec']['seq_len']} · "
        f"predicted by backend {document['backend']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("figure", no_wrap=True)
    for name in ("run", "prediction", "error", f"plan ({document['plan_backend']})", "error"):
        table.add_column(name, justify="right", no_wrap=True)
    for line in document["rows"]:
        figure = line["figure"]
        table.add_row(
            FIGURES.get(figure, figure),
            _value(figure, line["run"]),
            _value(figure, line["predicted"]),
            _error(line["relative_error"], line["like_for_like"]),
            _value(figure, line["plan"]),
            _error(line["plan_error"], line["like_for_like"]),
        )
    return table


def comparison_footer(document: dict[str, Any]) -> list[str]:
    """What was predicted, how, and what is not like for like."""
    lines = list(document["notes"])
    lines.append(f"prediction: {document['label']} ({document['precision']})")
    row = document["row"]
    if row.get("status") != "ok":
        lines.append(f"the prediction failed: {row.get('status')}: {row.get('error', '')}")
    lines.append("error = (run − predicted) / predicted")
    if any(not line["like_for_like"] for line in document["rows"]):
        lines.append(
            "peak RSS counts the whole process (Python, libraries, data) besides tensors: "
            "compare the tracked tensor peak with the prediction"
        )
    return lines
