"""The CUDA caching allocator's constants and its ``PYTORCH_CUDA_ALLOC_CONF`` settings, no torch.

Constants and parsing follow PyTorch 2.13's ``c10/core/AllocatorConfig.h`` (installed with the
pinned torch: the constants ``kMinBlockSize`` … ``kRoundLarge`` and the defaults below are read from
that header) and ``c10/core/AllocatorConfig.cpp`` (``AcceleratorAllocatorConfig::parseArgs`` and
its ``parse*`` helpers, read at a main-branch snapshot of the same era, see allocator.py). The GPU
machine's torch 2.11.0 header (from its wheel) has the same device-allocator keys and defaults;
2.13 adds only host (pinned) allocator keys and ``throw_on_cudamalloc_oom``.

Example:
    >>> parse_alloc_conf("expandable_segments:True,max_split_size_mb:256").max_split_size // MiB
    256
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

MiB = 1 << 20

MIN_BLOCK_SIZE = 512  # kMinBlockSize: every block is a multiple of 512 bytes
SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: the small pool's segments (and expandable pages)
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: requests under 10 MiB get a large_segment_size segment
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests get a segment rounded up to 2 MiB
LARGE_SEGMENT_SIZE = 20 * MiB  # large_segment_size_ default (kLargeBuffer before it was an option)
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB .. 64 GiB, one per power of two

# Environment variables in the order AcceleratorAllocatorConfig::instance() reads them (the first
# one set wins).
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

# Keys the caching allocator reads that change nothing this model covers (host allocator, locking,
# graph capture, IPC handles, an early-OOM policy): accepted and ignored.
IGNORED_KEYS = (
    "pinned_use_background_threads", "pinned_max_round_threshold_mb", "pinned_max_cached_size_mb",
    "pinned_use_cuda_host_register", "pinned_num_register_threads", "pinned_reserve_segment_size_mb",
    "pinned_free_catch_all", "release_lock_on_cudamalloc", "graph_capture_record_stream_reuse",
    "throw_on_cudamalloc_oom", "expandable_segments_handle_type", "backend",
)  # fmt: skip
MODELLED_KEYS = (
    "large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
    "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
    "per_process_memory_fraction",
)  # fmt: skip


class AllocConfError(ValueError):
    """A ``PYTORCH_CUDA_ALLOC_CONF`` string the allocator would reject (the message says why)."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The caching allocator settings that change which segments are reserved.

    ``max_split_size`` None is PyTorch's default (no limit: every block may be split);
    ``max_non_split_rounding_size`` None means ``large_segment_size`` (its default).
    ``roundup_power2_divisions`` has one entry per power-of-two interval from 1 MiB (0 or 1: no
    rounding beyond 512 bytes). ``garbage_collection_threshold`` and
    ``per_process_memory_fraction`` are kept for the record: the threshold acts only under a
    memory fraction below 1 (``DeviceCachingAllocator::malloc`` tests ``allowed_memory_maximum``)
    and velora's training step sets none, so neither changes the replay.
    """

    max_split_size: int | None = None
    max_non_split_rounding_size: int | None = None
    large_segment_size: int = LARGE_SEGMENT_SIZE
    roundup_power2_divisions: tuple[int, ...] = field(default=(0,) * ROUNDUP_INTERVALS)
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    per_process_memory_fraction: float = 1.0
    text: str = ""  # the string it was parsed from

    @property
    def non_split_rounding(self) -> int:
        if self.max_non_split_rounding_size is None:
            return self.large_segment_size
        return self.max_non_split_rounding_size

    def divisions(self, size: int) -> int:
        """``AcceleratorAllocatorConfig::roundup_power2_divisions(size)``: the interval of
        ``floor(log2(size))`` counted from 1 MiB, clamped to the 16 intervals."""
        index = max(size.bit_length() - 1 - 20, 0)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]

    def with_expandable_segments(self, enabled: bool = True) -> AllocatorConfig:
        return replace(self, expandable_segments=enabled)

    def describe(self) -> str:
        """The settings in PYTORCH_CUDA_ALLOC_CONF form (``default`` when nothing is set)."""
        parts = []
        if self.large_segment_size != LARGE_SEGMENT_SIZE:
            parts.append(f"large_segment_size_mb:{self.large_segment_size // MiB}")
        if self.max_split_size is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size // MiB}")
        if self.max_non_split_rounding_size is not None:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_size // MiB}")
        if any(d > 1 for d in self.roundup_power2_divisions):
            parts.append(f"roundup_power2_divisions:{list(self.roundup_power2_divisions)}")
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        return ",".join(parts) or "default"


def alloc_conf_from_env(environ: dict[str, str] | None = None) -> str | None:
    """The allocator settings string PyTorch would read from the environment, if any."""
    environ = os.environ if environ is None else environ
    for name in ENV_VARS:
        if name in environ:
            return environ[name]
    return None


def _tokens(text: str) -> list[str]:
    """``ConfigTokenizer``: keys/values and the separators ``, : [ ]``; whitespace dropped."""
    out, buffer = [], ""
    for ch in text:
        if ch in ",:[]":
            if buffer:
                out.append(buffer)
                buffer = ""
            out.append(ch)
        elif not ch.isspace():
            buffer += ch
    if buffer:
        out.append(buffer)
    return out


def _int(token: str, key: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise AllocConfError(f"{key} takes an integer, got {token!r}") from None


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _divisions(tokens: list[str], i: int, key: str) -> tuple[tuple[int, ...], int]:
    """``parseRoundUpPower2Divisions``: one value for every interval, or ``[mb:div,...,>:div]``."""
    table = [0] * ROUNDUP_INTERVALS
    if tokens[i] != "[":
        value = _int(tokens[i], key)
        if not _power_of_two(value):
            raise AllocConfError(f"{key}: the divisions must be a power of 2, got {value}")
        return (value,) * ROUNDUP_INTERVALS, i
    first, last = True, 0
    i += 1
    while i < len(tokens) and tokens[i] != "]":
        bound = tokens[i]
        if i + 2 >= len(tokens) or tokens[i + 1] != ":":
            raise AllocConfError(f"{key}: expected boundary:divisions pairs in [...]")
        value = _int(tokens[i + 2], key)
        if value != 0 and not _power_of_two(value):
            raise AllocConfError(f"{key}: divisions must be a power of 2 or 0, got {value}")
        if bound == ">":
            table[last + 1 :] = [value] * (ROUNDUP_INTERVALS - last - 1)
        else:
            size_mb = _int(bound, key)
            if not _power_of_two(size_mb):
                raise AllocConfError(f"{key}: interval bounds must be powers of 2, got {size_mb}")
            index = min(size_mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
            if first:
                table[:index] = [value] * index
                first = False
            table[index] = value
            last = index
        i += 3
        if i < len(tokens) and tokens[i] == ",":
            i += 1
    if i >= len(tokens):
        raise AllocConfError(f"{key}: missing ']'")
    return tuple(table), i


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Parse a ``PYTORCH_CUDA_ALLOC_CONF`` string as PyTorch 2.13 does (None or "": defaults).

    ``large_segment_size_mb`` is read first, since the minimum of ``max_split_size_mb`` and
    ``max_non_split_rounding_mb`` is the large segment size (``parseArgs``).

    Raises:
        AllocConfError: an unknown key, a malformed value, or a value PyTorch refuses (the
            same bounds: ``large_segment_size_mb`` > 10, ``max_split_size_mb`` ≥ the large
            segment size, a threshold in (0, 1), power-of-two divisions, True/False), and
            ``backend:cudaMallocAsync``, which replaces this allocator and is not modelled.
    """
    if not text:
        return AllocatorConfig()
    tokens = _tokens(text)
    pairs: list[tuple[str, str | tuple[int, ...]]] = []
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if key not in MODELLED_KEYS + IGNORED_KEYS:
            known = ", ".join(MODELLED_KEYS + IGNORED_KEYS)
            raise AllocConfError(f"unrecognized allocator key {key!r}; known keys: {known}")
        if i + 2 >= len(tokens) or tokens[i + 1] != ":":
            raise AllocConfError(f"{key}: expected {key}:value")
        if key == "roundup_power2_divisions":
            value, i = _divisions(tokens, i + 2, key)
        else:
            value, i = tokens[i + 2], i + 2
        pairs.append((key, value))
        i += 1
        if i < len(tokens):
            if tokens[i] != ",":
                raise AllocConfError(f"expected ',' after {key}, got {tokens[i]!r}")
            i += 1
    values: dict[str, object] = {"text": text}
    large = LARGE_SEGMENT_SIZE
    for key, value in pairs:
        if key == "large_segment_size_mb":
            mb = _int(str(value), key)
            if mb <= MIN_LARGE_ALLOC // MiB:
                raise AllocConfError(f"{key} must be > {MIN_LARGE_ALLOC // MiB} MB, got {mb}")
            large = values["large_segment_size"] = mb * MiB
    for key, value in pairs:
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = _int(str(value), key)
            if mb < large // MiB:
                raise AllocConfError(f"{key} too small, must be >= {large // MiB}, got {mb}")
            name = "max_split_size" if key == "max_split_size_mb" else "max_non_split_rounding_size"
            values[name] = mb * MiB
        elif key in ("garbage_collection_threshold", "per_process_memory_fraction"):
            try:
                number = float(str(value))
            except ValueError:
                raise AllocConfError(f"{key} takes a number, got {value!r}") from None
            low_ok = number > 0 if key == "garbage_collection_threshold" else number >= 0
            high_ok = number < 1 if key == "garbage_collection_threshold" else number <= 1
            if not (low_ok and high_ok):
                raise AllocConfError(f"{key} must be in (0.0, 1.0), got {value}")
            values[key] = number
        elif key == "roundup_power2_divisions":
            values[key] = value
        elif key == "expandable_segments":
            if value not in ("True", "False"):
                raise AllocConfError(f"{key} takes True or False, got {value!r}")
            values[key] = value == "True"
        elif key == "backend" and value != "native":
            raise AllocConfError(
                f"backend:{value} replaces the caching allocator; only backend:native is modelled"
            )
    return AllocatorConfig(**values)  # type: ignore[arg-type]
