"""The caching allocator's bookkeeping, as in ``CUDACachingAllocator.cpp``: segments, the blocks
they are split into (``struct Block``: address, size, neighbours, mapped or not), a pool's free
blocks ordered by (size, address) as ``BlockPool::blocks`` orders them for best fit, and the
request rounding (``round_size``). No torch; used by allocator.py.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from velora_cli.allocator.config import MIN_BLOCK_SIZE, AllocatorConfig


class Segment:
    """One cudaMalloc'd range (``page`` = its size), or one expandable segment's virtual range
    mapped in pages of ``page`` bytes (2 MiB small pool, ``large_segment_size`` large)."""

    __slots__ = ("base", "expandable", "page")

    def __init__(self, base: int, expandable: bool, page: int) -> None:
        self.base, self.expandable, self.page = base, expandable, page


class Block:
    """A piece of a segment: allocated, free, or (expandable) not backed by memory
    (``mapped`` False); ``prev``/``next`` are its neighbours in the segment."""

    __slots__ = ("addr", "size", "small", "segment", "allocated", "mapped", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool, segment: Segment, mapped=True) -> None:
        self.addr, self.size, self.small, self.segment = addr, size, small, segment
        self.allocated, self.mapped = False, mapped
        self.prev: Block | None = None
        self.next: Block | None = None

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


# A free block's place in its pool's best-fit order, (size, address), packed into one int
# (size << ADDRESS_BITS | address): int comparisons keep `bisect` and `insort` cheap in the replay
# of millions of events. Addresses stay below 2**ADDRESS_BITS (the first segment is at 2**47).
ADDRESS_BITS = 64
ADDRESS_MASK = (1 << ADDRESS_BITS) - 1


def order_key(size: int, addr: int) -> int:
    """A free block's best-fit key: sizes first, then addresses (``BlockComparatorSize``)."""
    return size << ADDRESS_BITS | addr


class Pool:
    """One pool's (small or large) free mapped blocks sorted by (size, address) for best fit,
    and its unmapped blocks by address (``BlockPool::blocks`` and ``::unmapped``).

    ``keys`` holds the free blocks' `order_key` values, sorted; ``free`` maps an address to
    its free block."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[int] = []
        self.free: dict[int, Block] = {}
        self.unmapped_addrs: list[int] = []
        self.unmapped: dict[int, Block] = {}

    def add(self, block: Block) -> None:
        if block.mapped:
            insort(self.keys, block.size << ADDRESS_BITS | block.addr)
            self.free[block.addr] = block
        else:
            insort(self.unmapped_addrs, block.addr)
            self.unmapped[block.addr] = block

    def remove(self, block: Block) -> None:
        if block.mapped:
            del self.keys[bisect_left(self.keys, block.size << ADDRESS_BITS | block.addr)]
            del self.free[block.addr]
        else:
            del self.unmapped_addrs[bisect_left(self.unmapped_addrs, block.addr)]
            del self.unmapped[block.addr]

    def sizes_and_addresses(self) -> list[tuple[int, int]]:
        """The free blocks as (size, address), in best-fit order."""
        return [(key >> ADDRESS_BITS, key & ADDRESS_MASK) for key in self.keys]


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: 1200 with 4 divisions of [1024, 2048) gives 1280."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def round_size(size: int, config: AllocatorConfig | None = None) -> int:
    """``round_size``: the block size a request of ``size`` bytes gets."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    divisions = config.divisions(size) if config is not None else 0
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(size, divisions)
    return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
