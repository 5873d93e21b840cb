"""Sequence lengths of the training data, and the batch to plan for (``--lengths``, ``--data``).

With dynamic padding (transformers' ``DataCollatorWithPadding``, TRL's collator without packing)
each batch is padded to its own longest sequence; packing collators (``DataCollatorWithFlattening``,
TRL's ``padding_free``) put a batch's sequences in one row. Either way the memory of a step
depends on the batch it gets, and the plan is for the worst one:

- **padding**: the batch padded to the longest length N that occurs. Every tensor of the step is
  (B, N, ...) and SDPA's and eager's masks are (B, 1, N, N), whatever the other lengths are;
  only FlashAttention-2's unpadded copies depend on the real tokens T of that batch (more is
  worse). A batch with no pad token passes no mask, which keeps less, so the worst batch is the
  one with the most real tokens *that still pads*.
- **packing**: the row of the batch's sequences, T tokens; the worst has the most tokens.

Batch composition: batches are drawn from the data in any order (the Trainer shuffles; its
``group_by_length`` sampler even puts the longest batch first), so any ``micro`` sequences can
meet. From a list of lengths (a file, ``--data``) the worst padded batch is therefore the
``micro`` longest sequences, and when those are all equally long (so do not pad), the
``micro - 1`` longest with the longest shorter one. A distribution (``uniform``, ``normal``,
``percentiles``) is continuous: ``micro`` draws can all be near its maximum, so the worst
padded batch is N tokens in every sequence but one pad token. One sequence per micro-batch never
pads, and a batch of one sequence never packs.

Lengths are what the collator gets, after the tokenizer's truncation: the plan's sequence length
is the longest of them (not ``--seq-len``), and a length above the model's position table is
refused. Plain Python (no torch): the commands parse ``--lengths`` before anything is built.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.models import ModelSpec

KINDS = ("uniform", "normal", "percentiles")
# draws that give the typical batch and the padding share of a distribution (seeded: the same
# figures every run)
SAMPLES = 20_000
SEED = 0


class LengthsError(ValueError):
    """A ``--lengths`` spec or lengths file that cannot be read (one line: what to give)."""


@dataclass(frozen=True)
class Lengths:
    """Where sequence lengths come from: a distribution, or the lengths themselves.

    ``values`` holds the lengths of a file or of ``--data`` (None for a distribution);
    ``quantiles`` is the distribution as (probability, length) knots, linear in between.

    Example:
        >>> parse_lengths("uniform:128-2048").maximum
        2048
        >>> parse_lengths("percentiles:p50=300,p90=900,max=2048").quantile(0.5)
        300
    """

    source: str
    kind: str
    quantiles: tuple[tuple[float, float], ...] = ()
    normal: tuple[float, float, int] | None = None  # mean, std, max (truncated to [1, max])
    values: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """How the notes name the lengths: ``--lengths SPEC`` or ``--data FILE (...)``."""
        return self.source if self.kind == "data" else f"--lengths {self.source}"

    @property
    def maximum(self) -> int:
        if self.values is not None:
            return max(self.values)
        if self.normal is not None:
            return self.normal[2]
        return round(self.quantiles[-1][1])

    @property
    def minimum(self) -> int:
        if self.values is not None:
            return min(self.values)
        if self.normal is not None:
            return 1
        return round(self.quantiles[0][1])

    def quantile(self, p: float) -> int:
        """The length below which a share ``p`` of the sequences lie (0 <= p <= 1)."""
        if self.values is not None:
            ordered = sorted(self.values)
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))]
        if self.normal is not None:
            mean, std, top = self.normal
            # Acklam-free inverse: bisect the normal CDF truncated to [1, top]
            lo_cdf, hi_cdf = _phi((1 - mean) / std), _phi((top - mean) / std)
            target = lo_cdf + p * (hi_cdf - lo_cdf)
            lo, hi = 1.0, float(top)
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _phi((mid - mean) / std) < target else (lo, mid)
            return max(1, min(top, round(lo)))
        for (p0, x0), (p1, x1) in zip(self.quantiles, self.quantiles[1:], strict=False):
            if p <= p1:
                return round(x0 + (x1 - x0) * (p - p0) / (p1 - p0) if p1 > p0 else x1)
        return round(self.quantiles[-1][1])

    def sample(self, n: int, rng: random.Random) -> list[int]:
        if self.values is not None:
            return [rng.choice(self.values) for _ in range(n)]
        return [self.quantile(rng.random()) for _ in range(n)]


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def parse_lengths(text: str) -> Lengths:
    """``--lengths``: a distribution spec, or a file of lengths.

    Forms:
        ``uniform:MIN-MAX``: every length from MIN to MAX equally likely.
        ``normal:MEAN,STD,MAX``: a normal distribution truncated to [1, MAX] (MAX: the
            truncation length of the tokenizer; required, as the plan is for the longest batch).
        ``percentiles:p50=300,p90=900,p99=1500,max=2048``: lengths at given percentiles (p0 or
            ``min`` optional, default 1; ``max`` = p100 required), linear in between.
        ``PATH``: a file of lengths, one integer per line (or a JSON list of integers).

    Raises:
        LengthsError: an unknown kind, a malformed number, or an unreadable or empty file.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind in KINDS:
        try:
            return _PARSERS[kind](text, rest)
        except (ValueError, IndexError) as exc:
            if isinstance(exc, LengthsError):
                raise
            raise LengthsError(f"--lengths {text!r}: give {_FORMS[kind]}") from None
    path = Path(text).expanduser()
    if path.is_file():
        return Lengths(str(path), "file", values=tuple(_read_lengths(path)))
    if sep:
        raise LengthsError(
            f"--lengths {text!r}: unknown distribution {kind!r}; give {', '.join(_FORMS.values())}, "
            "or a file of lengths"
        )
    raise LengthsError(
        f"--lengths {text!r}: no such file and not a distribution; give "
        f"{', '.join(_FORMS.values())}, or a file with one length per line"
    )


_FORMS = {
    "uniform": "uniform:MIN-MAX",
    "normal": "normal:MEAN,STD,MAX",
    "percentiles": "percentiles:p50=N,...,max=N",
}


def _uniform(text: str, rest: str) -> Lengths:
    low, high = (int(v) for v in rest.split("-"))
    _check_range(text, low, high)
    return Lengths(text, "uniform", quantiles=((0.0, low), (1.0, high)))


def _normal(text: str, rest: str) -> Lengths:
    mean, std, top = (float(v) for v in rest.split(","))
    if std <= 0 or top < 1 or top != int(top):
        raise LengthsError(f"--lengths {text!r}: STD must be > 0 and MAX a whole number >= 1")
    return Lengths(text, "normal", normal=(mean, std, int(top)))


def _percentiles(text: str, rest: str) -> Lengths:
    knots: dict[float, float] = {0.0: 1.0}
    for item in rest.split(","):
        key, value = (s.strip() for s in item.split("="))
        p = {"min": 0.0, "max": 100.0}.get(key)
        if p is None:
            if not key.startswith("p"):
                raise ValueError(key)
            p = float(key[1:])
        if not 0 <= p <= 100:
            raise LengthsError(f"--lengths {text!r}: percentiles run from p0 to p100 (max)")
        knots[p / 100] = float(int(value))
    if 1.0 not in knots:
        raise LengthsError(
            f"--lengths {text!r}: give the longest length (max=N): the plan is for the longest "
            "batch"
        )
    ordered = tuple(sorted(knots.items()))
    if any(b[1] < a[1] for a, b in zip(ordered, ordered[1:], strict=False)):
        raise LengthsError(f"--lengths {text!r}: lengths must not fall as the percentile rises")
    _check_range(text, round(ordered[0][1]), round(ordered[-1][1]))
    return Lengths(text, "percentiles", quantiles=ordered)


_PARSERS = {"uniform": _uniform, "normal": _normal, "percentiles": _percentiles}


def _check_range(text: str, low: int, high: int) -> None:
    if low < 1 or high < low:
        raise LengthsError(f"--lengths {text!r}: lengths are >= 1 and MIN <= MAX")


def _read_lengths(path: Path) -> list[int]:
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LengthsError(f"--lengths {path}: cannot read it ({exc})") from None
    try:
        stripped = text.strip()
        values = json.loads(stripped) if stripped.startswith("[") else stripped.split()
        lengths = [int(v) for v in values]
    except (ValueError, TypeError):
        raise LengthsError(
            f"--lengths {path}: not a list of lengths; give one whole number per line"
        ) from None
    if not lengths:
        raise LengthsError(f"--lengths {path}: the file has no lengths")
    if min(lengths) < 1:
        raise LengthsError(f"--lengths {path}: lengths must be >= 1, found {min(lengths)}")
    return lengths


def from_values(values: Sequence[int], source: str) -> Lengths:
    """The lengths of a data set (``--data``), as `Lengths`."""
    values = tuple(v for v in values if v > 0)
    if not values:
        raise LengthsError(f"{source}: no sequence has any token")
    return Lengths(source, "data", values=values)


@dataclass(frozen=True)
class BatchPlan:
    """The batch a step is planned for, from `Lengths` (`worst_batch`).

    ``seq_len`` is the longest sequence (the padded length); ``lengths`` the real lengths of
    the micro-batch's sequences (None: every one ``seq_len`` long but one pad token, the worst
    batch of a distribution); ``padding`` False when that batch has no pad token (no mask).
    ``typical`` is the median padded length of a random batch (the note adds the length 1 batch
    in 1,000 reaches) and ``pad_share`` the share of
    padding tokens over random batches (None for packing, which has no padding).
    """

    seq_len: int
    lengths: tuple[int, ...] | None
    padding: bool
    typical: int
    pad_share: float | None
    note: str


def worst_batch(
    lengths: Lengths, micro: int, *, packing: bool = False, max_positions: int | None = None
) -> BatchPlan:
    """The worst micro-batch of ``micro`` sequences for memory (module docstring), and a line
    that says what was planned.

    Raises:
        LengthsError: a length above ``max_positions`` (the model's position table).
    """
    top = lengths.maximum
    if max_positions and top > max_positions:
        raise LengthsError(
            f"{lengths.label}: sequences of up to {top:,} tokens exceed the model's "
            f"max_position_embeddings ({max_positions:,}); truncate them when tokenizing "
            f"(max_length={max_positions}) and give the truncated lengths"
        )
    rng = random.Random(SEED)
    batches = max(1, SAMPLES // micro)
    drawn = [lengths.sample(micro, rng) for _ in range(batches)]
    longest = sorted(max(b) for b in drawn)
    typical = longest[len(longest) // 2]
    rare = longest[min(len(longest) - 1, int(len(longest) * 0.999))]  # 1 batch in 1,000
    if lengths.values is not None:
        ordered = sorted(lengths.values, reverse=True)
        if len(ordered) < micro:  # a data set smaller than a batch: one batch of all of it
            ordered = ordered + ordered[-1:] * (micro - len(ordered))
        chosen = ordered[:micro]
        shorter = [v for v in ordered if v < top]
        if not packing and micro > 1 and chosen[-1] == top and shorter:
            chosen = chosen[:-1] + [shorter[0]]
        planned: tuple[int, ...] | None = tuple(chosen)
        pads = not packing and micro > 1 and min(chosen) < top
    else:
        planned = None if not packing else (top,) * micro
        pads = not packing and micro > 1 and lengths.minimum < top
    if packing:
        tokens = sum(planned or ())
        note = (
            f"{lengths.label}: packed batches of {micro} sequences, planned for the "
            f"longest: {tokens:,} tokens in one row (the longest sequence {top:,}; a typical "
            f"batch's longest {typical:,})"
        )
        return BatchPlan(top, planned, False, typical, None, note)
    real = sum(sum(b) for b in drawn)
    padded = sum(max(b) * len(b) for b in drawn)
    share = 1 - real / padded
    if pads:
        tokens = sum(planned) if planned else micro * top - 1
        what = f"padded to {top:,}, {tokens:,} real tokens"
    else:
        what = f"{top:,} tokens, no padding" + (" (one sequence per batch)" if micro == 1 else "")
    note = (
        f"{lengths.label}: planned for the longest batch, {micro} × {top:,} ({what}); "
        f"a typical batch is padded to {typical:,}, 1 in 1,000 to {rare:,} or more, and {share:.0%} "
        "of the tokens of random batches are padding"
    )
    if not pads and lengths.values is None and micro > 1:
        planned = None
    return BatchPlan(top, planned if pads else None, pads, typical, share, note)


def for_lengths(spec: StepSpec, model_spec: ModelSpec, lengths: Lengths | None):
    """``spec`` planned for the worst batch of ``lengths`` (`worst_batch`), and the line that
    says so (None, None without lengths).

    With lengths and no ``--packing``, batches are padded to their longest (dynamic padding):
    ``padding`` follows the worst batch (no pad token in it: no mask), ``seq_len`` is its
    length and ``lengths`` its real lengths.

    Raises:
        LengthsError: an image task (images are neither padded nor packed), packing for a head
            that is not a causal LM, or a length above the model's position table.
    """
    import dataclasses

    if spec.packing and model_spec.task != "causal-lm":
        raise LengthsError(
            f"--packing: packed rows train causal language models (DataCollatorWithFlattening, "
            f"TRL), and {model_spec.name} is {model_spec.task}; leave --packing out"
        )
    if lengths is None:
        return spec, None
    if model_spec.task == "image-classification":
        raise LengthsError(
            f"--lengths/--data: {model_spec.name} classifies images, whose length is fixed by "
            "the image size; leave them out"
        )
    max_positions = getattr(model_spec.config, "max_position_embeddings", None)
    plan = worst_batch(lengths, spec.micro_batch, packing=spec.packing, max_positions=max_positions)
    padding = plan.padding and not spec.packing
    spec = dataclasses.replace(spec, seq_len=plan.seq_len, lengths=plan.lengths, padding=padding)
    return spec, plan.note


def tune_lengths(
    text: str | None, seq_len: int, padding: bool, packing: bool
) -> tuple[int, bool, str | None]:
    """``velora tune --lengths``: (sequence length, padding, note). A tune tries several
    micro-batch sizes, so every candidate is planned at the longest length of ``text`` with one
    pad token (packing: rows of micro-batch × that length), the worst batch of a distribution at
    any size; for listed lengths that is at least their worst batch (`worst_batch`).

    Raises:
        LengthsError: a spec or file `parse_lengths` refuses.
    """
    if text is None:
        return seq_len, padding, None
    lengths = parse_lengths(text)
    top = lengths.maximum
    how = "packed rows of micro-batch × it" if packing else "padded, one pad token"
    note = (
        f"{lengths.label}: every candidate planned at the longest length, {top:,} tokens ({how}); "
        "--seq-len does not apply"
    )
    return top, not packing, note
