"""A model of PyTorch's CUDA caching allocator: what a sequence of allocations reserves. No torch.

`CachingAllocator` follows the rules of
``DeviceCachingAllocator`` (``c10/cuda/CUDACachingAllocator.cpp``) on one device and one stream, and
returns what ``torch.cuda.max_memory_allocated()`` and ``max_memory_reserved()`` would read.

Source: the tag v2.13.0 (the version velora pins) could not be fetched (the PyTorch repository
is 4 GB, over the 500 MB the search tools bring over), so the C++ was read at a main-branch snapshot
that already has everything the 2.13.0 headers declare (``mallocWithAddress``, the
``AcceleratorAllocatorConfig`` keys, ``markCaptureBegin``) plus later virtual-address reservation
options that change no physical mapping (cyyever/pytorch, CUDACachingAllocator.cpp at 076f027).
The GPU machine's 2.11.0 headers declare the same allocator settings; the functions modelled here
did not change between the two as far as the headers show (mallocWithAddress and capture markers,
new in 2.13, are not used by a training step).

Modelled, by the C++ function names:

- ``round_size``: up to a multiple of 512 bytes, or to a power-of-two division when
  ``roundup_power2_divisions`` asks for it.
- ``get_pool``: requests ≤ 1 MiB use the small pool, larger ones the large pool.
- ``get_allocation_size``: a new segment is 2 MiB (small), ``large_segment_size`` (20 MiB) for
  requests under 10 MiB, else the request rounded up to 2 MiB.
- ``get_free_block``: best fit, the smallest cached block ≥ the request; among blocks of one size
  the lowest address (``BlockComparatorSize``: stream, then size, then ``ptr``). Which block that
  is depends on where ``cudaMalloc`` put each segment. The driver does not document its order;
  fitcheck's T4 measurements agree with **lower addresses for later segments** (inferred, not
  read from a source), so a segment made later sits below the earlier ones here
  (``segments_grow_down``, see `SEGMENTS_GROW_DOWN`) and a tie goes to the newest segment;
  a block ≥ ``max_split_size`` serves only requests ≥ ``max_split_size`` and not more than
  ``max_non_split_rounding_size`` smaller than it; with expandable segments, a block that could
  grow into unmapped pages ranks by the size it could grow to.
- ``should_split`` / ``alloc_found_block``: a small-pool block (or any block with expandable
  segments) is split when ≥ 512 bytes remain; a large-pool block when the request is under
  ``max_split_size`` and more than 1 MiB remains. An unsplit block is handed out whole, and
  ``allocated_bytes`` counts the whole block.
- ``free_block`` / ``try_merge_blocks``: a freed block merges with free neighbours of its segment.
- ``alloc_block``: a new segment (``cudaMalloc``), or with expandable segments
  ``try_allocate_expandable_block``: one segment per pool whose pages (2 MiB small, 20 MiB large)
  are mapped on demand at the lowest address where free and unmapped space is large enough
  (``find_expandable_block``, ``map_block``).
- ``release_cached_blocks`` (``torch.cuda.empty_cache()``): free every segment without an
  allocated block; with expandable segments unmap every page with nothing allocated in it
  (``unmap_block``).
- With a ``capacity``: the OOM retry path of ``malloc`` (``release_available_cached_blocks`` when
  ``max_split_size`` is set, then ``release_cached_blocks``) before `AllocatorOutOfMemory`.

Not modelled: several streams and ``record_stream`` events (a training step uses one stream),
CUDA graph private pools, ``garbage_collection_threshold`` (active only under
``set_per_process_memory_fraction`` < 1, which velora never sets), IPC.

A sequence of allocations and frees goes through it in `velora_cli.allocator.replay`
(`replay.simulate`).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from velora_cli.allocator.blocks import ADDRESS_BITS, ADDRESS_MASK, Block, Pool, Segment, round_size
from velora_cli.allocator.config import (
    MIN_BLOCK_SIZE,
    MIN_LARGE_ALLOC,
    ROUND_LARGE,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorConfig,
    MiB,
)

__all__ = ["AllocatorOutOfMemory", "AllocatorStats", "CachingAllocator", "MiB", "round_size"]

# Where cudaMalloc places a new segment relative to the earlier ones: below them. The order is the
# CUDA driver's and not documented; it decides the best-fit ties between equal-sized free blocks
# (BlockComparatorSize breaks them by address). With later segments placed below, the replay of
# fitcheck's twelve eager-attention LoRA steps on a T4 (torch 2.10/2.14, CUDA 12.8/13.0; the
# validation corpus) gives their max_memory_reserved to -12 ... +4 MiB, where placing them above
# missed it by about one attention-score block (-512 ... +256 MiB) on ten of them.
# tests/test_allocator_gpu.py replays a trace on which the two orders differ, on a real GPU.
# Inferred from those measurements, not from a source; a GPU run of that test settles it.
# CachingAllocator's default; False places them above (what this model assumed before).
SEGMENTS_GROW_DOWN = True
# the first segment's address (far above anything a device maps)
FIRST_SEGMENT_ADDRESS = 1 << 47

# An expandable segment reserves 9/8 of the device's memory as address space
# (ExpandableSegment's constructor); without a device, this many bytes.
DEFAULT_ADDRESS_SPACE = 1 << 40


class AllocatorOutOfMemory(MemoryError):
    """A request that no segment could serve within ``capacity``, even after freeing the cache."""


@dataclass(frozen=True)
class AllocatorStats:
    """What the allocator's statistics read at the end of a replay (bytes).

    Peaks run from the last RESET_PEAK event (``torch.cuda.reset_peak_memory_stats``).
    ``allocated_at_peak_reserved`` is the most that was allocated while reserved stood at its
    peak, so ``fragmentation_bytes`` is the free space trapped in segments at the peak.
    """

    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    allocated_at_peak_reserved: int
    segments: int  # segments (expandable: mapped ranges are not counted) held at the end
    device_allocs: int  # cudaMalloc calls (expandable: page mappings)
    device_frees: int
    # times a malloc over ``capacity`` freed cached segments and tried again (both steps of the
    # retry path count; PyTorch's ``num_alloc_retries`` counts the ``release_cached_blocks`` one)
    alloc_retries: int = 0

    @property
    def fragmentation_bytes(self) -> int:
        return self.peak_reserved_bytes - self.allocated_at_peak_reserved


class CachingAllocator:
    """One device's caching allocator (default stream only); see the module docstring.

    Args:
        config: the allocator settings (`parse_alloc_conf`); default: PyTorch's defaults.
        capacity: bytes the device can reserve; None: unlimited (no OOM path).
        address_space: virtual bytes an expandable segment spans.
        segments_grow_down: a new segment lies below the earlier ones, as cudaMalloc places
            them (`SEGMENTS_GROW_DOWN`); False: above them.
    """

    def __init__(
        self,
        config: AllocatorConfig | None = None,
        *,
        capacity: int | None = None,
        address_space: int = DEFAULT_ADDRESS_SPACE,
        segments_grow_down: bool = SEGMENTS_GROW_DOWN,
    ) -> None:
        self.config = config or AllocatorConfig()
        self.segments_grow_down = segments_grow_down
        self.capacity = capacity
        self.address_space = address_space
        self.pools = {True: Pool(True), False: Pool(False)}
        self._small_pool, self._large_pool = self.pools[True], self.pools[False]
        # the settings the per-event paths test, read once (the config is frozen)
        self._expandable = self.config.expandable_segments
        self._split_limit = self.config.max_split_size
        self._plain_best_fit = not self._expandable and self._split_limit is None
        self.expandable: dict[bool, list[Segment]] = {True: [], False: []}
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = self.allocated_at_peak = 0
        self.segments = self.device_allocs = self.device_frees = 0
        self.alloc_retries = 0  # the OOM retry path's releases of cached segments
        # growing down: the lowest address handed out yet; up: the end of the highest segment
        self._next_addr = FIRST_SEGMENT_ADDRESS
        self._rounded: dict[int, int] = {}  # request -> round_size (a replay repeats its sizes)
        self.skipped_steps = 0  # steps a replay passed over (`replay.simulate`, SKIP)

    # -- public --------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> Block:
        """``DeviceCachingAllocator::malloc``: a block for ``nbytes`` (> 0) bytes.

        Raises:
            AllocatorOutOfMemory: over ``capacity`` after the retry path.
        """
        size = self._rounded.get(nbytes)
        if size is None:
            size = self._rounded[nbytes] = round_size(nbytes, self.config)
        pool = self._small_pool if size <= SMALL_SIZE else self._large_pool
        if self._plain_best_fit:  # get_free_block without its expandable and oversize rules
            keys = pool.keys
            i = bisect_left(keys, size << ADDRESS_BITS)
            block = pool.free.pop(keys.pop(i) & ADDRESS_MASK) if i < len(keys) else None
        else:
            block = self._get_free_block(pool, size)
        if block is None:
            block = self._new_block(pool, size)
        # should_split, alloc_found_block and the peak statistics, inlined: this runs once per
        # allocation of every replayed step (millions of times in a 7B tune)
        remaining = block.size - size
        if block.small or self._expandable:
            split = remaining >= MIN_BLOCK_SIZE
        else:
            limit = self._split_limit
            split = (limit is None or size < limit) and remaining > SMALL_SIZE
        if split:
            block = self._split(pool, block, size)
        block.allocated = True
        allocated = self.allocated = self.allocated + block.size
        if allocated > self.peak_allocated:
            self.peak_allocated = allocated
        reserved = self.reserved
        if reserved > self.peak_reserved:
            self.peak_reserved, self.allocated_at_peak = reserved, allocated
        elif reserved == self.peak_reserved and allocated > self.allocated_at_peak:
            self.allocated_at_peak = allocated
        return block

    def _new_block(self, pool: Pool, size: int) -> Block:
        """The part of ``malloc`` after no cached block fits: ``alloc_block``, and within a
        ``capacity`` the OOM retry path (``release_available_cached_blocks``, then
        ``release_cached_blocks``) before `AllocatorOutOfMemory`."""
        alloc_size = self._allocation_size(size)
        block = self._alloc_block(pool, size, alloc_size)
        if block is None and self._release_available_cached_blocks(pool, size):
            self.alloc_retries += 1
            block = self._alloc_block(pool, size, alloc_size)
        if block is None:
            self.alloc_retries += 1
            self.empty_cache()
            block = self._alloc_block(pool, size, alloc_size)
        if block is None:
            raise AllocatorOutOfMemory(
                f"cannot allocate {size} bytes: {self.reserved} of {self.capacity} reserved"
            )
        return block

    def free(self, block: Block) -> None:
        """``free_locked`` + ``free_block``: return ``block`` to its pool, merged with free
        neighbours."""
        if not block.allocated:
            raise ValueError("double free of a simulated block")
        block.allocated = False
        self.allocated -= block.size
        pool = self._small_pool if block.small else self._large_pool
        # try_merge_blocks with each neighbour, inlined: an allocated block is mapped, so a
        # neighbour merges when it is free and mapped (it is then in pool.keys and pool.free)
        keys, free = pool.keys, pool.free
        prev = block.prev
        if prev is not None and not prev.allocated and prev.mapped:
            del keys[bisect_left(keys, prev.size << ADDRESS_BITS | prev.addr)]
            del free[prev.addr]
            block.addr, block.prev = prev.addr, prev.prev
            if block.prev is not None:
                block.prev.next = block
            block.size += prev.size
        nxt = block.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            del keys[bisect_left(keys, nxt.size << ADDRESS_BITS | nxt.addr)]
            del free[nxt.addr]
            block.next = nxt.next
            if block.next is not None:
                block.next.prev = block
            block.size += nxt.size
        insort(keys, block.size << ADDRESS_BITS | block.addr)
        free[block.addr] = block

    def empty_cache(self) -> None:
        """``release_cached_blocks``: free whole free segments; unmap free expandable pages."""
        for small in (False, True):
            pool = self.pools[small]
            to_unmap = []
            for block in list(pool.free.values()):
                if block.segment.expandable:
                    to_unmap.append(block)
                elif not block.is_split():
                    self._release_block(pool, block)
            for block in to_unmap:
                self._unmap_block(pool, block)
                if not block.is_split():  # the whole segment is unmapped: release it
                    pool.remove(block)
                    self.expandable[small].remove(block.segment)

    def reset_peak(self) -> None:
        """``resetPeakStats``: peaks restart from the current values."""
        self.peak_allocated = self.allocated_at_peak = self.allocated
        self.peak_reserved = self.reserved

    def state(self, live: dict[int, Block | None], *, stride: int) -> tuple:
        """Everything the allocator's future depends on, with live keys taken modulo ``stride``
        (the REPEAT event's renaming): free and unmapped blocks of both pools, what each live
        key holds, the counters and the next segment's address. Peaks are left out: they only
        grow."""
        held = sorted(
            (key % stride if key >= 0 else key, block.addr, block.size)
            for key, block in live.items()
            if block is not None
        )
        pools = tuple(
            (tuple(pool.keys), tuple((a, pool.unmapped[a].size) for a in pool.unmapped_addrs))
            for pool in (self.pools[True], self.pools[False])
        )
        expandable = tuple(len(self.expandable[small]) for small in (True, False))
        counters = (self.allocated, self.reserved, self.segments, self._next_addr)
        return (tuple(held), pools, expandable, counters)

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            allocated_bytes=self.allocated,
            reserved_bytes=self.reserved,
            peak_allocated_bytes=self.peak_allocated,
            peak_reserved_bytes=self.peak_reserved,
            allocated_at_peak_reserved=self.allocated_at_peak,
            segments=self.segments + sum(len(s) for s in self.expandable.values()),
            device_allocs=self.device_allocs,
            device_frees=self.device_frees,
            alloc_retries=self.alloc_retries,
        )

    # -- the C++ helpers -----------------------------------------------------------------------

    def _allocation_size(self, size: int) -> int:
        """``get_allocation_size``."""
        if size <= SMALL_SIZE:
            return SMALL_BUFFER
        if size < MIN_LARGE_ALLOC:
            return self.config.large_segment_size
        return -(-size // ROUND_LARGE) * ROUND_LARGE

    def _address(self, size: int, align: int = ROUND_LARGE) -> int:
        """Fresh device addresses for a segment of ``size`` bytes: segments never overlap, and
        a later one lies below the earlier ones (``segments_grow_down``; else above them)."""
        if self.segments_grow_down:
            addr = (self._next_addr - size) // align * align
            self._next_addr = addr
            return addr
        addr = -(-self._next_addr // align) * align
        self._next_addr = addr + size
        return addr

    @staticmethod
    def _expandable_size(block: Block) -> int:
        nxt = block.next
        return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)

    def _get_free_block(self, pool: Pool, size: int) -> Block | None:
        """``get_free_block``: best fit with the expandable and oversize rules."""
        keys = pool.keys
        i = bisect_left(keys, size << ADDRESS_BITS)  # the first (size', addr) with size' >= size
        if i == len(keys):
            return None
        block = pool.free[keys[i] & ADDRESS_MASK]
        if self._expandable and block.segment.expandable:
            # a block that can grow into unmapped pages counts at the size it can grow to
            while i + 1 < len(keys):
                nxt = pool.free[keys[i + 1] & ADDRESS_MASK]
                if not (
                    block.segment.expandable
                    and self._expandable_size(nxt) < self._expandable_size(block)
                ):
                    break
                i, block = i + 1, nxt
        split_limit = self._split_limit
        if split_limit is not None:
            if size < split_limit <= block.size:
                return None  # do not hand an oversize block to a smaller request
            if size >= split_limit and block.size >= size + self.config.non_split_rounding:
                return None
        del keys[i]  # pool.remove(block), its place in the pool's order known
        del pool.free[block.addr]
        return block

    def _split(self, pool: Pool, remaining: Block, size: int) -> Block:
        """The split half of ``alloc_found_block``: the first ``size`` bytes of free block
        ``remaining`` become a new block; what is left goes back to ``pool``."""
        block = Block(remaining.addr, size, remaining.small, remaining.segment)
        block.prev = remaining.prev
        if block.prev is not None:
            block.prev.next = block
        block.next, remaining.prev = remaining, block
        remaining.addr += size
        remaining.size -= size
        pool.add(remaining)
        return block

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _alloc_block(self, pool: Pool, size: int, alloc_size: int) -> Block | None:
        """``alloc_block``: a new segment, or expandable pages mapped for ``size``."""
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        if not self._fits(alloc_size):
            return None
        segment = Segment(self._address(alloc_size), expandable=False, page=alloc_size)
        self.reserved += alloc_size
        self.segments += 1
        self.device_allocs += 1
        return Block(segment.base, alloc_size, pool.small, segment)

    def _release_block(self, pool: Pool, block: Block) -> None:
        """``release_block``: ``cudaFree`` of a whole free segment."""
        pool.remove(block)
        self.reserved -= block.size
        self.segments -= 1
        self.device_frees += 1

    def _release_available_cached_blocks(self, pool: Pool, size: int) -> bool:
        """Free oversize cached segments (only with ``max_split_size``): the smallest one that
        covers the request, or else the largest ones until their sum does."""
        limit = self.config.max_split_size
        if limit is None:
            return False
        want = max(size, limit)
        oversize = [
            pool.free[addr]
            for s, addr in pool.sizes_and_addresses()
            if s >= limit and not pool.free[addr].segment.expandable
        ]
        enough = [b for b in oversize if b.size >= want]
        if enough:
            self._release_block(pool, enough[0])
            return True
        released = 0
        for block in reversed(oversize):
            if released >= want:
                break
            released += block.size
            self._release_block(pool, block)
        return released >= want

    def _merge(self, pool: Pool, dst: Block, src: Block | None) -> int:
        """``try_merge_blocks``: fold free neighbour ``src`` (same mapped state) into ``dst``."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        pool.remove(src)
        if dst.prev is src:
            dst.addr, dst.prev = src.addr, src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # -- expandable segments -------------------------------------------------------------------

    def _find_expandable_block(self, pool: Pool, size: int) -> Block | None:
        """``find_expandable_block``: the lowest unmapped range (with the free block just before
        it) that can hold ``size``; else a new segment's whole unmapped range."""

        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        for addr in pool.unmapped_addrs:
            candidate = pool.unmapped[addr]
            if allocatable(candidate.prev):
                candidate = candidate.prev
            total, b = 0, candidate
            while total < size and allocatable(b):
                total += b.size
                b = b.next
            if total >= size:
                return candidate
        page = SMALL_BUFFER if pool.small else self.config.large_segment_size
        span = -(-self.address_space // page) * page
        if span < size:
            return None  # a single allocation cannot span segments
        segment = Segment(self._address(span, page), expandable=True, page=page)
        self.expandable[pool.small].append(segment)
        block = Block(segment.base, span, pool.small, segment, mapped=False)
        pool.add(block)
        return block

    def _map_block(self, pool: Pool, block: Block, size: int) -> bool:
        """``map_block``: map whole pages for the first ``size`` bytes of unmapped ``block``."""
        page = block.segment.page
        mapped = -(-size // page) * page
        if not self._fits(mapped):
            return False
        pool.remove(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(
                block.addr + mapped, block.size - mapped, block.small, block.segment, False
            )
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            pool.add(rest)
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.add(block)
        self.reserved += mapped
        self.device_allocs += 1
        return True

    def _try_allocate_expandable_block(self, pool: Pool, size: int) -> Block | None:
        candidate = self._find_expandable_block(pool, size)
        if candidate is None:
            return None
        if not candidate.mapped and not self._map_block(pool, candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:  # free -> unmapped: map the rest, merged into one block
            nxt = candidate.next
            assert nxt is not None and not nxt.mapped
            if not self._map_block(pool, nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt
        pool.remove(candidate)
        return candidate

    def _unmap_block(self, pool: Pool, block: Block) -> None:
        """``unmap_block``: unmap the pages wholly inside free ``block``."""
        segment, page = block.segment, block.segment.page
        begin = -(-(block.addr - segment.base) // page)
        end = (block.addr + block.size - segment.base) // page
        if begin >= end:
            return
        pool.remove(block)
        start, length = segment.base + begin * page, (end - begin) * page
        before, after = start - block.addr, block.addr + block.size - (start + length)
        if before > 0:
            head = Block(block.addr, before, block.small, segment)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            pool.add(head)
        if after > 0:
            tail = Block(start + length, after, block.small, segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            pool.add(tail)
        block.addr, block.size, block.mapped = start, length, False
        self._merge(pool, block, block.prev)
        self._merge(pool, block, block.next)
        pool.add(block)
        self.reserved -= length
        self.device_frees += 1
