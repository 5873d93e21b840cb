"""The allocator replay that every estimate runs (`replay._replay`, malloc and free written into
its loop) against the reference (`replay._replay_reference`, every event through
``CachingAllocator.malloc`` and ``.free``): the same statistics, the same error, and the
allocator left in the same state, on random traces (with the markers the cuda schedule uses,
within capacities that take the OOM retry path or run out) and on real traces of a tiny Llama.
"""

from __future__ import annotations

import random

import pytest

from velora_cli.allocator.caching import AllocatorOutOfMemory, CachingAllocator
from velora_cli.allocator.config import parse_alloc_conf
from velora_cli.allocator.replay import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    REPEAT,
    RESET_PEAK,
    SKIP,
    _replay,
    _replay_reference,
)

M = 1 << 20
CONFS = [
    "",
    "expandable_segments:True",
    "max_split_size_mb:20",
    "max_split_size_mb:40,max_non_split_rounding_mb:24",
    "roundup_power2_divisions:4",
    "large_segment_size_mb:12",
]


def snapshot(allocator: CachingAllocator) -> tuple:
    """Everything an allocator holds that a replay can change: its free and unmapped blocks,
    every block of every segment in address order (with its state), the counters."""
    blocks = set()
    for pool in allocator.pools.values():
        for block in [*pool.free.values(), *pool.unmapped.values()]:
            while block.prev is not None:  # the segment's first block
                block = block.prev
            while block is not None:
                blocks.add((block.addr, block.size, block.small, block.allocated, block.mapped))
                block = block.next
    return (
        allocator.state({}, stride=1),
        sorted(blocks),
        allocator.stats(),
        (allocator.device_allocs, allocator.device_frees, allocator.alloc_retries),
        allocator.skipped_steps,
    )


def outcome(replay, events, config, capacity, grow_down=True) -> tuple:
    allocator = CachingAllocator(config, capacity=capacity, segments_grow_down=grow_down)
    try:
        result = replay(events, allocator)
    except (AllocatorOutOfMemory, ValueError) as error:
        result = (type(error).__name__, str(error))
    return result, snapshot(allocator)


def same(events, config, capacity=None, grow_down=True) -> tuple:
    """The fast replay's outcome, asserted equal to the reference's."""
    fast = outcome(_replay, events, config, capacity, grow_down)
    reference = outcome(_replay_reference, events, config, capacity, grow_down)
    assert fast == reference, f"{config.describe()} capacity {capacity}: {fast} != {reference}"
    return fast


def random_size(rng: random.Random) -> int:
    """Bytes from each pool's range, and whole multiples of 2 MiB (sizes that meet the limits
    of ``max_split_size`` and ``max_non_split_rounding`` exactly)."""
    if rng.random() < 0.125:
        return rng.randint(1, 45) * 2 * M
    return rng.choice(
        [rng.randint(1, 4096), rng.randint(1, M), rng.randint(M, 12 * M), rng.randint(10 * M, 90 * M)]
    )  # fmt: skip


def random_step(rng: random.Random, length: int) -> list[tuple[str, int, int]]:
    """One step's events, keys from 0 (the caller shifts them); everything the step allocates
    is freed by its end, in a random order."""
    events, live, key = [], [], 0
    for _ in range(length):
        if live and rng.random() < 0.45:
            events.append((FREE, live.pop(rng.randrange(len(live))), 0))
        else:
            events.append((ALLOC, key, random_size(rng) if rng.random() > 0.02 else 0))
            live.append(key)
            key += 1
    rng.shuffle(live)
    return events + [(FREE, k, 0) for k in live]


def scheduled(rng: random.Random, warmup: int = 4, steps: int = 4) -> list[tuple[str, int, int]]:
    """A cuda-backend-like schedule of one random step: loaded storages, warm-up steps after
    SKIP markers, EMPTY_CACHE, RESET_PEAK, timed steps after REPEAT markers (allocator.SKIP,
    REPEAT), each step the same one with its keys a stride on."""
    loaded = rng.randint(1, 12)
    step = random_step(rng, rng.randint(20, 160))
    stride = 10_000
    events = [(ALLOC, k, random_size(rng)) for k in range(loaded)]
    for number in range(1, warmup + steps + 1):
        if number > warmup:
            events.append((REPEAT, stride, 0))
        else:
            events.append((SKIP, stride, int(number > 1)))
        events += [(kind, number * stride + key, nbytes) for kind, key, nbytes in step]
        if number == warmup:
            events += [(EMPTY_CACHE, 0, 0), (RESET_PEAK, 0, 0)]
    return events


def unmarked(rng: random.Random, length: int = 1500) -> list[tuple[str, int, int]]:
    """Random allocations and frees, with empty_cache and peak resets among them."""
    events, live = [], []
    for key in range(length):
        roll = rng.random()
        if roll < 0.01:
            events.append((EMPTY_CACHE, 0, 0))
        elif roll < 0.015:
            events.append((RESET_PEAK, 0, 0))
        elif live and roll < 0.45:
            events.append((FREE, live.pop(rng.randrange(len(live))), 0))
        else:
            events.append((ALLOC, key, random_size(rng)))
            live.append(key)
    return events


@pytest.mark.parametrize("conf", CONFS)
def test_the_inlined_replay_equals_the_reference_on_random_traces(conf):
    config = parse_alloc_conf(conf)
    rng = random.Random(conf)
    retried = ran_out = skipped = 0
    for case in range(12):
        events = scheduled(rng) if case % 2 else unmarked(rng)
        grow_down = case % 3 != 2
        stats, state = same(events, config, grow_down=grow_down)
        skipped += state[-1]
        # within capacities from the unlimited peak down to below what is allocated at once:
        # the OOM retry path (release_available_cached_blocks, release_cached_blocks) and the
        # out-of-memory error
        for share in (1.0, 0.9, 0.75, 0.5):
            capacity = int(stats.peak_reserved_bytes * share)
            result, state = same(events, config, capacity, grow_down=grow_down)
            ran_out += isinstance(result, tuple)
            retried += not isinstance(result, tuple) and result.alloc_retries > 0
            skipped += state[-1]
    # the cases met every path they are meant to test
    assert retried and ran_out and skipped


def test_bad_events_fail_alike_and_leave_the_allocator_alike():
    config = parse_alloc_conf("")
    base = [(ALLOC, 1, 3 * M), (ALLOC, 2, 30 * M), (FREE, 1, 0)]
    for bad in ([(ALLOC, 2, 5)], [(FREE, 9, 0)], [("defrag", 0, 0)]):
        result, _ = same(base + bad, config)
        assert result[0] == "ValueError"


def traced_tiny_llama(settings: dict, strategy: dict):
    """A tiny Llama's step on meta, warmed up: (spec, model, trace of one tracked step)."""
    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.emulation.step import cuda_emulation
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step

    spec = StepSpec("llama-tiny", **{"batch_size": 2, "seq_len": 64, **settings},
                    strategy=Strategy(**strategy))  # fmt: skip
    prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
    with cuda_emulation(spec.amp):
        train_step(prepared)
    _row, trace = EstimateBackend(trace_fields=False).observe(prepared, breakdown=False)
    return spec, prepared.model, trace


REAL = [
    ({}, {}),
    ({"mode": "lora", "dtype": "bf16", "batch_size": 4, "seq_len": 1024}, {}),  # kernel scratch
    ({"optimizer": "galore", "rank": 8, "zero_grad_set_to_none": False}, {"gc": 2}),
    ({"mode": "qlora", "batch_size": 4, "grad_accum_steps": 2}, {"gc": True}),  # load transients
]


def test_the_inlined_replay_equals_the_reference_on_the_schedules_of_real_traces():
    """The cuda schedule of a tiny Llama's traced step (loading, warm-up steps with SKIP, the
    timed steps with REPEAT, kernel scratch, the quantized load's transients), as
    `device_memory_fields` replays it: unlimited, and within capacities from its unlimited peak
    to below what it allocates at once (the OOM retry path, and the out-of-memory error after
    which `replay_within` replays it again unlimited), with the default settings, expandable
    segments and an oversize limit."""
    from velora_cli.allocator.device_memory import LoadPlan, Schedule, scratch_for_step
    from velora_cli.methods.quant import load_transients

    outcomes = []
    for settings, strategy in REAL:
        spec, model, trace = traced_tiny_llama(settings, strategy)
        load = LoadPlan(*load_transients(model)) if spec.mode == "qlora" else None
        schedule = Schedule(trace, workspace=32 * M, scratch=scratch_for_step(spec, model),
                            warmup=3, steps=5, load=load)  # fmt: skip
        events = list(schedule)
        for conf in ("", "expandable_segments:True", "max_split_size_mb:20"):
            config = parse_alloc_conf(conf)
            stats, _ = same(events, config)
            # from the unlimited peak down to below the most allocated at once, in 8 steps
            low, high = stats.peak_allocated_bytes - M, stats.peak_reserved_bytes
            for capacity in range(high, low - 1, min(-1, (low - high) // 7)):
                outcomes.append(same(events, config, capacity))
    # among them a replay that passed over a warm-up step, one that retried, one that ran out
    assert any(not isinstance(r, tuple) and state[-1] for r, state in outcomes)
    assert any(not isinstance(r, tuple) and r.alloc_retries for r, _ in outcomes)
    assert any(isinstance(r, tuple) for r, _ in outcomes)
