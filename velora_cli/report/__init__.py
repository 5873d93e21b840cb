"""Rendering: rich tables, JSON and CSV. Bytes stay ints until they reach this package.

One module per document kind (``profile``, ``tune``), units in ``units``.
"""

from velora_cli.report.profile import (
    ROW_FIELDS,
    breakdown_table,
    category_table,
    device_table,
    optimizer_lines,
    profile_footer,
    profile_table,
    to_csv,
    to_json,
)
from velora_cli.report.tune import (
    describe,
    nothing_fits_lines,
    pareto_keys,
    summary_lines,
    tune_table,
    unfit_modes,
)

__all__ = [
    "ROW_FIELDS",
    "breakdown_table",
    "category_table",
    "describe",
    "device_table",
    "nothing_fits_lines",
    "optimizer_lines",
    "pareto_keys",
    "profile_footer",
    "profile_table",
    "summary_lines",
    "to_csv",
    "to_json",
    "tune_table",
    "unfit_modes",
]
