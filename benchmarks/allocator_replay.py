"""Speed of the allocator replay behind every estimate's device-memory fields, in one process:
the inlined replay (`replay._replay`, what `simulate` runs) against the reference that sends
every event through ``CachingAllocator.malloc`` and ``.free`` (`replay._replay_reference`).

    python benchmarks/allocator_replay.py                       # llama-60m and Llama-2-7b rows
    python benchmarks/allocator_replay.py --models llama-60m --repeats 5
    python benchmarks/allocator_replay.py --save traces.pkl     # keep the traces ...
    python benchmarks/allocator_replay.py --traces traces.pkl   # ... and time them again

The traces are those the estimate backend replays: each row is estimated once
(``EstimateBackend.measure``) and every trace ``device_memory_fields`` is given is kept with its
arguments (GPU, scratch, schedule, load plan). Each is then replayed as
``device_memory_fields`` does: within the GPU's capacity (again without one when it does not fit,
`replay_within`), with the default settings and with expandable segments; both replays must give
the same statistics. Printed: CPU seconds (``time.process_time``, less sensitive than wall time to
a busy machine) and wall seconds, the best of ``--repeats`` for each way, their ratio, and the load
average. Timings on a shared machine are noise: quote the ratio measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (model, mode, micro-batch, sequence length): rows of the headline commands' kinds
ROWS = {
    "llama-60m": [("llama-60m", "full", 8, 256), ("llama-60m", "lora", 8, 256)],
    "meta-llama/Llama-2-7b": [
        ("meta-llama/Llama-2-7b", "qlora", 1, 2048),
        ("meta-llama/Llama-2-7b", "lora", 1, 2048),
        ("meta-llama/Llama-2-7b", "qlora", 4, 2048),
    ],
}


def capture(models: list[str]) -> list[tuple]:
    """(trace, device_memory_fields' keyword arguments) of each row's estimate."""
    import velora_cli.allocator.device_memory as device_memory
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec

    captured = []
    original = device_memory.device_memory_fields

    def keep(trace, **kwargs):
        captured.append((trace, kwargs))
        return original(trace, **kwargs)

    device_memory.device_memory_fields = keep
    try:
        backend = EstimateBackend()
        for model in models:
            for name, mode, batch, seq in ROWS.get(model, [(model, "full", 1, 512)]):
                spec = StepSpec(model=name, mode=mode, batch_size=batch, seq_len=seq,
                                dtype="bf16")  # fmt: skip
                row = backend.measure(spec)
                print(f"  traced {name} {mode} {batch}x{seq}: {row['status']}", flush=True)
    finally:
        device_memory.device_memory_fields = original
    return captured


def replays(captured: list[tuple]) -> list[tuple]:
    """(events, settings, capacity) of each replay device_memory_fields would run."""
    from velora_cli.allocator.config import AllocatorConfig
    from velora_cli.allocator.device_memory import Schedule, cublas_workspace_bytes, device_capacity
    from velora_cli.gpus import get_gpu

    out = []
    for trace, kw in captured:
        gpu = get_gpu(kw["gpu"]) if isinstance(kw["gpu"], str) else kw["gpu"]
        schedule = Schedule(
            trace,
            workspace=cublas_workspace_bytes(gpu, kw.get("environ")),
            scratch=kw.get("scratch"),
            warmup=kw.get("warmup", 2),
            steps=kw.get("steps", 5),
            empty_cache=kw.get("empty_cache", True),
            load=kw.get("load"),
            reset_peak=kw.get("reset_peak", True),
        )
        events = list(schedule)
        capacity = device_capacity(gpu, kw.get("cuda_version"))[0]
        config = kw.get("config") or AllocatorConfig()
        out.append((events, config, capacity))
        if kw.get("expandable", True):
            out.append((events, config.with_expandable_segments(True), capacity))
    return out


def timed(replay, cases) -> tuple[float, float, list]:
    from velora_cli.allocator.caching import AllocatorOutOfMemory, CachingAllocator

    results = []
    collecting = gc.isenabled()
    gc.disable()  # as simulate does
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        for events, config, capacity in cases:
            try:
                results.append(replay(events, CachingAllocator(config, capacity=capacity)))
            except AllocatorOutOfMemory:  # replay_within: again without the capacity
                results.append(replay(events, CachingAllocator(config)))
    finally:
        if collecting:
            gc.enable()
    return time.process_time() - cpu, time.perf_counter() - wall, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-60m,meta-llama/Llama-2-7b")
    parser.add_argument("--traces", type=Path, help="replay traces saved by --save")
    parser.add_argument("--save", type=Path, help="keep the captured traces here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from velora_cli.allocator.replay import _replay, _replay_reference

    if args.traces:
        captured = pickle.loads(args.traces.read_bytes())
    else:
        captured = capture(args.models.split(","))
    if args.save:
        args.save.write_bytes(pickle.dumps(captured))
    cases = replays(captured)
    events = sum(len(e) for e, _, _ in cases)
    print(f"{len(captured)} traces, {len(cases)} replays over {events} events in all")
    best: dict[str, tuple[float, float]] = {}
    outcome: dict[str, list] = {}
    for _ in range(args.repeats):  # interleaved, so that both ways see the same load
        for name, replay in (("reference", _replay_reference), ("inlined", _replay)):
            cpu, wall, results = timed(replay, cases)
            outcome.setdefault(name, results)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], cpu), min(old[1], wall))
    if outcome["reference"] != outcome["inlined"]:
        sys.exit("the inlined replay's statistics differ from the reference's")
    (ref_cpu, ref_wall), (new_cpu, new_wall) = best["reference"], best["inlined"]
    print(f"reference {ref_cpu:.2f} s CPU ({ref_wall:.2f} s wall); inlined {new_cpu:.2f} s CPU "
          f"({new_wall:.2f} s wall): {new_cpu / ref_cpu:.2f}x CPU, {new_wall / ref_wall:.2f}x wall "
          f"(best of {args.repeats}); statistics equal; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))  # fmt: skip


if __name__ == "__main__":
    main()
