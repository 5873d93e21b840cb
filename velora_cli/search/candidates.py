"""What the tuner searches over: candidates, their search space, and what the three callables
return (`Measurement`, `Probe`); plain data, no torch.

`search_space` crosses the axes (mode, placement, sub-token size, checkpointing, micro-batch,
optimizer) and `cost_rank` orders candidates by expected speed when no time is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from velora_cli.measure.layout import FSDP, FSDP_INCOMPATIBLE_OPTIMIZERS
from velora_cli.measure.train_step import LOWRANK_OPTIMIZERS  # plain names: no torch import


@dataclass(frozen=True)
class Candidate:
    """One training configuration to try.

    Example:
        >>> Candidate("full", "paper", 32, gc=2, micro_batch_size=4, grad_accum_steps=2).key
        'full|paper|g32|gc=2|mb4x2|adamw'
    """

    mode: str = "full"  # "full" | "lora" | "qlora"
    placement: str | None = None  # VeLoRA placement preset; None = no VeLoRA
    num_groups: int | None = None  # None with a placement = the placement's default
    gc: bool | int = False  # False, True (every layer) or checkpoint every n-th layer
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    world_size: int = 1  # ranks (GPUs); the batch sizes above are per rank
    parallel: str | None = None  # ddp | fsdp | fsdp-no-reshard; None: one process
    sac: str | None = None  # selective checkpointing policy (op, attn, mlp); needs gc
    offload: str | None = None  # activation offload: inputs (needs gc) or all

    def __post_init__(self) -> None:
        errors = []
        if (self.parallel is None) != (self.world_size == 1) or self.world_size < 1:
            errors.append(
                f"world_size {self.world_size!r} with parallel {self.parallel!r}: one process "
                "is world_size 1 without parallel, several ranks need a parallel strategy"
            )
        gc = self.gc
        if isinstance(gc, bool) or gc in (0, 1):  # gc=1 is every layer, gc=0 never: one spelling
            object.__setattr__(self, "gc", bool(gc))
        elif not isinstance(gc, int) or gc < 1:
            errors.append(f"gc must be False, True or a positive int (every n layers), got {gc!r}")
        for name in ("micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name} must be a positive int, got {value!r}")
        if self.num_groups is not None and (
            not isinstance(self.num_groups, int) or self.num_groups < 1
        ):
            errors.append(f"num_groups must be a positive int or None, got {self.num_groups!r}")
        if self.placement is None and self.num_groups is not None:
            errors.append("num_groups needs a placement (num_groups without VeLoRA means nothing)")
        if self.sac is not None and self.gc is False:
            errors.append(f"sac {self.sac} needs checkpointing (gc)")
        if self.offload == "inputs" and self.gc is False:
            errors.append("offload inputs needs checkpointing (gc)")
        if not self.mode or not self.optimizer:
            errors.append("mode and optimizer must be non-empty")
        if errors:
            raise ValueError("invalid candidate: " + "; ".join(errors))

    @property
    def uses_velora(self) -> bool:
        return self.placement is not None

    @property
    def exact(self) -> bool:
        """True when the step computes what its mode's baseline computes (no VeLoRA, no low-rank
        optimizer): checkpointing and micro-batching do not change the maths, so no probe."""
        return not self.uses_velora and self.optimizer not in LOWRANK_OPTIMIZERS

    @property
    def batch_size(self) -> int:
        """Effective batch size: micro-batch × accumulation steps."""
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def key(self) -> str:
        """Stable id for the journal and for resume, e.g. ``full|paper|g32|gc=2|mb4x2|adamw``."""
        gc = "all" if self.gc is True else "off" if self.gc is False else self.gc
        groups = "-" if self.num_groups is None else self.num_groups
        key = (
            f"{self.mode}|{self.placement or 'none'}|g{groups}|gc={gc}"
            f"|mb{self.micro_batch_size}x{self.grad_accum_steps}|{self.optimizer}"
        )
        key += f"|{self.parallel}x{self.world_size}" if self.parallel else ""
        # only where set: the keys of earlier journals stay valid for --resume
        key += f"|sac={self.sac}" if self.sac else ""
        return key + (f"|offload={self.offload}" if self.offload else "")


@dataclass(frozen=True)
class Measurement:
    """What an estimate or a measure function returns; bytes are ints."""

    peak_bytes: int | None
    step_seconds: float | None
    tokens_per_second: float | None
    status: str = "ok"  # "ok" | "oom" | "error"
    backend: str = ""
    # extra row fields (activation_bytes, …); an estimate may give "velora_layers" for cost_rank
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """Accuracy proxy of one candidate, relative to the uncompressed baseline."""

    loss: float | None  # held-out loss after K steps
    loss_increase: float | None  # relative change vs baseline (0.01 = +1%)
    grad_cosine_min: float | None = None
    grad_cosine_mean: float | None = None


def _divisor_micro_batches(batch_size: int) -> list[int]:
    sizes = {1 << i for i in range(batch_size.bit_length()) if batch_size % (1 << i) == 0}
    return sorted(sizes | {batch_size})


def _unique(items: Iterable) -> list:
    out: list = []
    for item in items:
        if item not in out:  # keeps order; `True == 1` is why gc goes through Candidate first
            out.append(item)
    return out


def optimizers_for(mode: str, optimizers: Sequence[str]) -> list[str]:
    """The optimizers tried in ``mode``: galore and adarankgrad project full weight gradients, so
    they are crossed with full mode only (LoRA's trained adapters are low-rank already)."""
    return [o for o in _unique(optimizers) if mode == "full" or o not in LOWRANK_OPTIMIZERS]


def search_space(
    *,
    batch_size: int,
    modes: Sequence[str],
    placements: Sequence[str | None],
    num_groups: Sequence[int | None],
    gc_options: Sequence[bool | int],
    micro_batches: Sequence[int] | None = None,
    optimizers: Sequence[str] = ("adamw",),
    layouts: Sequence[tuple[int, str | None]] = ((1, None),),
    sac_options: Sequence[str] = (),
    offload_options: Sequence[str] = (),
) -> list[Candidate]:
    """Every combination worth trying, without duplicates.

    Args:
        batch_size: the effective batch size, kept through gradient accumulation.
        modes: training modes ("full", "lora", "qlora").
        placements: VeLoRA placement presets; include None for "no VeLoRA".
        num_groups: sub-token group counts tried with each placement (None = preset default); the
            no-VeLoRA candidates take no num_groups, so they are not repeated per value.
        gc_options: False, True or every-n ints; 0/1 mean False/True and are merged with them.
        micro_batches: micro-batch sizes; default every power of two dividing `batch_size`, plus
            `batch_size` itself. grad_accum_steps = batch_size // micro.
        optimizers: optimizer names; low-rank ones go with full mode only (`optimizers_for`).
        layouts: (world size, parallel strategy) pairs, ``(1, None)`` for one process; the
            batch is per rank. Low-rank optimizers (each rank holds a shard of every gradient),
            Adafactor and the bitsandbytes optimizers (neither steps FSDP2's DTensor parameters)
            are not crossed with FSDP: `measure.layout.layout_errors` refuses them.
        sac_options: selective checkpointing policies, each tried where every layer is
            checkpointed (gc True), besides plain checkpointing.
        offload_options: activation offload kinds: ``inputs`` tried with every-layer
            checkpointing (plain or selective), ``all`` without checkpointing.

    Returns:
        Candidates ordered mode, placement, num_groups, gc, micro-batch (largest first), optimizer;
        empty when no optimizer applies to any mode.

    Raises:
        ValueError: batch_size < 1, an empty axis, or a micro-batch size that does not divide
            batch_size (the message lists the divisors).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    micros = _divisor_micro_batches(batch_size) if micro_batches is None else _unique(micro_batches)
    bad = [m for m in micros if not isinstance(m, int) or m < 1 or batch_size % m]
    if bad:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"micro-batch sizes {bad} do not divide batch size {batch_size}; use {divisors}"
        )
    axes = {
        "modes": modes,
        "placements": placements,
        "gc_options": gc_options,
        "optimizers": optimizers,
    }
    empty = [name for name, values in axes.items() if not list(values)]
    if empty or not micros:
        raise ValueError(f"empty search axis: {', '.join(empty) or 'micro_batches'}")
    groups = _unique(num_groups) or [None]
    gcs = _unique(Candidate(gc=g).gc for g in gc_options)
    memory: list[tuple[bool | int, str | None, str | None]] = []  # (gc, sac, offload)
    for gc in gcs:
        sacs = [None, *_unique(sac_options)] if gc is True else [None]
        for sac in sacs:
            memory.append((gc, sac, None))
            offloads = [
                o
                for o in _unique(offload_options)
                if (o == "inputs" and gc is True) or (o == "all" and gc is False)
            ]
            memory += [(gc, sac, o) for o in offloads]
    out: list[Candidate] = []
    for mode in _unique(modes):
        for placement in _unique(placements):
            for g in [None] if placement is None else groups:
                for gc, sac, offload in memory:
                    for micro in sorted(micros, reverse=True):
                        for opt in optimizers_for(mode, optimizers):
                            accum = batch_size // micro
                            for world, parallel in layouts:
                                if parallel in FSDP and (
                                    opt in LOWRANK_OPTIMIZERS or opt in FSDP_INCOMPATIBLE_OPTIMIZERS
                                ):
                                    continue  # refused by `layout_errors`
                                out.append(
                                    Candidate(
                                        mode,
                                        placement,
                                        g,
                                        gc,
                                        micro,
                                        accum,
                                        opt,
                                        world,
                                        parallel,
                                        sac,
                                        offload,
                                    )  # fmt: skip
                                )
    return out


def cost_rank(candidate: Candidate, velora_layers: int | None = None) -> tuple:
    """A speed proxy for estimates that give no time: smaller tuples are expected to run faster.

    Compared lexicographically, most important first:
    1. recompute fraction of gradient checkpointing: 0 without, 1/n every n layers, 1 for all
       (checkpointing re-runs the forward of the checkpointed layers, ~+1/3 step time at 1);
       selective checkpointing counts half (a proxy for ordering only: torchtitan's op policy
       recomputes 3 of a Llama block's 7 projections, attn/mlp one of its two sub-blocks);
    2. 1 for qlora, else 0: every 4-bit weight is dequantized in each forward and backward
       matmul (memory-bound, small next to the matmuls at thousands of tokens, hence after 1);
    3. minus the micro-batch size (larger micro-batches: fewer, better-utilised kernels);
    4. 1 for a low-rank optimizer (galore, adarankgrad), else 0: each step projects every 2-D
       gradient and its update (2 matmuls of m·n·r per weight, ~r/(3·tokens) of the forward and
       backward) and each refresh adds an SVD or a range finder;
    5. number of VeLoRA-wrapped layers (each adds a small projection and reconstruction), taken from
       the estimate's ``detail["velora_layers"]`` when known, else 0 without VeLoRA and 1 with it.

    Args:
        candidate: the configuration.
        velora_layers: how many layers the placement wraps, if known.

    6. the communication volume of the parallel strategy per step, in units of the model's
       parameters (ZeRO paper §7: DDP's all-reduce and FSDP without resharding move 2Ψ, FSDP
       with resharding 3Ψ, its second all-gather in backward), last because
       the engines overlap it with compute; one process has no such element.

    7. 1 with activation offload (the element is there only then).

    Returns:
        (recompute_fraction, dequantizes, -micro_batch_size, projects, velora_layers[, comm]
        [, 1]).
    """
    gc = candidate.gc
    fraction = 1.0 if gc is True else 0.0 if gc is False else 1.0 / gc
    if candidate.sac:
        fraction /= 2
    if velora_layers is None:
        velora_layers = int(candidate.uses_velora)
    dequantizes = int(candidate.mode == "qlora")
    projects = int(candidate.optimizer in LOWRANK_OPTIMIZERS)
    rank = (fraction, dequantizes, -candidate.micro_batch_size, projects, velora_layers)
    if candidate.parallel is not None:  # no communication: sorts before any (…, comm)
        rank = (*rank, {"ddp": 2, "fsdp-no-reshard": 2}.get(candidate.parallel, 3))
    # last, only where there is offload: its copies cross the host link, so at equal rest the
    # candidate without sorts first (a shorter tuple before a longer one with the same prefix)
    return (*rank, 1) if candidate.offload else rank


def drop_unsupported_layouts(space: list[Candidate], settings) -> tuple[list[Candidate], list[str]]:
    """Candidates the per-rank step cannot run (qlora or --amp with a parallel strategy) out.

    Returns:
        (kept candidates, one notice per reason).
    """
    reasons = []
    if settings.amp is not None:
        reasons.append(("amp", "--amp with a parallel strategy is not supported yet"))
    if "qlora" in settings.modes:
        reasons.append(("qlora", "qlora is not sharded here (bitsandbytes 4-bit weights)"))

    def unsupported(c: Candidate) -> str | None:
        if c.parallel is None:
            return None
        if settings.amp is not None:
            return "amp"
        return "qlora" if c.mode == "qlora" else None

    dropped = {unsupported(c) for c in space} - {None}
    kept = [c for c in space if unsupported(c) is None]
    notices = [f"{why}: tried with one process only" for key, why in reasons if key in dropped]
    return kept, notices
