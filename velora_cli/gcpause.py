"""The cyclic garbage collector held off while the CLI imports torch and transformers.

Importing torch, transformers and a model class creates several hundred thousand long-lived
objects (modules, functions, classes). CPython 3.11 runs a full collection whenever the
survivors grow by a quarter, so during the imports the collector walks them again and again:
0.68 s of collections in ``import torch, transformers; from transformers import
LlamaForCausalLM`` (4.3 s), and about 1.8 s less CPU with the collector off (this 2-core machine,
load ~5, four runs each). So `pause` (the CLI's entry point) turns it off and `resume` (after
the first model is built: the imports are done) moves everything alive into the permanent
generation (``gc.freeze``: never walked again, and not copied-on-write by a forked helper) and
turns it back on.

Reference counting frees everything as before; what waits is cyclic garbage made while paused.
`resume` does not collect it (a full collection over the frozen objects costs more than the
pause saves): it stays, frozen. Measured: 9,426 objects after the imports above.
Only a pause this module made is resumed: a program that turned the collector off itself (a
library user of ``velora_cli``) keeps it off.

`paused` holds the collector off for one estimate row (`estimate.backend`): a row allocates ~10^6
short-lived Python objects (dispatch keys, trace events, the synthesis' positions, allocator
blocks), which set off collections of the oldest generation, each walking the whole heap (in a
tune, the built meta models and kernel caches, ~6·10^5 objects): 15-20% of a 7B tune row's CPU.
What the row leaves as cyclic garbage is collected after it. No storage of a step is freed by the
collector (the tracker hears frees from refcounts: rows are the same with collections forced every
few allocations, tests/test_estimate_gc.py). The CLI's import pause may end inside a row (the row
builds the first model): the collector then comes back when the row ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_paused = False  # the CLI's import pause is in force
_rows = 0  # `paused` blocks in force (they nest)
_on_after_rows = False  # the import pause ended inside a row: the collector back on after it


def pause() -> None:
    """Turn the cyclic collector off until `resume`, if it is on."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze what is alive and turn the collector back on (after the row in progress, if
    any), if `pause` turned it off."""
    global _paused, _on_after_rows
    if _paused:
        _paused = False
        gc.freeze()
        if _rows:
            _on_after_rows = True
        else:
            gc.enable()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off for the block, back as it was after (or on, where the CLI's
    import pause ended inside it)."""
    global _rows, _on_after_rows
    collecting = gc.isenabled()
    gc.disable()
    _rows += 1
    try:
        yield
    finally:
        _rows -= 1
        if not _rows and (collecting or _on_after_rows):
            _on_after_rows = False
            gc.enable()
