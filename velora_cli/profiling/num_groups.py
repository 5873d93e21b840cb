"""The default sub-token choices of ``velora profile``, chosen per model.

A choice is a number of groups G = D / M, so it must divide the width D of every layer a row
compresses. Fixed defaults (64, 32, 16) do not fit every model: LLaMA-60M's down projection is
1376 = 2⁵·43 wide, so G = 64 fits none of its down projections. The defaults are therefore the
powers of two that divide every targeted width, three of them around the paper's G = 32
(M = D/32, paper Table 5b) — 64, 32, 16 where 64 fits, else the three below — so that a default
run never drops a row it planned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PAPER_GROUPS = 32  # paper Table 5b: M = D/32
COUNT = 3


def choose_num_groups(
    widths: Iterable[int], *, around: int = PAPER_GROUPS, count: int = COUNT
) -> tuple[int, ...]:
    """Up to ``count`` numbers of groups that divide every width, largest first, around ``around``.

    Args:
        widths: the ``in_features`` of every layer the rows compress.
        around: the preferred middle choice (the paper's 32).
        count: how many choices.

    Returns:
        Powers of two dividing every width (all divisors of their gcd when it is odd), the one
        nearest ``around`` from below in the middle where a larger one fits, e.g. (64, 32, 16)
        for widths 4096 and 11008, (32, 16, 8) for 512 and 1376.

    Raises:
        ValueError: no widths.
    """
    widths = list(widths)
    if not widths:
        raise ValueError("no layer widths to choose sub-token sizes for")
    common = math.gcd(*widths)
    choices = [2**k for k in range(common.bit_length(), -1, -1) if common % 2**k == 0]
    if len(choices) == 1:  # odd gcd: no power of two but 1, so every divisor
        choices = [d for d in range(common, 0, -1) if common % d == 0]
    middle = next((i for i, g in enumerate(choices) if g <= around), len(choices) - 1)
    start = max(0, min(middle - count // 2, len(choices) - count))
    return tuple(choices[start : start + count])


def targeted_widths(spec, placements: Iterable[str]) -> dict[str, int]:
    """Qualified name -> input width of every layer the placements compress, on a meta build
    of ``spec``'s model (LoRA modes: each adapter's A projection, which VeLoRA wraps there).

    A placement that selects only frozen layers (LoRA on other targets) adds no width: its rows
    are reported as errors saying so (profiler.validate_strategies).

    Raises:
        PlacementError: a placement matches no layer.
    """
    import dataclasses

    from velora_cli.measure.train_step import Strategy, prepare
    from velora_cli.methods.placement import FrozenPlacementError, _in_features, select_layers

    model = prepare(dataclasses.replace(spec, strategy=Strategy()), "meta").model
    widths: dict[str, int] = {}
    for placement in placements:
        try:
            selected = select_layers(model, placement)
        except FrozenPlacementError:
            continue
        for name, module in selected.items():
            if hasattr(module, "lora_A"):
                widths[name] = module.lora_A[next(iter(module.lora_A))].in_features
            else:
                widths[name] = _in_features(module)
    return widths


def default_num_groups(spec, placements: list[str]) -> tuple[tuple[int, ...], str]:
    """The default ``--num-groups`` for ``spec``'s model and these placements, and a line saying
    how they were chosen."""
    widths = targeted_widths(spec, placements)
    if not widths:  # every placement selects only frozen layers: their rows are errors anyway
        return (PAPER_GROUPS,), "every placement selects only layers that do not train"
    choices = choose_num_groups(widths.values())
    distinct = ", ".join(map(str, sorted(set(widths.values()))))
    line = (
        f"default --num-groups {','.join(map(str, choices))}: numbers of groups that divide the "
        f"width of every targeted layer ({distinct}), around the paper's {PAPER_GROUPS} (M = D/32)"
    )
    return choices, line
