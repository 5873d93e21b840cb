"""One rank of a real job: ``python -m velora_cli.parallel.worker``, started by `launch` with
torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), the request as JSON on stdin. Prints one row per requested step on stdout,
each on a line of its own after `MARK`.

The request: ``specs`` (StepSpec JSON, measured one after another in this process group),
``device`` (``cpu``: gloo, the tracker, wall clock; ``cuda``: NCCL, one GPU per rank, the CUDA
allocator's peaks, CUDA events), ``warmup``, ``steps``, ``breakdown``, ``threads``,
``collective_timeout`` (seconds a collective may wait for another rank), and optionally
``check`` (a path: after one step, rank 0 saves the full gradients and updated parameters there;
`check.py` compares them with one process on the global batch).

Each rank trains on its own batch (seeded by `batch_seed`); the model is initialized alike on
every rank (seeded build), as FSDP2 requires and DDP's broadcast would ensure anyway.

``VELORA_TEST_FAULT=RANK:KIND`` (tests only) makes that rank fail after joining the group:
``exit`` (exits with code 3), ``hang`` (sleeps forever), ``oom`` (raises MemoryError).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

MARK = "VELORA_RANK_ROW "


def batch_seed(spec, rank: int) -> int:
    """Seed of rank ``rank``'s batch: distinct per rank and per micro-batch (make_batch adds
    the micro-batch index)."""
    return spec.seed + 1_000_003 * rank


def _fault(rank: int) -> None:
    fault = os.environ.get("VELORA_TEST_FAULT")
    if not fault:
        return
    target, kind = fault.split(":")
    if int(target) != rank:
        return
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        while True:
            time.sleep(60)
    if kind == "oom":
        raise MemoryError("out of memory (injected by VELORA_TEST_FAULT)")


def _prepare(spec, rank: int, device):
    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.measure.train_step import make_batch, prepare
    from velora_cli.parallel.shard import shard_prepared

    # cpu: the estimate's attention (the CPU flash kernel, what the estimate runs too); cuda: sdpa
    attention = register_estimate_attention() if device.type == "cpu" else "sdpa"
    prepared = prepare(spec, device.type, attn_implementation=attention)  # cuda: set_device's
    own = dataclasses.replace(spec, seed=batch_seed(spec, rank))
    prepared.micro_batches = make_batch(own, prepared.vocab_size, device)
    shard_prepared(prepared, device=device)
    return prepared


# Tracked steps per cpu row. Once, on a loaded machine, one real rank's tracked peak came out
# 524,800 B above the estimate's (the size of the test model's root-unit flat all-gather buffer),
# and not again in a repeat: our reading is that a collective's buffer can outlive the rank's
# wait for a moment, while gloo's worker thread still holds the finished work, and the tracker
# (which hears of a free when the storage dies) counts it. The smaller of two tracked peaks is
# the row's; both are kept (``tracked_peaks_bytes``).
TRACKED_STEPS = 2


def measure_cpu(prepared, request: dict[str, Any], rank: int) -> dict[str, Any]:
    """Tracked memory (as the estimate counts it) and wall-clock time of one rank's step."""
    from velora_cli.measure.observe import timed_steps
    from velora_cli.parallel.rank_step import rank_roles, tracked_rank_step, warm_up

    roles = rank_roles(prepared)
    warm_up(prepared, request["warmup"], roles.buckets)
    tracked = [
        tracked_rank_step(prepared, roles, breakdown=request["breakdown"])[0]
        for _ in range(TRACKED_STEPS)
    ]
    row = min(tracked, key=lambda r: r["peak_bytes"])
    row["tracked_peaks_bytes"] = [r["peak_bytes"] for r in tracked]
    times = timed_steps(prepared, request["steps"])
    row.update(
        step_seconds=statistics.median(times),
        step_seconds_source=f"measured (cpu wall clock, slowest rank's median of {len(times)})",
    )
    return row


def measure_cuda(prepared, request: dict[str, Any], rank: int) -> dict[str, Any]:
    """The CUDA allocator's peaks and CUDA-event times of one rank's step (no tracker)."""
    import torch

    from velora_cli.measure.cuda import nvml_used_bytes
    from velora_cli.measure.train_step import train_step
    from velora_cli.parallel.rank_step import local_bytes, rank_roles, warm_up

    device = prepared.device
    roles = rank_roles(prepared)
    warm_up(prepared, request["warmup"], roles.buckets)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(request["steps"]):
        prepared.next_batch()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(prepared)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    params = list(prepared.model.parameters())
    return {
        "peak_bytes": torch.cuda.max_memory_allocated(device),
        "reserved_bytes": torch.cuda.max_memory_reserved(device),
        "device_used_bytes": nvml_used_bytes(device.index or 0),
        "param_bytes": local_bytes(params),
        "comm_buffer_bytes": local_bytes(roles.buckets.buffers.values()) if roles.buckets else 0,
        "step_seconds": statistics.median(times),
        "step_seconds_source": f"measured (CUDA events, slowest rank's median of {len(times)})",
        "wrapped_layers": len(prepared.wrapped),
    }


def save_check(prepared, path: str, rank: int) -> None:
    """One step; rank 0 saves {name: (full gradient, full updated parameter)} at ``path``."""
    import torch

    from velora_cli.measure.train_step import train_step

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    grads: dict[str, torch.Tensor] = {}
    model = prepared.model.module if hasattr(prepared.model, "module") else prepared.model
    names = {id(p): n for n, p in model.named_parameters()}

    def before_step(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # full_tensor is a collective: every rank calls it
                    grads[names[id(p)]] = full(p.grad).detach().clone()

    handle = prepared.optimizer.register_step_pre_hook(before_step)
    train_step(prepared)
    handle.remove()
    params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({n: (grads.get(n), params[n]) for n in params}, path)


def run(request: dict[str, Any]) -> list[dict[str, Any]]:
    """This rank's rows for ``request["specs"]`` (the other ranks run the same, in step)."""
    import torch
    import torch.distributed as dist

    from velora_cli.measure import failed_row
    from velora_cli.measure.train_step import StepSpec

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    torch.set_num_threads(request["threads"])
    if request["device"] == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=request["collective_timeout"]))
    rows = []
    try:
        _fault(rank)
        for spec_json in request["specs"]:
            spec = StepSpec.from_json(spec_json)
            try:
                prepared = _prepare(spec, rank, device)
                if request.get("check"):
                    save_check(prepared, request["check"], rank)
                    row: dict[str, Any] = {}
                elif device.type == "cuda":
                    row = measure_cuda(prepared, request, rank)
                else:
                    row = measure_cpu(prepared, request, rank)
                row.update(status="ok", backend=request["device"], rank=rank)
            except (MemoryError, RuntimeError, ValueError) as exc:
                row = {**failed_row(request["device"], exc), "rank": rank}
            rows.append(row)
            print(MARK + json.dumps(row), flush=True)
            if row["status"] != "ok":
                break  # the other ranks wait in this step's collectives: the launcher ends them
            prepared = None
            gc.collect()
    finally:
        dist.destroy_process_group()  # gloo aborts at exit without it
    return rows


def main() -> None:
    request = json.loads(sys.stdin.read())
    try:
        run(request)
    except Exception as exc:  # noqa: BLE001 - the launcher reports this rank's reason
        from velora_cli.measure import failed_row

        row = {**failed_row(request.get("device", "cpu"), exc), "rank": os.environ.get("RANK")}
        print(MARK + json.dumps(row), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
