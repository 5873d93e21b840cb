"""The ``cuda`` backend: real steps on a GPU, each row in a fresh process.

A fresh process per row gives a clean caching allocator (no carry-over between strategies) and
makes an out-of-memory harmless: it becomes a row with status ``oom`` and the profile goes on.
Measurement hygiene (REFERENCE.md §2): warm-up steps (cuBLAS workspace, optimizer state, v),
``empty_cache`` + ``reset_peak_memory_stats``, then timed steps with CUDA events; the peak is
``max_memory_allocated`` over the timed steps, reported with ``max_memory_reserved`` and the
device-level used memory from NVML (includes the CUDA context). Beside them, each ok row carries
what the estimate backend predicts for the same step on this GPU (``predicted_*`` fields: the
allocator model's reserved and device-level memory, the roofline's step time) and how far off it
is (``estimate_error_*``, device_memory.estimate_error; ``prediction_error`` for the step time),
so every GPU run calibrates both models; the parent computes it on meta tensors after the child
has exited and never touches CUDA.

The parent runs ``python -m velora_cli.measure.cuda`` with the step spec as JSON on stdin; the
child prints one JSON row on its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from velora_cli.measure import failed_row
from velora_cli.measure.train_step import StepSpec

_MARK = "VELORA_ROW "


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class CudaBackend:
    """Real GPU measurement, one subprocess per row."""

    warmup: int = 2
    steps: int = 5
    timeout: float = 1800.0
    name: str = "cuda"
    memory_snapshot: str | None = None  # a directory: record each row's step (snapshot.py)
    # what the parent adds beside each ok row: the estimate's prediction for the GPU the row ran
    # on and its errors (`velora_cli.estimate.beside.estimate_beside`, passed in by the profile:
    # this layer does not import the estimate); None: the measurement alone
    beside: Callable[[CudaBackend, StepSpec, dict[str, Any]], dict[str, Any]] | None = None
    alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF for the worker; None: inherited

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        request = {
            "spec": spec.to_json(),
            "warmup": self.warmup,
            "steps": self.steps,
            "breakdown": breakdown,
        }
        if self.memory_snapshot:
            from velora_cli.measure.snapshot import snapshot_path

            request["memory_snapshot"] = str(snapshot_path(self.memory_snapshot, spec))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "velora_cli.measure.cuda"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=self._environment(),
            )
        except subprocess.TimeoutExpired:
            return failed_row(self.name, TimeoutError(f"no result within {self.timeout:.0f} s"))
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(_MARK):
                row = json.loads(line[len(_MARK) :])
                if self.beside is not None and row.get("status") == "ok":
                    row.update(self.beside(self, spec, row))
                return row
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return failed_row(self.name, RuntimeError(f"worker exited {proc.returncode}: {tail}"))

    def _environment(self) -> dict[str, str]:
        env = os.environ.copy()
        if self.alloc_conf is not None:
            env["PYTORCH_CUDA_ALLOC_CONF"] = self.alloc_conf
        return env


def nvml_used_bytes(index: int) -> int | None:
    """Device-level used memory (all processes, CUDA context included), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVMLError subclasses, missing library: no reading
        return None


def nvml_process_used_bytes(index: int, pid: int) -> int | None:
    """GPU memory NVML attributes to process ``pid`` (its CUDA context + what its allocator
    reserved), or None: without NVML, or where the process is not listed (a container's PID
    namespace) or its usage is not reported."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
            return None
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVMLError subclasses, missing library: no reading
        return None


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """Measure one row in this process (the child side)."""
    import statistics

    import torch

    from velora_cli.measure.accounting import SavedTensorCounter
    from velora_cli.measure.observe import force_refresh
    from velora_cli.measure.train_step import prepare, train_step

    spec = StepSpec.from_json(request["spec"])
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        prepared = prepare(spec, "cuda", attn_implementation="sdpa")
        for _ in range(request["warmup"]):
            train_step(prepared)
        torch.cuda.synchronize()
        counter = SavedTensorCounter(prepared.model)
        ledger = getattr(prepared.model, "_velora_host_ledger", None)  # activation offload
        if ledger is not None:
            ledger.reset()
        train_step(prepared, forward_context=lambda: counter)  # activation count, untimed
        torch.cuda.synchronize()
        host = {} if ledger is None else ledger.fields(len(prepared.micro_batches))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # galore/adarankgrad: the first timed step refreshes every subspace (their costliest
        # step): inside the peak window, its time reported apart from the median.
        refreshing = force_refresh(prepared)
        before = prepared.subspace_refreshes()
        times = []
        for _ in range(request["steps"] + int(refreshing)):
            prepared.next_batch()  # a new batch per step, as training (and the cpu backend)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step(prepared)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        refresh_seconds = times.pop(0) if refreshing else None
        timed_refreshes = None if before is None else prepared.subspace_refreshes() - before
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        used = nvml_used_bytes(device.index or 0)
        own = nvml_process_used_bytes(device.index or 0, os.getpid())
    except torch.cuda.OutOfMemoryError as exc:
        return failed_row("cuda", exc)
    seconds = statistics.median(times)
    row = {
        "status": "ok",
        "backend": "cuda",
        "peak_bytes": peak,
        "reserved_bytes": reserved,
        "device_used_bytes": used,
        "process_used_bytes": own,  # this worker alone (device_used_bytes counts all processes)
        "gpu_name": torch.cuda.get_device_name(device),
        "activation_bytes": counter.result.total_bytes,
        "param_bytes": prepared.param_bytes(),
        "grad_bytes": prepared.grad_bytes(),
        "optimizer_bytes": prepared.optimizer_bytes(),
        "step_seconds": seconds,
        "refresh_step_seconds": refresh_seconds,
        # refreshes beyond the forced one's (one per projected weight), made by the timed steps
        "timed_refreshes": None
        if timed_refreshes is None
        else timed_refreshes - len(prepared.optimizer.ranks()),
        "step_seconds_source": f"measured (CUDA events, median of {len(times)} after "
        f"{request['warmup'] + 1} warm-up)",
        "tokens_per_second": spec.batch_size * spec.seq_len / seconds,
        "wrapped_layers": len(prepared.wrapped),
        "trainable_params": prepared.trainable_params(),
        **prepared.quantized(),
        **prepared.optimizer_details(),
        **host,  # pinned host memory of activation offload (the peaks above are the GPU's)
    }
    if request.get("breakdown"):
        row["activation_breakdown"] = dict(
            sorted(counter.result.by_pattern().items(), key=lambda kv: -kv[1])
        )
    if request.get("memory_snapshot"):  # after the peaks were read: one more, recorded step
        from velora_cli.measure.snapshot import record_snapshot

        row.update(record_snapshot(prepared, request["memory_snapshot"]))
    return row


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        row = _worker(request)
    except Exception as exc:  # noqa: BLE001 - any failure is this row's, not the profile's
        row = failed_row("cuda", exc)
    print(_MARK + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
