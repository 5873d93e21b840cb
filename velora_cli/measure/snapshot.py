"""Real CUDA memory snapshots of a row's step, for PyTorch's memory_viz (``--memory-snapshot``).

The cuda backend reads the allocator's peak counters, which say how much but not what. PyTorch
records every allocation and free of the caching allocator with its Python stack when asked
(``torch.cuda.memory._record_memory_history``) and writes them with ``_dump_snapshot``: a pickle
that https://pytorch.org/memory_viz opens (drag the file onto the page). These are private
PyTorch APIs (torch 2.1+), used only here.

The snapshot is of one more step after the timed ones, with the same settings and a new batch:
recording stacks slows a step, so the timed steps are never recorded. On the other backends
there is no CUDA allocator to record; their memory timeline comes from the storage tracker
(``velora plot``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Alloc/free events kept (a ring buffer); a 7B step makes tens of thousands.
MAX_ENTRIES = 1_000_000


def snapshot_path(directory: str | Path, spec) -> Path:
    """Where a row's snapshot goes: ``DIR/<row label>-<optimizer>.pickle``.

    Args:
        directory: the ``--memory-snapshot`` directory.
        spec: the row's StepSpec (its strategy label and optimizer name the file).
    """
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.strategy.label).strip("_")
    return Path(directory).resolve() / f"{label}-{spec.optimizer}.pickle"


def record_snapshot(prepared, path: str | Path) -> dict[str, Any]:
    """Run one more training step with the allocator's history on, and dump it.

    Args:
        prepared: the row's prepared model and optimizer on a CUDA device.
        path: the pickle to write.

    Returns:
        ``{"memory_snapshot": path}``, or ``{"memory_snapshot_error": why}`` when recording
        failed (the row's measurements stand either way).
    """
    import torch

    from velora_cli.measure.train_step import train_step

    memory = torch.cuda.memory
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.synchronize()
        memory._record_memory_history(
            enabled="all", context="all", stacks="python", max_entries=MAX_ENTRIES
        )
        try:
            prepared.next_batch()
            train_step(prepared)
            torch.cuda.synchronize()
            memory._dump_snapshot(str(path))
        finally:
            memory._record_memory_history(enabled=None)
    except (RuntimeError, OSError, AttributeError, TypeError) as exc:
        return {"memory_snapshot_error": f"{type(exc).__name__}: {exc}"}
    return {"memory_snapshot": str(path)}


def snapshot_notice(backend, directory: str) -> str:
    """Arm ``backend`` to record snapshots into ``directory`` if it is the cuda backend; the
    line saying what happens either way.

    Args:
        backend: the profile's backend object.
        directory: the ``--memory-snapshot`` directory.
    """
    if getattr(backend, "name", None) == "cuda":
        backend.memory_snapshot = str(directory)
        return (
            f"--memory-snapshot: a CUDA memory snapshot of one step per row (after the timed "
            f"steps) goes to {directory}/; open them at https://pytorch.org/memory_viz"
        )
    return (
        f"--memory-snapshot skipped: CUDA memory snapshots need --backend cuda (this run: "
        f"{getattr(backend, 'name', backend)}); velora plot draws this run's memory timeline "
        "from the storage tracker instead"
    )
