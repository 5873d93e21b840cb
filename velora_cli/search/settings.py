"""What a tune depends on: `TuneSettings` resolved from the command line, its defaults, and how a
candidate becomes a training step (`candidate_spec`). Plain data, no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from velora_cli.search import probes
from velora_cli.search.candidates import Candidate, optimizers_for

DEFAULT_PLACEMENTS = ("paper", "all-linear")
# `velora tune`'s optimizers: AdamW, and the two that shrink its state by projecting 2-D weight
# gradients (full mode only: lora/qlora candidates are tried with AdamW alone).
# adamw_torch_fused: the HF Trainer's default optim (transformers 5), no foreach temporaries.
DEFAULT_OPTIMIZERS = ("adamw_torch_fused", "adamw", "galore", "adarankgrad")
DEFAULT_NUM_GROUPS = (32,)  # paper Table 5b: M = D/32
DEFAULT_GC_EVERY = (2,)  # besides none and every layer
DEFAULT_PROBE_STEPS = (
    probes.DEFAULT_STEPS
)  # K=16 is unstable from scratch (loss still falling steeply)
# cpu measurements are real steps (llama-60m, 8×256: ≈ 20 s each on 2 cores), so a tune on the cpu
# backend measures at most this many candidates by default; the fastest estimated come first.
DEFAULT_MAX_MEASURED_CPU = 4
# Without a GPU, probes run on the CPU; above this many parameters that takes too long (a probe is
# 16 steps + evaluation, and AdamW holds 16 bytes per parameter), so they are skipped and said so.
PROBE_CPU_PARAMS = 200e6
# What must match for a journal's results to be reused (what a measurement or probe depends on).
CONTEXT_KEYS = (
    "model", "batch_size", "seq_len", "dtype", "amp", "optimizers", "rank", "update_gap", "eta",
    "lora_rank", "lora_targets", "init", "weights", "backend", "budget_bytes", "probe_steps",
    "data", "gpu", "alloc_conf", "world_sizes", "parallels",
)  # fmt: skip


RECIPE_DEFAULTS = {
    "gc_reentrant": False,
    "double_quant": True,
    "compute_dtype": "bf16",
    "quant_storage": "uint8",
    "kbit_prepare": False,
}


class TuneError(ValueError):
    """A tune that cannot start as asked (resume mismatch, no budget...); says what to do."""


@dataclass(frozen=True)
class TuneSettings:
    """Everything a tune depends on, resolved from the command line."""

    model: str
    budget_bytes: int
    backend: str  # cuda | cpu | estimate (auto already resolved)
    batch_size: int = 8
    seq_len: int = 256
    dtype: str = "fp32"
    amp: str | None = None
    optimizers: tuple[str, ...] = ("adamw",)  # the CLI searches DEFAULT_OPTIMIZERS
    rank: int | None = None  # galore/adarankgrad (max) rank; None: hidden size / 4
    update_gap: int = 200  # = lowrank.DEFAULT_UPDATE_GAP (not imported: it imports torch)
    eta: float = 0.9  # = lowrank.DEFAULT_ETA
    lora_rank: int = 8
    lora_targets: str = "all-linear"
    init: str = "batch_average_once"
    weights: bool = False
    trust_remote_code: bool = False
    modes: tuple[str, ...] = ("full",)
    placements: tuple[str, ...] = DEFAULT_PLACEMENTS
    num_groups: tuple[int, ...] = DEFAULT_NUM_GROUPS
    gc_every: tuple[int, ...] = DEFAULT_GC_EVERY
    micro_batches: tuple[int, ...] | None = None
    margin: float = 0.05
    objective: str = "speed"
    max_loss_increase: float = 0.01
    max_measured: int | None = None
    probe_steps: int = DEFAULT_PROBE_STEPS  # 0: no probes
    data: str | None = None
    budget_source: str = "--budget"  # or "free GPU memory"
    gpu: str | None = None  # what the estimate predicts for (velora_cli.gpus); None: the default
    alloc_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF for the estimate's allocator model
    world_sizes: tuple[int, ...] = (1,)  # ranks (GPUs) to try; the batch is per rank
    parallels: tuple[str, ...] = ("ddp", "fsdp", "fsdp-no-reshard")  # with world sizes > 1
    trainer: str = "hf"  # whose step (velora_cli.measure.trainers): hf or trl
    # the recipe (velora_cli.measure.recipe): checkpointing kind, QLoRA's settings
    gc_reentrant: bool = False
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_storage: str = "uint8"
    kbit_prepare: bool = False
    attn: str = "auto"  # attention kernels (StepSpec.attn)
    task: str | None = None  # the head trained (StepSpec.task); None: the config's
    padding: bool = False  # padded batches (StepSpec.padding)
    repeat_kv: bool = False  # K/V repeated before SDPA (StepSpec.repeat_kv)
    # the run's transformers release (StepSpec.transformers_version); None: the installed one
    transformers_version: str | None = None
    packing: bool = False  # packed rows (StepSpec.packing)
    sac: tuple[str, ...] = ()  # selective checkpointing policies tried with gc on every layer
    offload: tuple[str, ...] = ()  # activation offload kinds (inputs with gc, all without)

    def context(self) -> dict[str, Any]:
        """The journal header: the settings a journal's results depend on (as JSON has them).

        One process only (world size 1) records no layout, as journals did before there was one.
        """
        context = {k: json_value(getattr(self, k)) for k in CONTEXT_KEYS}
        multi = self.world_sizes != (1,)
        context["world_sizes"] = list(self.world_sizes) if multi else None
        context["parallels"] = list(self.parallels) if multi else None
        if self.trainer != "hf":  # journals of the hf step, from before the choice, still match
            context["trainer"] = self.trainer
        for key, default in RECIPE_DEFAULTS.items():  # journals from before these had none
            if getattr(self, key) != default:
                context[key] = getattr(self, key)
        if self.attn != "auto":  # journals written before --attn existed stay resumable
            context["attn"] = self.attn
        if self.task is not None:
            context["task"] = self.task
        if self.padding:
            context["padding"] = True
        if self.repeat_kv:
            context["repeat_kv"] = True
        if self.transformers_version is not None:
            context["transformers_version"] = self.transformers_version
        if self.packing:
            context["packing"] = True
        for key in ("sac", "offload"):  # only where tried: earlier journals' headers still match
            if getattr(self, key):
                context[key] = list(getattr(self, key))
        return context

    def layouts(self) -> list[tuple[int, str | None]]:
        """(world size, parallel) pairs to search: one process for 1, each strategy above."""
        return [(n, p) for n in self.world_sizes for p in ([None] if n == 1 else self.parallels)]

    def optimizers_by_mode(self) -> dict[str, list[str]]:
        """Mode -> the optimizers tried in it (galore and adarankgrad in full mode only).

        Raises:
            SpecError: no mode has an optimizer to try (e.g. ``--mode lora --optimizer galore``).
        """
        from velora_cli.measure.train_step import SpecError

        found = {mode: optimizers_for(mode, self.optimizers) for mode in self.modes}
        if not any(found.values()):
            raise SpecError(
                f"--optimizer {','.join(self.optimizers)} projects full weight gradients, and "
                f"--mode {','.join(self.modes)} trains low-rank adapters already: add full to "
                "--mode, or adamw to --optimizer"
            )
        return found

    def base_spec(self):
        """The step of the first mode and its first optimizer; candidates replace both.

        Raises:
            SpecError: an invalid setting (batch, precision, rank...) or no valid mode/optimizer.
        """
        from velora_cli.measure.train_step import StepSpec

        mode, optimizers = next((m, o) for m, o in self.optimizers_by_mode().items() if o)
        return StepSpec(
            model=self.model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            dtype=self.dtype,
            amp=self.amp,
            mode=mode,
            lora_rank=self.lora_rank,
            lora_targets=self.lora_targets,
            optimizer=optimizers[0],
            rank=self.rank,
            update_gap=self.update_gap,
            eta=self.eta,
            weights=self.weights,
            trust_remote_code=self.trust_remote_code,
            init=self.init,
            trainer=self.trainer,
            **{key: getattr(self, key) for key in RECIPE_DEFAULTS},
            attn=self.attn,
            task=self.task,
            padding=self.padding,
            repeat_kv=self.repeat_kv,
            packing=self.packing,
            transformers_version=self.transformers_version,
        )


def json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so journal contexts compare."""
    return list(value) if isinstance(value, tuple) else value


def candidate_spec(base, c: Candidate):
    """The training step of candidate ``c``: the effective batch kept through accumulation."""
    from velora_cli.measure.train_step import Strategy

    return dataclasses.replace(
        base,
        batch_size=c.batch_size,
        grad_accum_steps=c.grad_accum_steps,
        mode=c.mode,
        optimizer=c.optimizer,
        strategy=Strategy(
            placement=c.placement, num_groups=c.num_groups, gc=c.gc, sac=c.sac, offload=c.offload
        ),
        world_size=c.world_size,
        parallel=c.parallel,
    )
