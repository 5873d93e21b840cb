"""The ``cuda`` backend: real steps on a GPU, each row in a fresh process.

A fresh process per row gives a clean caching allocator (no carry-over between strategies) and
makes an out-of-memory harmless: it becomes a row with status ``oom`` and the profile goes on.
Measurement hygiene (REFERENCE.md §2): warm-up steps (cuBLAS workspace, optimizer state, v),
``empty_cache`` + ``reset_peak_memory_stats``, then timed steps with CUDA events; the peak is
``max_memory_allocated`` over the timed steps, reported with ``max_memory_reserved`` and the
device-level used memory from NVML (includes the CUDA context). Beside each measured row the
parent adds the step time the roofline predicts for the GPU the row ran on (``predicted_*``,
``prediction_error``; measure/step_time.py), computed on meta tensors after the child has exited,
so every GPU run calibrates the prediction without touching the measurement.

The parent runs ``python -m velora_cli.measure.cuda`` with the step spec as JSON on stdin; the
child prints one JSON row on its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    predict: bool = True  # add the roofline's prediction for this GPU beside each ok row
    name: str = "cuda"

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        request = {
            "spec": spec.to_json(),
            "warmup": self.warmup,
            "steps": self.steps,
            "breakdown": breakdown,
        }
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "velora_cli.measure.cuda"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=os.environ.copy(),
            )
        except subprocess.TimeoutExpired:
            return failed_row(self.name, TimeoutError(f"no result within {self.timeout:.0f} s"))
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(_MARK):
                row = json.loads(line[len(_MARK) :])
                if self.predict and row.get("status") == "ok":
                    from velora_cli.measure.step_time import predicted_beside

                    row.update(predicted_beside(spec, row))
                return row
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return failed_row(self.name, RuntimeError(f"worker exited {proc.returncode}: {tail}"))


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


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """Measure one row in this process (the child side)."""
    import statistics

    import torch

    from velora_cli.accounting import SavedTensorCounter
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
        train_step(prepared, forward_context=lambda: counter)  # activation count, untimed
        torch.cuda.synchronize()
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
    except torch.cuda.OutOfMemoryError as exc:
        return failed_row("cuda", exc)
    seconds = statistics.median(times)
    row = {
        "status": "ok",
        "backend": "cuda",
        "peak_bytes": peak,
        "reserved_bytes": reserved,
        "device_used_bytes": used,
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
        "gpu_name": torch.cuda.get_device_name(device),  # the parent predicts for this GPU
        "wrapped_layers": len(prepared.wrapped),
        "trainable_params": prepared.trainable_params(),
        **prepared.quantized(),
        **prepared.optimizer_details(),
    }
    if request.get("breakdown"):
        row["activation_breakdown"] = dict(
            sorted(counter.result.by_pattern().items(), key=lambda kv: -kv[1])
        )
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
