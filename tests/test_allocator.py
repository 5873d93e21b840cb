"""The caching-allocator model on hand-worked traces: each expected figure is derived in the
comments from the rules of c10/cuda/CUDACachingAllocator.cpp (see velora_cli/allocator/caching.py).

Sizes are in MiB unless said otherwise; "segment" is one cudaMalloc (or, with expandable
segments, one growing virtual range mapped in pages).
"""

from __future__ import annotations

import random

import pytest

from velora_cli.allocator.caching import AllocatorOutOfMemory, CachingAllocator, round_size
from velora_cli.allocator.config import AllocConfError, parse_alloc_conf
from velora_cli.allocator.replay import ALLOC, EMPTY_CACHE, FREE, RESET_PEAK, simulate

M = 1 << 20
EXPANDABLE = parse_alloc_conf("expandable_segments:True")


def alloc(key, nbytes):
    return (ALLOC, key, nbytes)


def free(key):
    return (FREE, key, 0)


def test_a_medium_request_splits_a_20_mib_segment_and_small_remainders_are_not_kept():
    # 3 MiB is between 1 and 10 MiB: get_allocation_size gives a 20 MiB segment; should_split:
    # 17 MiB remain (> 1 MiB), so the 17 MiB remainder is kept as a free block.
    # 4 MiB: best fit is that 17 MiB block; split again, 13 MiB remain. Reserved stays 20.
    # 12 MiB: the 13 MiB block fits; only 1 MiB would remain, not > kSmallSize, so the block is
    # handed out whole and allocated counts 13 MiB: 3 + 4 + 13 = 20 MiB allocated.
    s = simulate([alloc(1, 3 * M), alloc(2, 4 * M)])
    assert (s.peak_reserved_bytes, s.peak_allocated_bytes, s.segments) == (20 * M, 7 * M, 1)
    s = simulate([alloc(1, 3 * M), alloc(2, 4 * M), alloc(3, 12 * M)])
    assert (s.peak_reserved_bytes, s.allocated_bytes, s.segments) == (20 * M, 20 * M, 1)
    assert s.fragmentation_bytes == 0


def test_a_freed_block_is_reused_whole_when_the_remainder_is_too_small_to_keep():
    # 12 MiB (>= 10 MiB): its own segment, rounded up to 2 MiB: 12 MiB. Freed, it is cached.
    # 11 MiB: best fit is the cached 12 MiB block, 1 MiB would remain: not split, so allocated
    # reads 12 MiB, and no new segment is made (reserved 12 MiB, one cudaMalloc).
    s = simulate([alloc(1, 12 * M), free(1), alloc(2, 11 * M)])
    assert (s.peak_reserved_bytes, s.allocated_bytes, s.device_allocs) == (12 * M, 12 * M, 1)
    # 10 MiB + 1 byte rounds to 10 MiB + 512 B in a 12 MiB segment; 2 MiB - 512 B remain
    # (> 1 MiB): split, and that remainder serves a later 1.5 MiB request (large pool) without a
    # new segment. Only 0.5 MiB - 512 B would remain then: not split, the 1.5 MiB request gets
    # the whole 2 MiB - 512 B and allocated reads the full 12 MiB.
    s = simulate([alloc(1, 10 * M + 1), alloc(2, 3 * M // 2)])
    assert (s.peak_reserved_bytes, s.segments) == (12 * M, 1)
    assert s.allocated_bytes == 12 * M


def test_a_large_request_cannot_use_free_space_scattered_in_a_fragmented_segment():
    # Four 5 MiB requests: the first makes a 20 MiB segment, each next one splits the remainder
    # (15, 10, 5 MiB remain); the fourth takes the last 5 MiB exactly (nothing left to split).
    # Freeing blocks 1 and 3 leaves 10 MiB free in two separate 5 MiB holes.
    # 8 MiB: no free block is >= 8 MiB, so a second 20 MiB segment: reserved 40 MiB while only
    # 5 + 5 + 8 = 18 MiB are allocated (22 MiB trapped).
    events = [alloc(k, 5 * M) for k in range(4)] + [free(0), free(2), alloc(9, 8 * M)]
    s = simulate(events)
    assert (s.peak_reserved_bytes, s.allocated_bytes, s.segments) == (40 * M, 18 * M, 2)
    assert s.fragmentation_bytes == 22 * M
    # Freeing block 2 merges holes 1-3 into one 15 MiB block; a 14 MiB request now fits there
    # (1 MiB left: not split, allocated counts 15 MiB) and reserved stays 40 MiB.
    s = simulate([*events, free(1), alloc(10, 14 * M)])
    assert (s.peak_reserved_bytes, s.allocated_bytes) == (40 * M, 5 * M + 8 * M + 15 * M)


def test_growing_requests_fragment_fixed_segments_but_not_an_expandable_one():
    # 30, 32, 34 MiB, each freed before the next: fixed segments cannot grow, so the cached 30
    # and 32 MiB blocks are too small for the next request: 30 + 32 + 34 = 96 MiB reserved.
    events = [alloc(1, 30 * M), free(1), alloc(2, 32 * M), free(2), alloc(3, 34 * M)]
    assert simulate(events).peak_reserved_bytes == 96 * M
    # Expandable: the large pool maps 20 MiB pages; 30 MiB maps two (40 MiB) and the freed block
    # covers the whole mapped range, so 32 and 34 MiB reuse it: 40 MiB reserved.
    s = simulate(events, EXPANDABLE)
    assert (s.peak_reserved_bytes, s.segments) == (40 * M, 1)
    # empty_cache unmaps every page with nothing allocated in it: [0, 34) holds the 34 MiB
    # block, so page 2 (20-40 MiB) is still partly used; freeing it too releases the segment.
    s = simulate([*events, (EMPTY_CACHE, 0, 0)], EXPANDABLE)
    assert s.reserved_bytes == 40 * M
    s = simulate([*events, free(3), (EMPTY_CACHE, 0, 0)], EXPANDABLE)
    assert (s.reserved_bytes, s.segments) == (0, 0)


def test_expandable_pages_are_mapped_at_the_lowest_address_that_fits():
    # 12 MiB maps one 20 MiB page: block [0, 12), free tail [12, 20) before unmapped space.
    # A second 12 MiB: no free block is >= 12, so find_expandable_block takes the free tail plus
    # the unmapped range after it and maps one more page: block [12, 24), reserved 40 MiB
    # (fixed segments would take 12 + 12 = 24 MiB here: pages cost rounding).
    events = [alloc(1, 12 * M), alloc(2, 12 * M)]
    assert simulate(events, EXPANDABLE).peak_reserved_bytes == 40 * M
    assert simulate(events).peak_reserved_bytes == 24 * M
    # Freeing block 1 and emptying the cache unmaps only whole free pages: page [0, 20) still
    # holds part of block 2, so nothing is unmapped.
    s = simulate([*events, free(1), (EMPTY_CACHE, 0, 0)], EXPANDABLE)
    assert s.reserved_bytes == 40 * M
    # Three 20 MiB blocks fill pages 0-2; freeing the middle one and emptying the cache unmaps
    # page 1 (reserved 40). The next 20 MiB request maps that hole, the lowest unmapped range
    # that fits, rather than a page after the end: back to 60 MiB, still one segment.
    events = [alloc(k, 20 * M) for k in range(3)] + [free(1), (EMPTY_CACHE, 0, 0)]
    assert simulate(events, EXPANDABLE).reserved_bytes == 40 * M
    allocator = CachingAllocator(EXPANDABLE)
    blocks = [allocator.malloc(20 * M) for _ in range(3)]
    allocator.free(blocks[1])
    allocator.empty_cache()
    again = allocator.malloc(20 * M)
    assert again.addr == blocks[0].addr + 20 * M
    assert (allocator.reserved, allocator.stats().segments) == (60 * M, 1)


def test_small_requests_share_2_mib_segments():
    # 300,000 B rounds up to 300,032 B (586 blocks of 512). A 2 MiB small segment holds six
    # (1,800,192 B; 296,960 B left, too few for a seventh), so seven need two segments.
    s = simulate([alloc(k, 300_000) for k in range(7)])
    assert (s.peak_reserved_bytes, s.peak_allocated_bytes, s.segments) == (4 * M, 7 * 300_032, 2)
    # Exactly 1 MiB is still small: a 2 MiB segment, split (1 MiB >= 512 B remains) and the
    # remainder serves another 1 MiB request. One byte more is a large request: 20 MiB segment.
    assert simulate([alloc(1, M), alloc(2, M)]).peak_reserved_bytes == 2 * M
    assert simulate([alloc(1, M + 1)]).peak_reserved_bytes == 20 * M
    # 100 B still takes a 512 B block.
    assert simulate([alloc(1, 100)]).allocated_bytes == 512


def test_max_split_size_keeps_oversize_blocks_for_oversize_requests():
    conf = parse_alloc_conf("max_split_size_mb:20")
    # 30 MiB >= max_split_size: its own 30 MiB segment, never split. Freed and cached, it may not
    # serve a 12 MiB request (< max_split_size): a new 12 MiB segment, 42 MiB reserved.
    s = simulate([alloc(1, 30 * M), free(1), alloc(2, 12 * M)], conf)
    assert s.peak_reserved_bytes == 42 * M
    assert simulate([alloc(1, 30 * M), free(1), alloc(2, 12 * M)]).peak_reserved_bytes == 30 * M
    # 25 MiB (>= max_split_size) may take it: 30 < 25 + max_non_split_rounding (20 MiB), whole.
    s = simulate([alloc(1, 30 * M), free(1), alloc(2, 25 * M)], conf)
    assert (s.peak_reserved_bytes, s.allocated_bytes) == (30 * M, 30 * M)
    # 50 MiB cached is too far above a 25 MiB request (50 >= 25 + 20): a new 26 MiB segment.
    s = simulate([alloc(1, 50 * M), free(1), alloc(2, 25 * M)], conf)
    assert s.peak_reserved_bytes == 50 * M + 26 * M


def test_empty_cache_and_reset_peak_follow_the_torch_calls():
    # A 12 MiB block freed then emptied: the whole free segment goes back (reserved 0). Peaks
    # restart from the current values at RESET_PEAK.
    s = simulate([alloc(1, 12 * M), free(1), (EMPTY_CACHE, 0, 0), (RESET_PEAK, 0, 0)])
    assert (s.reserved_bytes, s.peak_reserved_bytes, s.peak_allocated_bytes) == (0, 0, 0)
    # A split segment with an allocated block stays.
    s = simulate([alloc(1, 3 * M), alloc(2, 3 * M), free(1), (EMPTY_CACHE, 0, 0)])
    assert s.reserved_bytes == 20 * M


def test_capacity_frees_the_cache_before_it_runs_out():
    # 12 + 12 MiB segments, the first freed (cached). 14 MiB more would reserve 38 > 30 MiB:
    # malloc's retry path releases cached segments (12 MiB) and tries again: 12 + 14 = 26 MiB.
    events = [alloc(1, 12 * M), alloc(2, 12 * M), free(1), alloc(3, 14 * M)]
    s = simulate(events, capacity=30 * M)
    assert (s.reserved_bytes, s.device_frees) == (26 * M, 1)
    with pytest.raises(AllocatorOutOfMemory):
        simulate([*events, alloc(4, 10 * M)], capacity=30 * M)


def test_roundup_power2_divisions_round_requests():
    # 1200 KiB with 4 divisions of [1 MiB, 2 MiB): steps of 256 KiB, so 1280 KiB.
    conf = parse_alloc_conf("roundup_power2_divisions:4")
    assert round_size(1200 * 1024, conf) == 1280 * 1024
    assert round_size(1200 * 1024) == 1200 * 1024
    # per-interval form: "B:d" sets the interval [B, 2B) MiB, the first one also those below,
    # ">" those above the last: [256, 512) 1 (and below), [512, 1024) 2, [1024, 2048) 4, then 8
    conf = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,1024:4,>:8]")
    assert conf.roundup_power2_divisions == (1,) * 9 + (2, 4) + (8,) * 5
    assert round_size(700 * M, conf) == 768 * M  # [512, 1024) in 2 steps of 256 MiB
    assert round_size(1100 * M, conf) == 1280 * M  # [1024, 2048) in 4 steps of 256 MiB
    assert round_size(3000 * M, conf) == 3072 * M  # [2048, 4096) in 8 steps of 256 MiB
    assert round_size(300 * M + 1, conf) == 300 * M + 512  # 1 division: 512-byte rounding


def test_reserved_never_below_allocated_on_random_traces():
    rng = random.Random(0)
    for config in (None, EXPANDABLE, parse_alloc_conf("max_split_size_mb:64")):
        allocator, live = CachingAllocator(config), {}
        for i in range(3000):
            if live and rng.random() < 0.45:
                allocator.free(live.pop(rng.choice(list(live))))
            else:
                size = rng.choice(
                    [rng.randint(1, 2 * M), rng.randint(M, 12 * M), rng.randint(10 * M, 90 * M)]
                )
                live[i] = allocator.malloc(size)
            assert allocator.reserved >= allocator.allocated
            if i % 500 == 0:
                allocator.empty_cache()
                assert allocator.reserved >= allocator.allocated
        stats = allocator.stats()
        assert stats.peak_reserved_bytes >= stats.peak_allocated_bytes


def test_a_trace_that_never_frees_reserves_its_allocations_rounded_to_segments():
    # Requests >= 10 MiB each get a segment of the request rounded up to 2 MiB; nothing is ever
    # free, so no remainder is reused by them (remainders are < 2 MiB): reserved is the sum of
    # the rounded requests, and allocated is it too whenever the remainder was not split off.
    rng = random.Random(1)
    sizes = [rng.randint(10 * M, 300 * M) for _ in range(200)]
    s = simulate([alloc(k, n) for k, n in enumerate(sizes)])
    segment = [-(-n // (2 * M)) * (2 * M) for n in sizes]
    block = [-(-n // 512) * 512 for n in sizes]
    assert s.peak_reserved_bytes == sum(segment)
    assert s.peak_allocated_bytes == sum(
        b if seg - b > M else seg for b, seg in zip(block, segment, strict=True)
    )
    # multiples of 2 MiB: allocated == reserved exactly
    s = simulate([alloc(k, (k % 50 + 5) * 2 * M) for k in range(100)])
    assert s.peak_allocated_bytes == s.peak_reserved_bytes


def test_events_are_checked():
    with pytest.raises(ValueError, match="allocated twice"):
        simulate([alloc(1, 10), alloc(1, 10)])
    with pytest.raises(ValueError, match="freed but not allocated"):
        simulate([free(1)])
    assert simulate([alloc(1, 0), free(1)]).reserved_bytes == 0  # size 0 allocates nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_split_size_mb:10", "too small, must be >= 20"),
        ("expandable_segments:yes", "True or False"),
        ("garbage_collection_threshold:1.5", r"\(0.0, 1.0\)"),
        ("large_segment_size_mb:8", "must be > 10"),
        ("roundup_power2_divisions:3", "power of 2"),
        ("no_such_key:1", "unrecognized allocator key"),
        ("backend:cudaMallocAsync", "only backend:native"),
        ("max_split_size_mb", "expected max_split_size_mb:value"),
    ],
)
def test_alloc_conf_errors_name_the_problem(text, message):
    with pytest.raises(AllocConfError, match=message):
        parse_alloc_conf(text)


def test_alloc_conf_reads_like_pytorch():
    conf = parse_alloc_conf(
        " expandable_segments:True , max_split_size_mb:128,large_segment_size_mb:64"
    )
    assert conf.expandable_segments and conf.max_split_size == 128 * M
    # max_split_size_mb is checked against the large segment size, read first: 64 here
    with pytest.raises(AllocConfError, match=">= 64"):
        parse_alloc_conf("max_split_size_mb:32,large_segment_size_mb:64")
    assert conf.large_segment_size == 64 * M and conf.non_split_rounding == 64 * M
    assert parse_alloc_conf(None).describe() == "default"
    assert "expandable_segments:True" in conf.describe()
    # host-allocator keys are accepted and change nothing
    assert parse_alloc_conf("pinned_use_background_threads:True").describe() == "default"
    # 1-10 MiB requests use the configured large segment size
    assert (
        simulate([alloc(1, 3 * M)], conf.with_expandable_segments(False)).peak_reserved_bytes
        == 64 * M
    )


# Two free blocks of one size in different segments: which one a request takes decides what can
# merge later. Rules (c10/cuda/CUDACachingAllocator.cpp, read at the snapshot caching.py names; the
# size-then-ptr comparator is the same in the older THCCachingAllocator.cpp's BlockComparator):
# - get_allocation_size: requests of 10 MiB or more get a segment of their size rounded up to
#   2 MiB (all sizes below are multiples of 2 MiB: one segment each, exactly that size);
# - get_free_block: pool.blocks.lower_bound in BlockComparatorSize order (stream, size, ptr):
#   the smallest block that fits, and among equal sizes the lowest address;
# - should_split (large pool): split when more than kSmallSize (1 MiB) remains;
# - free_block / try_merge_blocks: a freed block merges with free neighbours of its own segment.
TIE = [
    alloc(1, 60 * M),  # segment A, 60 MiB
    alloc(2, 40 * M),  # segment B, 40 MiB, made after A
    free(1),  # A: one free 60 MiB block
    alloc(3, 20 * M),  # best fit A's 60: split, 3 = A[0:20], free A[20:60] (40 MiB)
    free(2),  # B: one free 40 MiB block; two free 40 MiB blocks now, A's tail and B
    alloc(4, 12 * M),  # the tie: the lower address of the two 40 MiB blocks is split
    free(3),  # A[0:20] merges with A[20:60] only if 4 did not land in A
    alloc(5, 50 * M),  # a 60 MiB free block (all of A) serves it; else a new 50 MiB segment
]


def test_a_best_fit_tie_goes_to_the_newest_segment_which_cudamalloc_places_lowest():
    # Later segments lie below earlier ones (caching.SEGMENTS_GROW_DOWN): B's 40 MiB is the
    # lower address, 4 splits B (B[0:12], 28 MiB free after it). Freeing 3 merges A[0:20] with
    # A's free 40 MiB tail: A is one free 60 MiB block, and 5 (50 MiB) takes it, split (10 MiB
    # remain). No third segment: reserved peaks at 60 + 40 = 100 MiB.
    grows_down = CachingAllocator()
    # Later segments above (the order this model assumed before): A's tail is the lower
    # address, 4 takes A[20:32]; freeing 3 leaves A as 20 free | 12 held | 28 free and B one
    # free 40 MiB block: none reaches 50 MiB, so 5 gets a new 50 MiB segment, reserved
    # 60 + 40 + 50 = 150 MiB.
    grows_up = CachingAllocator(segments_grow_down=False)
    for allocator, reserved, segments in ((grows_down, 100, 2), (grows_up, 150, 3)):
        live = {}
        for kind, key, nbytes in TIE:
            if kind == ALLOC:
                live[key] = allocator.malloc(nbytes)
            else:
                allocator.free(live.pop(key))
        stats = allocator.stats()
        assert (stats.peak_reserved_bytes, stats.segments) == (reserved * M, segments)
        assert stats.allocated_bytes == (12 + 50) * M  # 4 and 5 are live either way
    # simulate() replays with the driver's order
    assert simulate(TIE).peak_reserved_bytes == 100 * M


def test_the_replay_leaves_garbage_collection_as_it_found_it():
    # simulate turns the cyclic collector off while it replays (speed only): on again after,
    # also when the events are bad, and still off if the caller had turned it off
    import gc

    assert gc.isenabled()
    seen = []

    def events():
        seen.append(gc.isenabled())
        yield (ALLOC, 1, 3 * M)
        yield (FREE, 1, 0)

    simulate(events())
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ValueError, match="freed but not allocated"):
        simulate([(FREE, 7, 0)])
    assert gc.isenabled()
    gc.disable()
    try:
        simulate(events())
        assert not gc.isenabled()
    finally:
        gc.enable()
