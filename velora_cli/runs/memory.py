"""The real peak memory of a training run, interval by interval (`velora_cli.VeloraCallback`).

Two readers with one interface (``reset()`` at an interval's start, ``sample()`` after each
step, ``read()`` at its end, ``close()``), chosen by the device the model trains on:

* `CudaPeaks`: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` since the reset
  (``reset_peak_memory_stats``), and NVML's device-level used memory (every process on the
  device, CUDA context included), sampled after each step: reserved segments are not handed
  back without ``empty_cache()``, so the device-level figure after a step holds the step's peak.
* `ProcessPeaks`: the process's peak resident set (Linux ``VmHWM``, reset per interval by writing
  5 to ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, the peak since the process started,
  said so). It counts the whole process (Python, libraries, data) besides tensors, so it is not
  the allocator peak a plan predicts; `velora_cli.runs.callback` can add the tensor peak of one step
  per interval from velora's storage tracker (what the cpu backend measures).

Every figure is bytes; ``LABELS`` says what each one is, for the run record and the log line.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path
from typing import Any

LABELS = {
    "allocated_bytes": "torch.cuda.max_memory_allocated over the interval",
    "reserved_bytes": "torch.cuda.max_memory_reserved over the interval",
    "device_used_bytes": "NVML device used memory, highest after a step (all processes, "
    "CUDA context included)",
    "rss_peak_bytes": "peak resident set of the whole process over the interval (Linux VmHWM)",
    "rss_peak_since_start_bytes": "peak resident set of the whole process since it started "
    "(ru_maxrss: no per-interval reset on this system)",
    "tensor_peak_bytes": "peak of live tensor storages in one tracked step of the interval "
    "(velora's storage tracker, 512-byte rounding: the cpu backend's measure)",
}


class CudaPeaks:
    """Allocator and device-level peaks of one CUDA device, per interval."""

    kind = "cuda"

    def __init__(self, device) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.index = (
            self.device.index if self.device.index is not None else torch.cuda.current_device()
        )
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index))
        except Exception:  # noqa: BLE001 - NVML missing or failing: no device-level figure
            self._nvml = None
        self._device_used: int | None = None

    def _used(self) -> int | None:
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 - a failing reading is a missing one
            return None

    def reset(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self._device_used = self._used()

    def sample(self) -> None:
        used = self._used()
        if used is not None:
            self._device_used = max(used, self._device_used or 0)

    def read(self) -> dict[str, int | None]:
        self.torch.cuda.synchronize(self.device)
        self.sample()
        return {
            "allocated_bytes": self.torch.cuda.max_memory_allocated(self.device),
            "reserved_bytes": self.torch.cuda.max_memory_reserved(self.device),
            "device_used_bytes": self._device_used,
        }

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # NVMLError subclasses: nothing left to free
                self._nvml[0].nvmlShutdown()
            self._nvml = None


class ProcessPeaks:
    """The process's peak resident set, per interval where the system can reset it."""

    kind = "cpu"
    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.resettable = self._reset_hwm()

    def _reset_hwm(self) -> bool:
        try:
            self.CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS
            return self._hwm() is not None
        except OSError:
            return False

    def _hwm(self) -> int | None:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.resettable:
            self._reset_hwm()

    def sample(self) -> None:
        """Nothing to sample: the kernel keeps the peak."""

    def read(self) -> dict[str, int | None]:
        if self.resettable:
            return {"rss_peak_bytes": self._hwm()}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in kB on Linux and in bytes on macOS
        return {"rss_peak_since_start_bytes": peak if sys.platform == "darwin" else peak * 1024}

    def close(self) -> None:
        pass


def peaks_for(device) -> Any:
    """The reader for the device a model trains on (``cuda:N`` -> `CudaPeaks`, else
    `ProcessPeaks`)."""
    import torch

    device = torch.device(device)
    return CudaPeaks(device) if device.type == "cuda" else ProcessPeaks()
