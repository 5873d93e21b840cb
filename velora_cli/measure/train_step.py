"""One training step, defined once and run by every backend (cuda, cpu, estimate).

A step is: forward, loss, backward, optimizer step, ``zero_grad(set_to_none=True)``, over
``grad_accum_steps`` micro-batches. What varies between rows of a profile is a ``Strategy``
(VeLoRA placement and sub-token size, gradient checkpointing); what varies between runs is a
``StepSpec`` (model, shapes, precision, mode). Both are plain frozen data so they cross process
boundaries as JSON (the cuda backend runs each row in a fresh process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# velora's optimizer names (adamw, sgd, galore, adarankgrad) and the HF Trainer's
# (adamw_torch_fused, paged_adamw_8bit, adafactor, ...): velora_cli.methods.optimizers
from velora_cli import gcpause
from velora_cli.methods.optimizer_names import LOWRANK as LOWRANK_OPTIMIZERS
from velora_cli.methods.optimizer_names import OPTIMIZER_NAMES as OPTIMIZERS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from velora_cli.models import ModelSpec

DTYPES = ("fp32", "bf16", "fp16")
AMP = ("bf16", "fp16")
MODES = ("full", "lora", "qlora")  # qlora: 4-bit NF4 frozen base + LoRA (quant.py)

# torch indexes a tensor's elements with int64: no step may hold a tensor with more elements.
MAX_ELEMENTS = 2**63 - 1
# StepSpec fields added after profile documents were first written, with their defaults
_LATER_FIELDS: dict[str, Any] = {
    "attn": "auto",
    "task": None,
    "padding": False,
    "repeat_kv": False,
    "lengths": None,
    "packing": False,
    "zero_grad_set_to_none": True,
    "torch_version": None,
    "transformers_version": None,
}
# selective checkpointing policies (measure/selective.py) and activation offload kinds
# (measure/host_offload.py), repeated here so a Strategy is validated without importing torch
SAC_POLICIES = ("op", "attn", "mlp")
OFFLOAD_KINDS = ("inputs", "all")


class SpecError(ValueError):
    """A step or strategy setting that makes no sense (shown to the user as one line)."""


@dataclass(frozen=True)
class Strategy:
    """How activation memory is saved in one row: VeLoRA placement/size and checkpointing.

    ``gc`` is False (no checkpointing), True (every layer, non-reentrant) or an int n > 1
    (every n-th layer). ``sac`` makes the checkpointing selective (``op``, ``attn``, ``mlp``:
    `velora_cli.measure.selective`; needs ``gc``). ``offload`` keeps saved tensors in pinned host
    memory (``inputs``: the checkpoint inputs, needs ``gc``; ``all``: every saved activation:
    `velora_cli.measure.host_offload`).

    Example:
        >>> Strategy(gc=True, sac="op").label
        'sac op'
        >>> Strategy(placement="all-linear", num_groups=16, gc=True, offload="inputs").label
        'velora all-linear g16 + gc + offload inputs'
    """

    placement: str | None = None
    num_groups: int | None = None
    sub_token_size: int | None = None
    gc: bool | int = False
    sac: str | None = None
    offload: str | None = None

    def __post_init__(self):
        errors = []
        if self.placement is None and (self.num_groups or self.sub_token_size):
            errors.append("a sub-token size needs a placement")
        if self.num_groups is not None and self.sub_token_size is not None:
            errors.append("give num_groups or sub_token_size, not both")
        if not isinstance(self.gc, bool) and (not isinstance(self.gc, int) or self.gc < 1):
            errors.append(f"gc must be False, True or a layer interval >= 1, not {self.gc!r}")
        if self.sac is not None and self.sac not in SAC_POLICIES:
            errors.append(f"sac {self.sac!r}: choose {', '.join(SAC_POLICIES)}")
        elif self.sac is not None and self.gc is False:
            errors.append(f"selective checkpointing (sac {self.sac}) needs checkpointing (gc)")
        if self.offload is not None and self.offload not in OFFLOAD_KINDS:
            errors.append(f"offload {self.offload!r}: choose {', '.join(OFFLOAD_KINDS)}")
        elif self.offload == "inputs" and self.gc is False:
            errors.append("offload inputs moves the checkpoint inputs: it needs checkpointing (gc)")
        if errors:
            raise SpecError("; ".join(errors))

    @property
    def kind(self) -> str:
        """``baseline``, ``gc``, ``offload`` (without checkpointing) or ``velora`` (VeLoRA, with
        or without checkpointing or offload)."""
        if self.placement:
            return "velora"
        if self.gc:
            return "gc"
        return "offload" if self.offload else "baseline"

    @property
    def gc_every(self) -> int | None:
        """Checkpointing interval in layers (1 = every layer), or None without checkpointing."""
        if self.gc is False:
            return None
        return 1 if self.gc is True else int(self.gc)

    @property
    def label(self) -> str:
        parts = []
        if self.placement:
            size = f"M={self.sub_token_size}" if self.sub_token_size else f"g{self.num_groups}"
            parts.append(f"velora {self.placement} {size}")
        gc = f"sac {self.sac}" if self.sac else "gc"
        if self.gc_every == 1:
            parts.append(gc)
        elif self.gc_every:
            parts.append(f"{gc} every {self.gc_every}")
        if self.offload:
            parts.append(f"offload {self.offload}")
        return " + ".join(parts) or "baseline"


@dataclass(frozen=True)
class StepSpec:
    """Everything that defines the measured training step except the strategy."""

    model: str
    batch_size: int = 4
    seq_len: int = 256
    dtype: str = "fp32"
    amp: str | None = None
    mode: str = "full"
    lora_rank: int = 8
    lora_targets: str = "all-linear"
    optimizer: str = "adamw"
    rank: int | None = None  # galore/adarankgrad (max) rank; None: hidden size / 4
    update_gap: int = 200  # galore/adarankgrad: steps between subspace refreshes (at most)
    eta: float = 0.9  # adarankgrad: gradient energy the adaptive rank keeps
    grad_accum_steps: int = 1
    weights: bool = False
    trust_remote_code: bool = False
    init: str = "batch_average_once"
    seed: int = 0
    strategy: Strategy = field(default_factory=Strategy)
    # velora_cli.parallel: ranks (the batch above is per rank), ddp|fsdp|fsdp-no-reshard or None
    # (one process, no torch.distributed), FSDP2's CPUOffloadPolicy
    world_size: int = 1
    parallel: str | None = None
    cpu_offload: bool = False
    # the training loop keeps the model's output (its logits) alive through backward and the
    # optimizer step, as ``out = model(**batch); out.loss.backward(); opt.step()`` does; the
    # default drops it as soon as the loss is taken (the HF Trainer's compute_loss)
    keep_outputs: bool = False
    # whose step: hf (the model's own loss, as transformers' Trainer and a plain loop compute it)
    # or trl (TRL SFTTrainer's fused LM head and metrics); velora_cli.measure.trainers
    trainer: str = "hf"
    # checkpointing as transformers does it: gradient_checkpointing_kwargs={"use_reentrant": ...}
    # (transformers' own default is non-reentrant)
    gc_reentrant: bool = False
    # QLoRA (--mode qlora) as BitsAndBytesConfig states it: bnb_4bit_use_double_quant,
    # bnb_4bit_compute_dtype, bnb_4bit_quant_storage; kbit_prepare: peft's
    # prepare_model_for_kbit_training (fp32 upcast of the non-quantized parameters). Ignored in
    # the other modes (a tune's base step carries them to its qlora candidates).
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_storage: str = "uint8"
    kbit_prepare: bool = False
    # the attention kernels (HF's attn_implementation; "auto": transformers' default, sdpa)
    attn: str = "auto"
    # the head trained (models.TASKS); None: the one the config's architectures name
    task: str | None = None
    # batches padded to their longest sequence (--seq-len): planned for the worst such batch, in
    # which one token pads (transformers then builds its attention masks)
    padding: bool = False
    # K/V repeated to the query heads before SDPA also without a mask (transformers before it
    # passed enable_gqa, ~v4.54, pull #39412; harness shims such as fitcheck's): SDPA gets equal
    # heads and no enable_gqa, and its kernel keeps the repeated (B, H, N, d) copies. Default:
    # what transformers 5 does (enable_gqa when there is no mask)
    repeat_kv: bool = False
    # the real lengths of the planned micro-batch's sequences (`measure.lengths.worst_batch`:
    # --lengths, --data), longest = seq_len; None: every sequence seq_len long (with padding, one
    # pad token: the worst batch of a distribution)
    lengths: tuple[int, ...] | None = None
    # packed batches (DataCollatorWithFlattening, TRL packing / padding_free): a micro-batch's
    # sequences in one row with position_ids restarting at each, no attention mask
    packing: bool = False
    # the loop's zero_grad: True frees the gradients after each optimizer step (torch >= 2.0's
    # default, transformers' Trainer since 4.27); False zeroes them in place, so they stay
    # allocated through the next step's forward (torch < 2.0's default, e.g. the Trainer's
    # model.zero_grad() of transformers 4.18-4.26: pytorch#92731, transformers#22136)
    zero_grad_set_to_none: bool = True
    # the torch release of the run planned ("1.10"); None: the installed one. The estimate
    # emulates what an older release saved (emulation.step.cuda_emulation: softmax's input
    # before 1.11); the cpu backend runs the installed torch whatever this says
    torch_version: str | None = None
    # the transformers release of the run planned ("4.48.1"); None: the installed one. A causal
    # LM then computes its loss from the logits as that release did (measure.loss_path: the
    # shifted copy of the logits before 4.49, without the fp32 upcast for GPTBigCode), and
    # GPTBigCode before 4.53 keeps each block's K/V while the config's use_cache is on; the cpu
    # backend runs the same patched forward
    transformers_version: str | None = None

    def __post_init__(self):
        errors = _batch_errors(self)
        if self.batch_size < 1:
            errors.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len < 1:
            errors.append(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.batch_size * self.seq_len > MAX_ELEMENTS:
            errors.append(
                f"--batch-size {self.batch_size} × --seq-len {self.seq_len} tokens is more than "
                "torch can index in one tensor (2^63 elements): give realistic sizes"
            )
        if self.grad_accum_steps < 1:
            errors.append(f"gradient accumulation steps must be >= 1, got {self.grad_accum_steps}")
        if self.dtype not in DTYPES:
            errors.append(f"--dtype {self.dtype!r}: choose {'|'.join(DTYPES)}")
        if self.amp is not None and self.amp not in AMP:
            errors.append(f"--amp {self.amp!r}: choose {'|'.join(AMP)}")
        if self.amp is not None and self.dtype != "fp32":
            errors.append("--amp keeps fp32 master weights: use it with --dtype fp32")
        if self.mode not in MODES:
            errors.append(f"--mode {self.mode!r}: choose {'|'.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            from velora_cli.methods.optimizer_names import OptimizerError, optimizer_info

            try:
                optimizer_info(self.optimizer)
            except OptimizerError as exc:
                errors.append(str(exc))
        if self.lora_rank < 1:
            errors.append(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.optimizer in LOWRANK_OPTIMIZERS and self.mode != "full":
            errors.append(
                f"--optimizer {self.optimizer} projects full weight gradients; with --mode "
                f"{self.mode} the trained adapters are already low-rank: use --mode full"
            )
        if self.rank is not None and self.rank < 1:
            errors.append(f"--rank must be >= 1, got {self.rank}")
        if self.update_gap < 1:
            errors.append(f"--update-gap must be >= 1, got {self.update_gap}")
        if not 0.0 < self.eta <= 1.0:
            errors.append(f"--eta must be in (0, 1], got {self.eta}")
        from velora_cli.measure.trainers import TRAINERS

        if self.trainer not in TRAINERS:
            errors.append(f"--trainer {self.trainer!r}: choose {'|'.join(TRAINERS)}")
        elif self.keep_outputs and self.trainer != "hf":
            errors.append(
                f"keep_outputs holds the model's own output, which --trainer {self.trainer} "
                "does not return: use --trainer hf"
            )
        errors += _recipe_errors(self)
        from velora_cli.models.spec import ATTENTIONS, TASKS

        if self.task is not None and self.task not in TASKS:
            errors.append(f"--task {self.task!r}: choose {'|'.join(TASKS)}")
        if self.attn not in ATTENTIONS:
            errors.append(f"--attn {self.attn!r}: choose {'|'.join(ATTENTIONS)}")
        if self.attn == "flash_attention_2" and self.dtype == "fp32" and self.amp is None:
            errors.append(
                "--attn flash_attention_2 runs in fp16/bf16 only: use --dtype bf16 or --amp bf16"
            )
        if self.repeat_kv and self.attn not in ("auto", "sdpa"):
            errors.append(
                f"--repeat-kv repeats K/V before SDPA: use it with --attn auto or sdpa (--attn "
                f"{self.attn} {'always repeats them' if self.attn == 'eager' else 'never does'})"
            )
        from velora_cli.measure.layout import layout_errors

        errors += layout_errors(self)
        if self.transformers_version is not None:
            from velora_cli.measure.loss_path import VersionError, release

            try:
                release(self.transformers_version)
            except VersionError as exc:
                errors.append(str(exc))
        if errors:
            raise SpecError("; ".join(errors))

    @property
    def qlora_label(self) -> str | None:
        """How the 4-bit base is set up, in words (None outside --mode qlora), e.g.
        ``nf4, double quant, compute bf16, storage uint8, prepare_model_for_kbit_training``."""
        if self.mode != "qlora":
            return None
        parts = [
            "nf4",
            "double quant" if self.double_quant else "no double quant",
            f"compute {self.compute_dtype}",
            f"storage {self.quant_storage}",
        ]
        if self.kbit_prepare:
            parts.append("prepare_model_for_kbit_training")
        return ", ".join(parts)

    @property
    def optimizer_label(self) -> str:
        """The optimizer with its settings, e.g. ``adarankgrad r≤128 η=0.9 T=200``."""
        if self.optimizer not in LOWRANK_OPTIMIZERS:
            return self.optimizer
        rank = "r=auto" if self.rank is None else f"r={self.rank}"
        if self.optimizer == "adarankgrad":
            rank = rank.replace("=", "≤") + f" η={self.eta:g}"
        return f"{self.optimizer} {rank} T={self.update_gap}"

    @property
    def precision(self) -> str:
        """What each part of the step is stored in, in words (`velora_cli.methods.precision`)."""
        from velora_cli.methods.precision import describe

        return describe(self.mode, self.dtype, self.amp, **self.qlora_precision()).text

    def qlora_precision(self) -> dict[str, str | None]:
        """`methods.precision.describe`'s ``quantized`` and ``frozen`` for this step's QLoRA
        settings in qlora mode (None: QLoRA's defaults, today's text)."""
        quantized = frozen = None
        settings = (self.double_quant, self.compute_dtype, self.quant_storage, self.kbit_prepare)
        if settings != (True, "bf16", "uint8", False):
            quantized = "4-bit " + dataclasses.replace(self, mode="qlora").qlora_label
        if self.kbit_prepare:
            frozen = "fp32"  # prepare_model_for_kbit_training upcasts them
        return {"quantized": quantized, "frozen": frozen}

    def with_strategy(self, strategy: Strategy) -> StepSpec:
        return dataclasses.replace(self, strategy=strategy)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON; fields added later (``trainer``, ``keep_outputs``, the recipe's,
        attention, task, padding, zero_grad, torch version) are left out at their defaults, so the documents of setups that
        existed before them are unchanged."""
        data = dataclasses.asdict(self)
        if data["trainer"] == "hf":
            del data["trainer"]
        if not data["keep_outputs"]:
            del data["keep_outputs"]
        for name in RECIPE_FIELDS:
            if data[name] == _FIELD_DEFAULTS[name]:
                del data[name]
        for name, default in _LATER_FIELDS.items():
            if data.get(name) == default:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepSpec:
        data = dict(data)
        data["strategy"] = Strategy(**data.get("strategy", {}))
        if data.get("lengths") is not None:
            data["lengths"] = tuple(data["lengths"])
        return cls(**data)

    @property
    def micro_batch(self) -> int:
        return max(1, self.batch_size // self.grad_accum_steps)

    def real_tokens(self) -> int:
        """Real (not padding) tokens of a padded micro-batch, or the tokens of a packed row."""
        if self.lengths is not None:
            return sum(self.lengths)
        return self.micro_batch * self.seq_len - (1 if self.padding else 0)

    @property
    def packed_sequences(self) -> bool:
        """Whether a packed row holds several sequences (transformers then builds its packed
        mask for SDPA and eager, and FA2 runs varlen); a row of one sequence is plain causal."""
        return self.packing and (self.lengths is None or len(self.lengths) > 1)


QUANT_STORAGES = ("uint8", "bf16", "fp16", "fp32")


def _batch_errors(spec: StepSpec) -> list[str]:
    """Padding, lengths and packing settings that make no sense (`StepSpec.__post_init__`)."""
    errors = []
    if spec.packing and spec.padding:
        errors.append(
            "--packing puts a batch's sequences in one row without padding: leave --padding out"
        )
    if spec.lengths is not None:
        micro = spec.batch_size // max(1, spec.grad_accum_steps)
        if not (spec.padding or spec.packing):
            errors.append("lengths of a batch need --padding or --packing")
        elif len(spec.lengths) != micro:
            errors.append(f"{len(spec.lengths)} lengths for a micro-batch of {micro} sequences")
        elif min(spec.lengths) < 1 or max(spec.lengths) != spec.seq_len:
            errors.append(f"lengths run from 1 to the sequence length {spec.seq_len}")
    return errors


def _recipe_errors(spec: StepSpec) -> list[str]:
    """Checkpointing and QLoRA settings that make no sense (`StepSpec.__post_init__`)."""
    errors = []
    if spec.compute_dtype not in DTYPES:
        errors.append(f"--compute-dtype {spec.compute_dtype!r}: choose {'|'.join(DTYPES)}")
    if spec.quant_storage not in QUANT_STORAGES:
        errors.append(f"--quant-storage {spec.quant_storage!r}: choose {'|'.join(QUANT_STORAGES)}")
    return errors


def check_device(spec: StepSpec, device: str) -> None:
    """Refuse a step the real ``device`` (``cpu``/``cuda``) cannot run, before anything is built.

    Raises:
        SpecError: QLoRA or a bitsandbytes optimizer without bitsandbytes; a paged optimizer on
            the CPU (its state is cudaMallocManaged memory, which only a GPU has).
    """
    import importlib.util

    from velora_cli.methods.optimizer_names import NEEDS_BITSANDBYTES, PAGED

    kind = str(device).split(":")[0]
    if kind == "meta":
        return
    if kind == "cpu" and spec.optimizer in PAGED:
        raise SpecError(
            f"--optimizer {spec.optimizer} pages its state with cudaMallocManaged, which the cpu "
            "backend has not: use --backend estimate (or cuda), or adamw_bnb_8bit on the cpu"
        )
    needs = []
    if spec.mode == "qlora":
        needs.append("--mode qlora")
    if spec.optimizer in NEEDS_BITSANDBYTES:
        needs.append(f"--optimizer {spec.optimizer}")
    if needs and _missing("bitsandbytes", importlib.util):
        raise SpecError(
            f"{' and '.join(needs)} on the {kind} backend needs bitsandbytes: "
            "pip install 'velora-cli[qlora]', or use --backend estimate"
        )


def _missing(module: str, util) -> bool:
    import sys

    if module in sys.modules:
        return sys.modules[module] is None
    return util.find_spec(module) is None


# StepSpec fields that documents carry only when set (`StepSpec.to_json`)
RECIPE_FIELDS = ("gc_reentrant", "double_quant", "compute_dtype", "quant_storage", "kbit_prepare")
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StepSpec)}


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class Prepared:
    """A model ready to train with its optimizer and a fixed batch."""

    spec: StepSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    micro_batches: list[dict[str, torch.Tensor]]
    wrapped: list[str]
    device: torch.device
    notice: str | None = None
    vocab_size: int | None = None
    batches_drawn: int = 0
    inputs: BatchShape | None = None  # what each micro-batch holds (None: a language model's)

    def next_batch(self) -> None:
        """Replace the micro-batches with new random ones of the same shapes.

        Timed steps use a new batch each, as training does: memory does not depend on the
        values, but a low-rank optimizer does (AdaRankGrad refreshes its subspace when the
        projected gradient stops changing, which one repeated batch would fake).
        """
        self.batches_drawn += 1
        seed = self.spec.seed + self.batches_drawn * self.spec.grad_accum_steps
        self.micro_batches = make_batch(
            dataclasses.replace(self.spec, seed=seed), self.vocab_size, self.device, self.inputs
        )

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def grad_bytes(self) -> int:
        """Bytes the gradients take once formed (one per trainable parameter)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def quantized(self) -> dict[str, int]:
        """``quantized_params`` and ``quantized_bytes`` (4-bit weights + quantization state) in
        qlora mode; an empty dict otherwise. ``param_bytes`` counts the packed weights only."""
        if self.spec.mode != "qlora":
            return {}
        from velora_cli.methods.quant import quantized_storage

        return quantized_storage(self.model)

    def optimizer_details(self) -> dict[str, Any]:
        """For galore/adarankgrad: the rank cap, the ranks now (min/median/max over projected
        weights), refreshes so far and the state's worst case at the cap; else empty."""
        opt = self.optimizer
        if not hasattr(opt, "worst_case_state_bytes"):
            return {}
        ranks = sorted(opt.ranks().values())
        group = next(g for g in opt.param_groups if g["lowrank"])
        return {
            "optimizer_rank_cap": group["rank"],
            "optimizer_rank_min": ranks[0] if ranks else None,
            "optimizer_rank_median": ranks[len(ranks) // 2] if ranks else None,
            "optimizer_rank_max": ranks[-1] if ranks else None,
            "projected_weights": len(group["params"]),
            "optimizer_worst_bytes": opt.worst_case_state_bytes(),
        }

    def subspace_refreshes(self) -> int | None:
        """Subspace refreshes so far, summed over projected weights (None: not low-rank)."""
        if not hasattr(self.optimizer, "worst_case_state_bytes"):
            return None
        return sum(s.get("refreshes", 0) for s in self.optimizer.state.values())

    def optimizer_bytes(self) -> int:
        """Bytes of optimizer state tensors (after the first step has created them)."""
        import torch

        # AdamW's "step" counter is a host scalar on a GPU (not device memory), except for
        # fused or capturable AdamW, which keep it on the device (Adam._init_group)
        step_on_device = {
            id(p)
            for group in self.optimizer.param_groups
            if group.get("fused") or group.get("capturable")
            for p in group["params"]
        }
        seen, total = set(), 0
        for param, state in self.optimizer.state.items():
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if name == "step" and id(param) not in step_on_device:
                    continue
                if getattr(value, "is_paged", False):
                    continue  # cudaMallocManaged pages: `paged_optimizer_bytes`
                key = value.untyped_storage()._cdata
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
        return total

    def paged_optimizer_bytes(self) -> int:
        """Optimizer state in cudaMallocManaged pages (paged bitsandbytes optimizers), which the
        caching allocator does not count and NVML does (`methods.optimizers`)."""
        from velora_cli.methods.optimizers import paged_bytes

        return paged_bytes(self.optimizer)


def enable_checkpointing(
    model: nn.Module,
    every_n: int,
    *,
    recompute_context=None,
    reentrant: bool = False,
    sac: str | None = None,
) -> None:
    """Gradient checkpointing of every ``every_n``-th decoder layer, as transformers enables it
    with ``gradient_checkpointing_kwargs={"use_reentrant": reentrant}``, or selectively (``sac``).

    Reentrant checkpointing (torch's ``CheckpointFunction``) runs the layer under ``no_grad``,
    saves its positional inputs, and recomputes the whole layer in backward; it passes gradients
    only when an input requires grad, so with frozen embeddings (LoRA, QLoRA) the embeddings'
    output is made to require grad (``enable_input_require_grads``, as transformers and peft do).

    Args:
        recompute_context: optional zero-argument callable returning a context manager entered
            around each recomputation (checkpoint restores real autocast itself; the estimate's
            emulation of CUDA, ``emulation.cuda_emulation``, must be restored this way).
        reentrant: torch's reentrant implementation instead of the non-reentrant one.
        sac: a selective checkpointing policy (`velora_cli.measure.selective`), or None; torch's
            selective checkpointing is non-reentrant only.
    """
    if sac is not None and reentrant:
        raise SpecError(
            "selective checkpointing (--sac) is non-reentrant only (torch's context_fn): "
            "drop --gc-reentrant"
        )
    kwargs: dict[str, Any] = {"use_reentrant": reentrant}
    if sac is not None:
        from velora_cli.measure.selective import SacError, sac_context_fn

        try:
            kwargs["context_fn"] = sac_context_fn(model, sac, recompute_context)
        except SacError as exc:
            raise SpecError(str(exc)) from None
    elif recompute_context is not None and not reentrant:
        kwargs["context_fn"] = lambda: (contextlib.nullcontext(), recompute_context())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n
        )
    elif hasattr(base, "gradient_checkpointing_enable"):
        if every_n != 1:
            raise SpecError(
                "checkpointing every n-th layer needs transformers >= 5; use --gc-every 1"
            )
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise SpecError(f"{type(base).__name__} does not support gradient checkpointing")
    if reentrant and recompute_context is not None:
        _recompute_in(base, recompute_context)
    # transformers >= 5 registers this hook itself; a second one would replace the handle to the
    # first, which could then never be removed (a model reused for another row must come back
    # as it was)
    registered = getattr(base, "_require_grads_hooks", None) or getattr(
        base, "_require_grads_hook", None
    )
    if (
        hasattr(base, "enable_input_require_grads")
        and not registered
        and not any(p.requires_grad for p in base.get_input_embeddings().parameters())
    ):
        base.enable_input_require_grads()  # frozen embeddings (LoRA): keep checkpoints in graph


def _recompute_in(model: nn.Module, recompute_context) -> None:
    """Enter ``recompute_context()`` around each reentrant recomputation of ``model``'s layers.

    torch's reentrant checkpoint takes no ``context_fn``, and its recomputation runs in the
    autograd engine, where the step's torch-function modes are not active (checked on torch 2.13:
    ``torch._C._is_torch_function_mode_enabled()`` is False there); so each layer's checkpoint
    function is wrapped to enter the context when it runs inside backward.
    """
    import torch

    def wrap(checkpoint_func):
        def run(function, *args, **kwargs):
            def body(*inner, **inner_kwargs):
                if torch._C._current_graph_task_id() == -1:  # the forward pass
                    return function(*inner, **inner_kwargs)
                with recompute_context():  # the recomputation, in backward
                    return function(*inner, **inner_kwargs)

            return checkpoint_func(body, *args, **kwargs)

        return run

    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = wrap(func)


def _apply_lora(model: nn.Module, spec: StepSpec) -> nn.Module:
    try:
        import peft
    except ImportError as exc:
        raise SpecError(
            f"--mode {spec.mode} needs peft: pip install 'velora-cli[{spec.mode}]'"
        ) from exc
    targets: str | list[str] = spec.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in spec.lora_targets.split(",") if t.strip()]
    # a classification or QA head is new: trained whole, as PEFT's task types do it (SEQ_CLS and
    # TOKEN_CLS save "classifier"/"score", QUESTION_ANS "qa_outputs"; its ViT recipe "classifier")
    heads = [n for n in ("classifier", "score", "qa_outputs") if hasattr(model, n)]
    config = peft.LoraConfig(
        r=spec.lora_rank,
        lora_alpha=2 * spec.lora_rank,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=heads or None,
    )
    if spec.mode == "qlora":
        from velora_cli.methods.quant import register_lora_layers

        register_lora_layers(config)  # meta stand-ins get peft's 4-bit LoRA forward
    # On meta, peft creates the adapters there directly instead of initializing them on the CPU
    # first (same dtypes; a second less per 7B estimate).
    meta = next(model.parameters()).device.type == "meta"
    try:
        return peft.get_peft_model(model, config, low_cpu_mem_usage=meta)
    except ValueError as exc:
        raise SpecError(f"--lora-targets {spec.lora_targets!r}: {exc}") from None


@dataclass(frozen=True)
class BatchShape:
    """What a task's micro-batch holds besides its size (`batch_shape` reads it from the config).

    ``task`` is one of `models.TASKS`; ``labels`` the number of classes of a classification head;
    ``image`` (channels, height, width) of ``pixel_values`` for image classification, cut into
    ``patches`` patches.
    """

    task: str = "causal-lm"
    labels: int = 2
    image: tuple[int, int, int] | None = None
    patches: int = 0

    def tokens(self, seq_len: int) -> int:
        """Tokens per example: ``seq_len``, or an image's patches plus its CLS token."""
        return seq_len if self.image is None else self.patches + 1


def batch_shape(model_spec: ModelSpec) -> BatchShape:
    """The micro-batch a model's task trains on, from its config.

    Image classifiers (ViT and friends) take ``pixel_values`` of the config's ``image_size``
    with ``num_channels``; their tokens are the patches (``(image_size / patch_size)^2``) plus CLS.
    """
    config = model_spec.config
    task = model_spec.task
    if task != "image-classification":
        return BatchShape(task, labels=getattr(config, "num_labels", 2))
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch = getattr(vision, "patch_size", 16)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return BatchShape(
        task,
        labels=config.num_labels,
        image=(vision.num_channels, height, width),
        patches=(height // patch_h) * (width // patch_w),
    )


def for_task(spec: StepSpec, model_spec: ModelSpec) -> tuple[StepSpec, str | None]:
    """``spec`` with the sequence length its task trains on, and a line saying so if it changed.

    An image classifier's tokens are its patches and CLS, fixed by the config's image size:
    ``--seq-len`` does not apply, and tokens per second count those tokens.
    """
    inputs = batch_shape(model_spec)
    tokens = inputs.tokens(spec.seq_len)
    if tokens == spec.seq_len:
        return spec, None
    _channels, height, width = inputs.image
    return dataclasses.replace(spec, seq_len=tokens), (
        f"{model_spec.task}: each {height}×{width} image is {inputs.patches} patches + CLS = "
        f"{tokens} tokens (--seq-len does not apply)"
    )


def make_batch(
    spec: StepSpec, vocab_size: int | None, device, inputs: BatchShape | None = None
) -> list[dict]:
    """Random inputs (seeded), full length, no padding, with the labels of the task's loss.

    Language models get token ids and an all-ones attention mask, as the HF Trainer passes:
    transformers reduces it to plain attention (and, on meta, it keeps transformers from probing
    position ids for packed sequences, which would read tensor values). Labels, as the HF heads
    take them: causal and masked LM ``labels = input_ids`` (every position scored); sequence
    classification one class per example (B,); token classification one per token (B, N);
    question answering ``start_positions`` and ``end_positions`` (B,); image classification
    ``pixel_values`` (B, C, H, W) in fp32, as a data loader gives them, and a class per image.
    With ``spec.padding`` the first example's last token is padding (on meta the mask has no
    values: `emulation.attention.padded_batches` tells the mask functions).
    """
    import torch

    inputs = inputs or BatchShape()
    micro = spec.batch_size // spec.grad_accum_steps
    if micro * spec.grad_accum_steps != spec.batch_size:
        raise SpecError(
            f"batch size {spec.batch_size} is not a multiple of {spec.grad_accum_steps} "
            "accumulation steps"
        )
    meta = torch.device(device).type == "meta"
    batches = []
    for i in range(spec.grad_accum_steps):
        gen = torch.Generator().manual_seed(spec.seed + i)

        def ints(high: int, *shape: int, gen: torch.Generator = gen) -> torch.Tensor:
            if meta:
                return torch.empty(*shape, dtype=torch.long, device="meta")
            return torch.randint(0, high, shape, generator=gen).to(device)

        if inputs.image is not None:
            if spec.padding or spec.packing:
                flag = "--padding" if spec.padding else "--packing"
                raise SpecError(f"{flag}: images are neither padded nor packed; leave it out")
            shape = (micro, *inputs.image)
            pixels = (
                torch.empty(shape, device="meta")
                if meta
                else torch.randn(shape, generator=gen).to(device)
            )
            batches.append({"pixel_values": pixels, "labels": ints(inputs.labels, micro)})
            continue
        if spec.packing:
            batches.append(
                _packed_batch(spec, inputs.task, ints(vocab_size, 1, spec.real_tokens()))
            )
            continue
        ids = ints(vocab_size, micro, spec.seq_len)
        mask = torch.ones_like(ids) if not meta else torch.empty_like(ids)
        if spec.padding and not meta and spec.lengths is not None:
            for row, length in enumerate(spec.lengths):
                mask[row, length:] = 0  # right padding, as the collators pad
        elif spec.padding and not meta:
            mask[0, -1] = 0  # the worst padded batch: one pad token (meta: `padded_batches`)
        batch = {"input_ids": ids, "attention_mask": mask}
        if inputs.task == "sequence-classification":
            batch["labels"] = ints(inputs.labels, micro)
        elif inputs.task == "token-classification":
            batch["labels"] = ints(inputs.labels, micro, spec.seq_len)
        elif inputs.task == "question-answering":
            batch["start_positions"] = ints(spec.seq_len, micro)
            batch["end_positions"] = ints(spec.seq_len, micro)
        else:
            batch["labels"] = ids
        batches.append(batch)
    return batches


def _packed_batch(spec: StepSpec, task: str, ids: torch.Tensor) -> dict:
    """A packed micro-batch, as `DataCollatorWithFlattening` and TRL's ``padding_free`` collator
    give it: the sequences in one (1, T) row, ``position_ids`` restarting at each, no attention
    mask, ``labels = input_ids`` (the collators set each sequence's first label to -100; the
    shape is the same). Without ``spec.lengths`` the row is ``micro`` packing bins of
    ``seq_len`` (TRL ``packing=True``), each holding two sequences here: where they restart
    changes values, not sizes, as long as the row holds more than one (then transformers builds
    its packed mask). On meta ``position_ids`` has no values: `padded_batches` says the row packs.
    """
    import torch

    if task != "causal-lm":
        raise SpecError(
            f"--packing: packed rows train causal language models (DataCollatorWithFlattening, "
            f"TRL), not {task}; leave --packing out"
        )
    if ids.device.type == "meta":
        positions = torch.empty_like(ids)
    else:
        lengths = list(spec.lengths or ())
        if not lengths:
            half = spec.seq_len // 2
            lengths = [n for _ in range(spec.micro_batch) for n in (half, spec.seq_len - half) if n]
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(ids.device)
    return {"input_ids": ids, "position_ids": positions, "labels": ids}


def check_seq_len(spec: StepSpec, model_spec: ModelSpec) -> None:
    """Raise SpecError when ``spec.seq_len`` exceeds the model's position table."""
    max_pos = getattr(model_spec.config, "max_position_embeddings", None)
    if max_pos and spec.seq_len > max_pos:
        raise SpecError(
            f"--seq-len {spec.seq_len} exceeds {spec.model}'s max_position_embeddings ({max_pos})"
        )
    _check_sizes(spec, model_spec.config)


def prepare(
    spec: StepSpec,
    device: str,
    *,
    attn_implementation: str | None = None,
    model_spec: ModelSpec | None = None,
) -> Prepared:
    """Build the model for ``spec`` on ``device`` (``cpu``, ``cuda`` or ``meta``) with its
    strategy applied, an optimizer over the trainable parameters, and the batch.

    Args:
        attn_implementation: what this device runs for SDPA (the cuda backend "sdpa", cpu and
            meta the estimate's attention); ``spec.attn`` eager or flash_attention_2 replaces
            it with that kernel (`emulation.attention.attention_implementation`).
        model_spec: the resolved model to build instead of resolving ``spec.model`` (the
            estimate's depth shortcut builds the same architecture with fewer layers).
    """
    import torch

    from velora_cli.models import build_model, resolve_model
    from velora_cli.models.spec import with_task

    check_device(spec, device)
    if model_spec is None:
        model_spec = resolve_model(spec.model, trust_remote_code=spec.trust_remote_code)
    if model_spec is not None:
        model_spec = with_task(model_spec, spec.task)
    else:
        model_spec = resolve_model(
            spec.model, trust_remote_code=spec.trust_remote_code, task=spec.task
        )
    check_seq_len(spec, model_spec)
    if spec.repeat_kv:
        # K/V repeated before SDPA: the estimate's attention repeats them, then (on a GPU) runs
        # transformers' SDPA on the repeated copies
        from velora_cli.emulation.attention import register_estimate_attention

        attn_implementation = register_estimate_attention(repeat_kv=True)
    if spec.attn not in ("auto", "sdpa"):
        # the caller's choice is what this device runs for SDPA; --attn picks another kernel
        from velora_cli.emulation.implementations import attention_implementation

        try:
            attn_implementation = attention_implementation(spec.attn, torch.device(device).type)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    weight_dtype = torch.float32 if spec.amp else torch_dtype(spec.dtype)
    model = build_model(
        model_spec,
        device=device,
        dtype=weight_dtype,
        # a meta build holds shapes only, which come from the config: weights are loaded where
        # a step runs on real tensors (cpu, cuda), never for an estimate
        weights=spec.weights and torch.device(device).type != "meta",
        attn_implementation=attn_implementation,
        trust_remote_code=spec.trust_remote_code,
    )
    if spec.mode == "qlora":
        from velora_cli.methods.quant import prepare_for_kbit_training, quant_config, quantize_base

        # frozen base linears -> 4-bit NF4 (meta: stand-ins)
        quantize_base(model, device, quant_config(spec))
        if spec.kbit_prepare:
            prepare_for_kbit_training(model)
    if spec.mode in ("lora", "qlora"):
        model = _apply_lora(model, spec)
    wrapped = apply_strategy(model, spec, device)
    from velora_cli.measure.trainers import TrainerUnavailable, patch_model

    try:
        patch_model(model, spec.trainer)  # trl: SFTTrainer's fused LM head
    except (TrainerUnavailable, ValueError) as exc:
        raise SpecError(str(exc)) from None
    if spec.trainer == "hf":  # the model's own loss, as the run's transformers computed it
        from velora_cli.measure.loss_path import apply_loss_path

        use_cache = bool(getattr(model_spec.config.get_text_config(), "use_cache", False))
        apply_loss_path(model, model_spec.task, spec.transformers_version, use_cache)
    model.train()
    optimizer = build_optimizer(
        spec.optimizer,
        model,
        lr=1e-5,
        rank=spec.rank,
        update_gap=spec.update_gap,
        eta=spec.eta,
        seed=spec.seed,
    )
    vocab_size = getattr(model_spec.config.get_text_config(), "vocab_size", None)
    inputs = batch_shape(model_spec)
    batches = make_batch(spec, vocab_size, device, inputs)
    gcpause.resume()  # the imports are done: the CLI's collector back on (velora_cli.gcpause)
    return Prepared(
        spec,
        model,
        optimizer,
        batches,
        wrapped,
        torch.device(device),
        model_spec.notice,
        vocab_size,
        inputs=inputs,
    )


def _check_sizes(spec: StepSpec, config) -> None:
    """Refuse steps whose largest activation could not exist: its element count must fit int64.

    The widest per-token tensor is the logits (vocabulary) or the MLP's inner activation.
    """
    text = config.get_text_config()
    widest = max(
        getattr(text, name, None) or 1
        for name in ("vocab_size", "hidden_size", "intermediate_size")
    )
    tokens = (spec.batch_size // spec.grad_accum_steps) * spec.seq_len
    if tokens * widest > MAX_ELEMENTS:
        raise SpecError(
            f"--batch-size {spec.batch_size} × --seq-len {spec.seq_len}: one micro-batch's "
            f"{tokens:,} tokens × {widest:,} (the widest activation, e.g. the logits) is more than "
            "torch can index in one tensor (2^63 elements); give realistic sizes"
        )


def apply_strategy(model: nn.Module, spec: StepSpec, device: str) -> list[str]:
    """Apply ``spec.strategy`` to a built model in place: VeLoRA, then checkpointing (selective
    or not), then activation offload.

    Returns:
        The qualified names of the layers VeLoRA wrapped (empty without a placement).
    """
    from velora_cli.methods.placement import apply_velora

    wrapped: list[str] = []
    strategy = spec.strategy
    if strategy.placement:
        wrapped = apply_velora(
            model,
            strategy.placement,
            sub_token_size=strategy.sub_token_size,
            num_groups=strategy.num_groups,
            init=spec.init,
            seed=spec.seed,
        )
    if strategy.gc_every:
        recompute_context = None
        if device == "meta":  # the step's emulation of CUDA is not active in a recomputation
            from velora_cli.emulation.step import cuda_emulation

            recompute_context = functools.partial(cuda_emulation, spec.amp, spec.torch_version)
        enable_checkpointing(
            model,
            strategy.gc_every,
            recompute_context=recompute_context,
            reentrant=spec.gc_reentrant,
            sac=strategy.sac,
        )
    if strategy.offload:
        from velora_cli.measure.host_offload import enable_offload

        try:
            enable_offload(model, strategy.offload)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    return wrapped


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    rank: int | None = None,
    update_gap: int = 200,
    eta: float = 0.9,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters, as every step measures it.

    ``adamw`` and ``sgd`` (momentum 0.9) with ``foreach=True`` (CUDA's default implementation, so
    every backend runs, and the estimate predicts, the same optimizer temporaries); the HF
    Trainer's names (fused/for-loop AdamW, bitsandbytes, Adafactor) from
    `velora_cli.methods.optimizers`; galore and adarankgrad from `velora_cli.methods.lowrank`,
    ``rank`` None meaning the model's hidden size / 4.

    Raises:
        SpecError: an unknown name, a low-rank optimizer without a rank for a model with no
            ``config.hidden_size``, or a setting out of range.
    """

    params = [p for p in model.parameters() if p.requires_grad]
    if name not in LOWRANK_OPTIMIZERS:
        from velora_cli.methods import optimizers

        try:
            return optimizers.make(name, params, lr=lr)
        except optimizers.OptimizerError as exc:
            raise SpecError(str(exc)) from None
    from velora_cli.methods import lowrank

    if rank is None:
        config = getattr(model, "config", None)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()  # multimodal: the language model's
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise SpecError(
                f"{name} needs a rank: give --rank (the model has no config.hidden_size to "
                "take a quarter of)"
            )
        rank = lowrank.default_rank(hidden)
    try:
        return lowrank.make_optimizer(
            name, model, lr=lr, rank=rank, update_gap=update_gap, eta=eta, seed=seed
        )
    except lowrank.LowRankError as exc:
        raise SpecError(str(exc)) from None


def train_step(prepared: Prepared, *, forward_context=None, phase=None) -> None:
    """One optimizer step over all micro-batches.

    Args:
        forward_context: optional zero-argument callable returning a context manager entered
            around the *first* micro-batch's forward pass (e.g. a saved-tensor counter).
        phase: optional callable name -> context manager marking the phases (the tracker's
            ``phase``): ``forward_backward`` around all micro-batches, ``forward`` (with the
            loss) and ``backward`` within it for each micro-batch, then ``optimizer`` (the step)
            and ``zero_grad``.
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    import torch

    from velora_cli.measure.trainers import loss_of

    spec = prepared.spec
    device_type = prepared.device.type
    # On meta, autocast does nothing: the estimate backend wraps the step in its emulation,
    # and this marks the region torch.autocast would cover (its weight-cast cache lives in it).
    if spec.amp and device_type == "meta":
        from velora_cli.emulation.amp import autocast_region as amp
    elif spec.amp:
        amp = functools.partial(torch.autocast, device_type, dtype=torch_dtype(spec.amp))
    else:
        amp = contextlib.nullcontext
    with phase("forward_backward"):
        for i, batch in enumerate(prepared.micro_batches):
            ctx = forward_context() if (forward_context and i == 0) else contextlib.nullcontext()
            with phase("forward"):
                with ctx, amp():
                    if spec.keep_outputs:  # the loop holds the logits until the next step
                        outputs = prepared.model(**batch)
                        loss = outputs.loss
                    else:
                        loss = loss_of(prepared.model, batch, spec.trainer, spec.amp)
                if spec.grad_accum_steps > 1:
                    loss = loss / spec.grad_accum_steps
            with phase("backward"):
                loss.backward()
                del loss
    with phase("optimizer"):
        prepared.optimizer.step()
    if spec.keep_outputs:
        del outputs  # held through the optimizer step, freed before the next step's zero_grad
    with phase("zero_grad"):
        prepared.optimizer.zero_grad(set_to_none=spec.zero_grad_set_to_none)
