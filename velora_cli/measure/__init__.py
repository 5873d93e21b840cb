"""One training step, tracked: the step every backend runs, the storage tracker, and the cpu and
cuda backends. Backends (``cuda``: real allocator; ``cpu``: real tensors, tracked storages;
``estimate``: meta tensors, in velora_cli/estimate/) implement ``Backend`` and return a row: a
plain dict of the fields ``velora profile`` reports.

    train_step.py  `StepSpec`, `Strategy`, prepare a model and run one step (defined once)
    layout.py      the step's parallel layout: names and checks
    tracker.py     live tensor storages by category, op by op, and the allocation trace
    observe.py     one tracked step: the shared core of the cpu and estimate backends
    accounting.py  bytes saved for backward during a forward pass
    timeline.py    the memory timeline of one step, from the allocation trace
    meta_ops.py    meta-kernel results kept by input metadata (the estimate's third shortcut,
                   here because the tracker and the op counter both use it)
    cpu.py, cuda.py   the real backends; snapshot.py: CUDA memory snapshots

May import: emulation, methods and the leaves (pyproject's ``[tool.importlinter]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from velora_cli.measure.train_step import StepSpec

BACKENDS = ("auto", "cuda", "cpu", "estimate")


class Backend(Protocol):
    """Measure one training step of ``spec``; never raises for a failed row.

    Returns:
        A row dict with at least ``status`` (``ok``|``oom``|``error``), ``backend``, and when ok
        ``peak_bytes``, ``activation_bytes``, ``param_bytes``, ``grad_bytes``,
        ``optimizer_bytes``, ``step_seconds`` (None when not measured), ``tokens_per_second``.
    """

    name: str

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]: ...


def failed_row(backend: str, exc: BaseException) -> dict[str, Any]:
    """A row for a strategy that could not be measured (out of memory, invalid setting...)."""
    import logging

    message = " ".join(str(exc).split()) or type(exc).__name__
    # ``velora --debug`` shows where it failed (cli.root); otherwise the row's one line says it
    logging.getLogger("velora_cli").debug(
        "a row of the %s backend failed: %s", backend, message, exc_info=exc
    )
    oom = "out of memory" in message.lower() or type(exc).__name__ == "OutOfMemoryError"
    return {"status": "oom" if oom else "error", "backend": backend, "error": message}
