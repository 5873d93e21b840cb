"""Backends that measure one training step: ``cuda`` (real allocator), ``cpu`` (real tensors,
tracked storages) and ``estimate`` (meta tensors, no allocation). Each implements ``Backend`` and
returns a row: a plain dict of the fields ``velora profile`` reports.
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
    message = " ".join(str(exc).split()) or type(exc).__name__
    oom = "out of memory" in message.lower() or type(exc).__name__ == "OutOfMemoryError"
    return {"status": "oom" if oom else "error", "backend": backend, "error": message}
