"""A real job of N processes on this machine, and the backends that measure with one.

Each rank is ``python -m velora_cli.parallel.worker`` (`worker`) with the environment torchrun
gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``OMP_NUM_THREADS``), what ``torchrun --standalone
--nproc-per-node N`` would start. We start them ourselves to give every rank its own reason
when it fails:

- a rank that exits without its rows (a crash, ``os._exit``, a signal: the kernel's OOM killer
  sends SIGKILL), or reports a failed row (out of memory, an error), fails the job; the others
  are then blocked in a collective and are killed `GRACE` seconds later;
- a job that is not done after ``timeout`` seconds (a hang) is killed whole;
- every rank is its own session (killed with its children) and dies with this process
  (``PR_SET_PDEATHSIG`` on Linux): no rank outlives the launcher, whatever happens to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli.measure import failed_row
from velora_cli.measure.train_step import SpecError, StepSpec
from velora_cli.parallel.worker import MARK

GRACE = 5.0  # seconds the other ranks get to report after one failed
POLL = 0.05


def free_port() -> int:
    """A TCP port free on the loopback interface now (for the rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the rank's session: it and anything it started
    proc.wait()


def _exit_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the kernel's OOM killer sends this too)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = lines[-1].strip() if lines else "no output"
    return f"exited with code {returncode} without its result: {tail}"


def run_job(
    request: dict[str, Any],
    world_size: int,
    *,
    timeout: float,
    grace: float = GRACE,
    on_start: Callable[[list[int]], None] | None = None,
) -> list[list[dict[str, Any]]]:
    """Run ``world_size`` ranks on ``request`` and collect their rows.

    Args:
        request: the worker request (`worker` docstring); ``specs`` lists the steps.
        world_size: ranks to start.
        timeout: seconds the whole job may take.
        grace: seconds the other ranks get to report after one rank failed.
        on_start: called with the ranks' process ids once all are started (tests kill one).

    Returns:
        ``rows[i][rank]``: rank ``rank``'s row for ``request["specs"][i]``; a rank without one
        gets a failed row (status ``oom`` or ``error``) with its reason.
    """
    n_specs = len(request["specs"])
    threads = request.get("threads") or max(1, (os.cpu_count() or 1) // world_size)
    request = {**request, "threads": threads}
    port = free_port()
    # The ranks import this very velora_cli, wherever the launcher was started from.
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    procs: list[subprocess.Popen] = []
    stopped: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="velora-ranks-") as tmp:
        outs = [Path(tmp, f"rank{r}.out") for r in range(world_size)]
        errs = [Path(tmp, f"rank{r}.err") for r in range(world_size)]
        try:
            for rank in range(world_size):
                env = {
                    **os.environ,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size),
                    "GROUP_RANK": "0",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": str(threads),
                    "PYTHONPATH": pythonpath,
                }
                with outs[rank].open("w") as out, errs[rank].open("w") as err:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "velora_cli.parallel.worker"],
                        stdin=subprocess.PIPE,
                        stdout=out,
                        stderr=err,
                        text=True,
                        env=env,
                        start_new_session=True,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    )
                procs.append(proc)
                proc.stdin.write(json.dumps(request))
                proc.stdin.close()
            if on_start is not None:
                on_start([p.pid for p in procs])
            stopped = _supervise(procs, outs, n_specs, timeout=timeout, grace=grace)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _kill(proc)
        return [
            [
                _rank_row(request, rank, procs[rank], outs[rank], errs[rank], stopped, i)
                for rank in range(world_size)
            ]
            for i in range(n_specs)
        ]


def _rows_in(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line[len(MARK) :]) for line in text.splitlines() if line.startswith(MARK)]


def _supervise(procs, outs, n_specs: int, *, timeout: float, grace: float) -> dict[int, str]:
    """Wait for the ranks; kill them on a failure (after ``grace``) or at ``timeout``.

    Returns:
        rank -> why it was killed, for the ranks this function killed.
    """
    deadline = time.monotonic() + timeout
    first_failure: tuple[int, float] | None = None
    while True:
        now = time.monotonic()
        running = [r for r, p in enumerate(procs) if p.poll() is None]
        if not running:
            return {}
        if first_failure is None:
            for rank, proc in enumerate(procs):
                rows = _rows_in(outs[rank])
                failed_row_seen = any(row.get("status") != "ok" for row in rows)
                exited_short = proc.poll() is not None and len(rows) < n_specs
                if failed_row_seen or exited_short:
                    first_failure = (rank, now)
                    break
        if first_failure is not None and now - first_failure[1] >= grace:
            why = f"stopped {grace:.0f} s after rank {first_failure[0]} failed (see its reason)"
            return _kill_all(procs, running, why)
        if now >= deadline:
            why = f"no result within {timeout:.0f} s (a hang, or a step slower than the timeout)"
            return _kill_all(procs, running, why)
        time.sleep(POLL)


def _kill_all(procs, running: list[int], why: str) -> dict[int, str]:
    for rank in running:
        _kill(procs[rank])
    return dict.fromkeys(running, why)


def _rank_row(request, rank, proc, out: Path, err: Path, stopped, index: int) -> dict[str, Any]:
    rows = _rows_in(out)
    if index < len(rows):
        return {**rows[index], "rank": rank}
    if rank in stopped:
        reason = stopped[rank]
    elif rows and rows[-1].get("status") != "ok":
        reason = "not measured: this rank failed an earlier step"
    else:
        reason = _exit_reason(proc.returncode, err.read_text() if err.exists() else "")
    return {**failed_row(request["device"], RuntimeError(reason)), "rank": rank}


@dataclass
class RanksBackend:
    """Real per-rank measurement: N processes, gloo on the CPU or NCCL on N GPUs.

    Args:
        device: ``cpu`` (tracked memory as the estimate counts it, wall clock) or ``cuda``
            (the CUDA allocator's peaks, CUDA events; one visible GPU per rank).
        warmup: warm-up steps (DDP takes at least 2).
        steps: timed steps (the median; the job's time is the slowest rank's).
        timeout: seconds one job (one row) may take before it is killed.
        collective_timeout: seconds a rank's collective waits for the others.
    """

    device: str = "cpu"
    warmup: int = 1
    steps: int = 2
    timeout: float = 1800.0
    collective_timeout: float = 600.0
    name: str = "cpu"

    def __post_init__(self) -> None:
        self.name = self.device

    def check(self, spec: StepSpec) -> None:
        """Raises SpecError for a step this backend cannot measure (before anything starts)."""
        if self.device == "cpu" and spec.cpu_offload:
            raise SpecError(
                "--cpu-offload on --backend cpu: host and device memory are one here, so "
                "offloading changes nothing measurable; use --backend estimate (the device peak "
                "without the offloaded states) or --backend cuda"
            )
        self.check_devices(spec.world_size)

    def check_devices(self, world_size: int) -> None:
        """Raises SpecError when fewer GPUs than ranks are visible (cuda only)."""
        if self.device != "cuda":
            return
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < world_size:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise SpecError(
                f"--backend cuda --world-size {world_size} needs one GPU per rank, and "
                f"{count} {'is' if count == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES="
                f"{visible if visible is not None else 'unset'}): use --backend estimate, or a "
                "smaller --world-size"
            )

    def request(self, specs: list[StepSpec], *, breakdown: bool = False) -> dict[str, Any]:
        return {
            "specs": [s.to_json() for s in specs],
            "device": self.device,
            "warmup": self.warmup,
            "steps": self.steps,
            "breakdown": breakdown,
            "collective_timeout": self.collective_timeout,
        }

    def measure_many(self, specs: list[StepSpec], *, breakdown: bool = False) -> list[dict]:
        """Rows for several steps of one layout, measured one after another by one job."""
        from velora_cli.parallel.job import job_row

        world = {s.world_size for s in specs}
        if len(world) != 1:
            raise SpecError(f"measure_many takes one world size, got {sorted(world)}")
        (world_size,) = world
        for spec in specs:
            self.check(spec)
        rows = run_job(self.request(specs, breakdown=breakdown), world_size, timeout=self.timeout)
        return [
            job_row(spec, ranks, backend=self.name) for spec, ranks in zip(specs, rows, strict=True)
        ]

    def measure(self, spec: StepSpec, *, breakdown: bool = False) -> dict[str, Any]:
        """One row: a fresh job of ``spec.world_size`` processes."""
        return self.measure_many([spec], breakdown=breakdown)[0]
