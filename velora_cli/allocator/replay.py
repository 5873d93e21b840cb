"""Allocation traces replayed through the caching allocator model: what a step reserves.

`simulate(events, config)` replays a sequence of allocations, frees and markers through a fresh
`caching.CachingAllocator` and returns what ``torch.cuda.max_memory_allocated()`` and
``max_memory_reserved()`` would read. `_replay` is the loop every estimate runs, with the
allocator's ``malloc`` and ``free`` written into it; `_replay_reference` sends every event
through the allocator's methods, the slow path it is tested equal to
(tests/test_allocator_replay.py).

Example:
    >>> stats = simulate([(ALLOC, 1, 3 * MiB), (ALLOC, 2, 4 * MiB), (FREE, 1, 0)])
    >>> stats.peak_reserved_bytes // MiB, stats.peak_allocated_bytes // MiB  # one 20 MiB segment
    (20, 7)
"""

from __future__ import annotations

import gc
from bisect import bisect_left, insort
from collections.abc import Iterable

from velora_cli.allocator.blocks import ADDRESS_BITS, ADDRESS_MASK, Block, round_size
from velora_cli.allocator.caching import AllocatorStats, CachingAllocator
from velora_cli.allocator.config import MIN_BLOCK_SIZE, SMALL_SIZE, AllocatorConfig, MiB

__all__ = [
    "ALLOC", "EMPTY_CACHE", "FREE", "REPEAT", "RESET_PEAK", "SKIP", "Event", "MiB", "simulate",
]  # fmt: skip

# Event kinds: (ALLOC, key, nbytes), (FREE, key, 0), (EMPTY_CACHE, 0, 0), (RESET_PEAK, 0, 0),
# (REPEAT, stride, 0): what follows, up to the next REPEAT or the end, repeats what followed the
# previous REPEAT with every key k ≥ 0 replaced by k + stride (see `simulate`);
# (SKIP, stride, again): with ``again`` 1, what follows, up to the next marker, repeats what
# followed the previous SKIP with every key k ≥ stride replaced by k + stride (keys below stride
# are the same in both, but for keys allocated and freed within the step, whose names do not
# matter), and may be skipped (see `simulate`); with ``again`` 0, a step that starts such a run
# (nothing is skipped).
ALLOC, FREE, EMPTY_CACHE, RESET_PEAK, REPEAT, SKIP = (
    "alloc", "free", "empty_cache", "reset_peak", "repeat", "skip"
)  # fmt: skip
Event = tuple[str, int, int]

_MISSING = object()


def simulate(
    events: Iterable[Event],
    config: AllocatorConfig | None = None,
    *,
    capacity: int | None = None,
) -> AllocatorStats:
    """Replay ``events`` through a fresh `CachingAllocator` and return its statistics.

    Args:
        events: ``(ALLOC, key, nbytes)`` allocates (``nbytes`` 0 allocates nothing, as in
            PyTorch), ``(FREE, key, 0)`` frees what ``key`` allocated, ``(EMPTY_CACHE, 0, 0)``
            is ``torch.cuda.empty_cache()``, ``(RESET_PEAK, 0, 0)`` is
            ``torch.cuda.reset_peak_memory_stats()``.
            ``(REPEAT, stride, 0)`` marks the start of a step that repeats the previous one
            with its keys shifted by ``stride`` (the cuda backend's timed steps). The allocator
            is deterministic, so when its state at one REPEAT equals its state at the previous one
            (the same blocks at the same addresses, free or holding the same storages once keys
            are taken modulo ``stride``; the same counters), every step after it replays the one
            before exactly, and the replay stops there: the statistics (maxima since RESET_PEAK,
            and the current figures at a step's end) are those the remaining steps would give.
        config: allocator settings (default: PyTorch's).
        capacity: reservable bytes; None: unlimited.

    Returns:
        The statistics at the end (peaks since the last RESET_PEAK).

    Raises:
        ValueError: a key allocated twice while live, or freed without being allocated.
        AllocatorOutOfMemory: an allocation that does not fit ``capacity``.
    """
    # no cyclic garbage collection during the replay: it links and drops ~10^5 blocks per
    # step (prev/next cycles), and each collection would also walk the caller's heap (a CLI
    # run holds meta models and caches: a fifth of the replay's time in the 7B profile went to
    # collections); what it drops is collected after
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _replay(events, CachingAllocator(config, capacity=capacity))
    finally:
        if collecting:
            gc.enable()


def _replay(events: Iterable[Event], allocator: CachingAllocator) -> AllocatorStats:
    """Replay ``events`` through ``allocator`` (see `simulate`) and return its statistics.

    `_replay_reference` with ``malloc`` and ``free`` written into the loop: a 7B tune replays
    millions of events, and a method call, its attribute look-ups and the statistics kept on
    the allocator cost more than the best fit itself. The common paths are inlined (the cached
    block ``get_free_block`` finds, with its expandable and oversize rules; its split; a free and
    its merges; the peak statistics, kept in local variables and written back to the allocator
    around everything else); a new segment, the OOM retry path and the markers go through the
    allocator's methods as in the reference. tests/test_allocator_replay.py holds the two equal
    (statistics, error, and the allocator's blocks and counters after) on random and real
    traces.
    """
    small_pool, large_pool = allocator._small_pool, allocator._large_pool
    small_keys, small_free = small_pool.keys, small_pool.free
    large_keys, large_free = large_pool.keys, large_pool.free
    rounded, config = allocator._rounded, allocator.config
    plain = allocator._plain_best_fit
    expandable, split_limit = allocator._expandable, allocator._split_limit
    new_block, non_split_rounding = allocator._new_block, config.non_split_rounding
    alloc_kind, free_kind = ALLOC, FREE
    shift, mask = ADDRESS_BITS, ADDRESS_MASK
    new_object = object.__new__
    live: dict[int, Block | None] = {}
    last_state = None
    skip_state = None  # the state at the last SKIP marker, while its run goes on
    skip_retries = 0  # the retry path's count at that marker
    skipping = False  # a repeated step's events are being passed over
    # the statistics malloc and free keep, as locals: the allocator's copies are brought up to
    # date before any of its methods runs, and read back after (reserved changes only there)
    allocated, reserved = allocator.allocated, allocator.reserved
    peak_allocated, peak_reserved = allocator.peak_allocated, allocator.peak_reserved
    at_peak = allocator.allocated_at_peak
    try:
        for kind, key, nbytes in events:
            if skipping:
                if kind in (alloc_kind, free_kind):
                    continue
                skipping = False
            if kind == alloc_kind:
                if key in live:
                    raise ValueError(f"key {key} allocated twice")
                if nbytes <= 0:
                    live[key] = None
                    continue
                # malloc
                size = rounded.get(nbytes)
                if size is None:
                    size = rounded[nbytes] = round_size(nbytes, config)
                if size <= SMALL_SIZE:
                    pool, keys, free = small_pool, small_keys, small_free
                else:
                    pool, keys, free = large_pool, large_keys, large_free
                i = bisect_left(keys, size << shift)
                if plain:
                    block = free.pop(keys.pop(i) & mask) if i < len(keys) else None
                elif i == len(keys):
                    block = None
                else:  # get_free_block with its expandable and oversize rules
                    block = free[keys[i] & mask]
                    if expandable and block.segment.expandable:
                        # a block that can grow into unmapped pages ranks by the size it can
                        # grow to (_expandable_size)
                        after = block.next
                        grown = block.size
                        if after is not None and not after.mapped:
                            grown += after.size
                        last = len(keys) - 1
                        while i < last:
                            nxt = free[keys[i + 1] & mask]
                            after = nxt.next
                            grown_next = nxt.size
                            if after is not None and not after.mapped:
                                grown_next += after.size
                            if not (block.segment.expandable and grown_next < grown):
                                break
                            i, block, grown = i + 1, nxt, grown_next
                    if split_limit is not None and (
                        size < split_limit <= block.size
                        or (size >= split_limit and block.size >= size + non_split_rounding)
                    ):
                        block = None  # no oversize block for a smaller request, nor too large
                    else:
                        del keys[i]
                        del free[block.addr]
                if block is None:  # a new segment (the statistics it reads, then what it changed)
                    allocator.allocated, allocator.peak_allocated = allocated, peak_allocated
                    allocator.peak_reserved, allocator.allocated_at_peak = peak_reserved, at_peak
                    block = new_block(pool, size)
                    reserved = allocator.reserved
                remaining = block.size - size
                if block.small or expandable:
                    split = remaining >= MIN_BLOCK_SIZE
                else:
                    split = (split_limit is None or size < split_limit) and remaining > SMALL_SIZE
                if split:  # _split: the block's first size bytes are handed out, the rest is free
                    # (Block's attributes set here: cheaper than its __init__, same block)
                    rest, block = block, new_object(Block)
                    block.addr, block.size = rest.addr, size
                    block.small, block.segment = rest.small, rest.segment
                    block.allocated, block.mapped = False, True
                    prev = block.prev = rest.prev
                    if prev is not None:
                        prev.next = block
                    block.next, rest.prev = rest, block
                    rest.addr += size
                    rest.size = remaining
                    if rest.mapped:
                        insort(keys, remaining << shift | rest.addr)
                        free[rest.addr] = rest
                    else:
                        pool.add(rest)
                block.allocated = True
                live[key] = block
                allocated += block.size
                if allocated > peak_allocated:
                    peak_allocated = allocated
                if reserved > peak_reserved:
                    peak_reserved, at_peak = reserved, allocated
                elif reserved == peak_reserved and allocated > at_peak:
                    at_peak = allocated
            elif kind == free_kind:
                block = live.pop(key, _MISSING)
                if block is _MISSING:
                    raise ValueError(f"key {key} freed but not allocated")
                if block is None:
                    continue
                # free: back to its pool, merged with free (mapped) neighbours
                if not block.allocated:
                    raise ValueError("double free of a simulated block")
                block.allocated = False
                allocated -= block.size
                if block.small:
                    keys, free = small_keys, small_free
                else:
                    keys, free = large_keys, large_free
                prev = block.prev
                if prev is not None and not prev.allocated and prev.mapped:
                    del keys[bisect_left(keys, prev.size << shift | prev.addr)]
                    del free[prev.addr]
                    block.addr = prev.addr
                    before = block.prev = prev.prev
                    if before is not None:
                        before.next = block
                    block.size += prev.size
                nxt = block.next
                if nxt is not None and not nxt.allocated and nxt.mapped:
                    del keys[bisect_left(keys, nxt.size << shift | nxt.addr)]
                    del free[nxt.addr]
                    after = block.next = nxt.next
                    if after is not None:
                        after.prev = block
                    block.size += nxt.size
                insort(keys, block.size << shift | block.addr)
                free[block.addr] = block
            else:
                allocator.allocated, allocator.peak_allocated = allocated, peak_allocated
                allocator.peak_reserved, allocator.allocated_at_peak = peak_reserved, at_peak
                if kind == SKIP:
                    state = allocator.state(live, stride=key)
                    # the previous step left the state as it found it without the retry path
                    # freeing cache (which only a capacity can take): this one would do the same
                    if nbytes and state == skip_state and allocator.alloc_retries == skip_retries:
                        skipping = True
                        allocator.skipped_steps += 1
                        live = {k + key if k >= key else k: b for k, b in live.items()}
                    skip_state, skip_retries = state, allocator.alloc_retries
                elif kind == REPEAT:
                    skip_state = None
                    state = allocator.state(live, stride=key)
                    if state == last_state:
                        break  # steady: every later step replays the previous one
                    last_state = state
                elif kind == EMPTY_CACHE:
                    skip_state = None
                    allocator.empty_cache()
                elif kind == RESET_PEAK:
                    skip_state = None
                    allocator.reset_peak()
                else:
                    raise ValueError(f"unknown event kind {kind!r}")
                reserved, allocated = allocator.reserved, allocator.allocated
                peak_allocated, peak_reserved = allocator.peak_allocated, allocator.peak_reserved
                at_peak = allocator.allocated_at_peak
    finally:  # also when the events are bad or the device runs out, as the reference leaves it
        allocator.allocated, allocator.peak_allocated = allocated, peak_allocated
        allocator.peak_reserved, allocator.allocated_at_peak = peak_reserved, at_peak
    return allocator.stats()


def _replay_reference(events: Iterable[Event], allocator: CachingAllocator) -> AllocatorStats:
    """`_replay` event by event through the allocator's own methods (``malloc``, ``free``): the
    reference the inlined replay is tested equal to (tests/test_allocator_replay.py)."""
    malloc, free = allocator.malloc, allocator.free
    live: dict[int, Block | None] = {}
    last_state = None
    skip_state = None  # the state at the last SKIP marker, while its run goes on
    skip_retries = 0  # the retry path's count at that marker
    skipping = False  # a repeated step's events are being passed over
    for kind, key, nbytes in events:
        if skipping:
            if kind in (ALLOC, FREE):
                continue
            skipping = False
        if kind == ALLOC:
            if key in live:
                raise ValueError(f"key {key} allocated twice")
            live[key] = malloc(nbytes) if nbytes > 0 else None
        elif kind == FREE:
            block = live.pop(key, _MISSING)
            if block is _MISSING:
                raise ValueError(f"key {key} freed but not allocated")
            if block is not None:
                free(block)
        elif kind == SKIP:
            state = allocator.state(live, stride=key)
            # the previous step left the state as it found it without the retry path freeing
            # cache (which only a capacity can take): this one would do the same
            if nbytes and state == skip_state and allocator.alloc_retries == skip_retries:
                skipping = True
                allocator.skipped_steps += 1
                live = {k + key if k >= key else k: block for k, block in live.items()}
            skip_state, skip_retries = state, allocator.alloc_retries
        elif kind == REPEAT:
            skip_state = None
            state = allocator.state(live, stride=key)
            if state == last_state:
                break  # steady: every later step replays the previous one
            last_state = state
        elif kind == EMPTY_CACHE:
            skip_state = None
            allocator.empty_cache()
        elif kind == RESET_PEAK:
            skip_state = None
            allocator.reset_peak()
        else:
            raise ValueError(f"unknown event kind {kind!r}")
    return allocator.stats()
