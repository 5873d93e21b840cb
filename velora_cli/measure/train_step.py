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

if TYPE_CHECKING:
    import torch
    from torch import nn

    from velora_cli.models import ModelSpec

DTYPES = ("fp32", "bf16", "fp16")
AMP = ("bf16", "fp16")
MODES = ("full", "lora", "qlora")  # qlora: 4-bit NF4 frozen base + LoRA (quant.py)
OPTIMIZERS = ("adamw", "sgd", "galore", "adarankgrad")
LOWRANK_OPTIMIZERS = (
    "galore",
    "adarankgrad",
)  # velora_cli.methods.lowrank: full-parameter training only
# torch indexes a tensor's elements with int64: no step may hold a tensor with more elements.
MAX_ELEMENTS = 2**63 - 1
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

    def __post_init__(self):
        errors = []
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
            errors.append(f"--optimizer {self.optimizer!r}: choose {'|'.join(OPTIMIZERS)}")
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
        from velora_cli.measure.layout import layout_errors

        errors += layout_errors(self)
        if errors:
            raise SpecError("; ".join(errors))

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

        return describe(self.mode, self.dtype, self.amp).text

    def with_strategy(self, strategy: Strategy) -> StepSpec:
        return dataclasses.replace(self, strategy=strategy)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepSpec:
        data = dict(data)
        data["strategy"] = Strategy(**data.get("strategy", {}))
        return cls(**data)


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

    def next_batch(self) -> None:
        """Replace the micro-batches with new random ones of the same shapes.

        Timed steps use a new batch each, as training does: memory does not depend on the
        values, but a low-rank optimizer does (AdaRankGrad refreshes its subspace when the
        projected gradient stops changing, which one repeated batch would fake).
        """
        self.batches_drawn += 1
        seed = self.spec.seed + self.batches_drawn * self.spec.grad_accum_steps
        self.micro_batches = make_batch(
            dataclasses.replace(self.spec, seed=seed), self.vocab_size, self.device
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

        seen, total = set(), 0
        for state in self.optimizer.state.values():
            for name, value in state.items():
                # AdamW's "step" counter is a host scalar even on a GPU: not device memory.
                if isinstance(value, torch.Tensor) and name != "step":
                    key = value.untyped_storage()._cdata
                    if key not in seen:
                        seen.add(key)
                        total += value.untyped_storage().nbytes()
        return total


def enable_checkpointing(
    model: nn.Module, every_n: int, *, recompute_context=None, sac: str | None = None
) -> None:
    """Non-reentrant gradient checkpointing of every ``every_n``-th decoder layer.

    Args:
        recompute_context: optional zero-argument callable returning a context manager entered
            around each recomputation (checkpoint restores real autocast itself; the estimate's
            emulation of CUDA, ``emulation.cuda_emulation``, must be restored this way).
        sac: a selective checkpointing policy (`velora_cli.measure.selective`), or None.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if sac is not None:
        from velora_cli.measure.selective import SacError, sac_context_fn

        try:
            kwargs["context_fn"] = sac_context_fn(model, sac, recompute_context)
        except SacError as exc:
            raise SpecError(str(exc)) from None
    elif recompute_context is not None:
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
    config = peft.LoraConfig(
        r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_dropout=0.0, target_modules=targets
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


def make_batch(spec: StepSpec, vocab_size: int, device) -> list[dict]:
    """Random token ids (seeded), full length, no padding: labels = inputs.

    An all-ones attention mask is passed, as the HF Trainer does: transformers reduces it to plain
    causal attention (and, on meta, it keeps transformers from probing position ids for packed
    sequences, which would read tensor values).
    """
    import torch

    micro = spec.batch_size // spec.grad_accum_steps
    if micro * spec.grad_accum_steps != spec.batch_size:
        raise SpecError(
            f"batch size {spec.batch_size} is not a multiple of {spec.grad_accum_steps} "
            "accumulation steps"
        )
    batches = []
    for i in range(spec.grad_accum_steps):
        if torch.device(device).type == "meta":
            ids = torch.empty(micro, spec.seq_len, dtype=torch.long, device="meta")
        else:
            gen = torch.Generator().manual_seed(spec.seed + i)
            ids = torch.randint(0, vocab_size, (micro, spec.seq_len), generator=gen).to(device)
        mask = torch.ones_like(ids) if ids.device.type != "meta" else torch.empty_like(ids)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return batches


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
        model_spec: the resolved model to build instead of resolving ``spec.model`` (the
            estimate's depth shortcut builds the same architecture with fewer layers).
    """
    import torch

    from velora_cli.models import build_model, resolve_model

    if model_spec is None:
        model_spec = resolve_model(spec.model, trust_remote_code=spec.trust_remote_code)
    check_seq_len(spec, model_spec)
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
        from velora_cli.methods.quant import quantize_base

        quantize_base(model, device)  # frozen base linears -> 4-bit NF4 (meta: stand-ins)
    if spec.mode in ("lora", "qlora"):
        model = _apply_lora(model, spec)
    wrapped = apply_strategy(model, spec, device)
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
    vocab_size = model_spec.config.get_text_config().vocab_size
    batches = make_batch(spec, vocab_size, device)
    return Prepared(
        spec,
        model,
        optimizer,
        batches,
        wrapped,
        torch.device(device),
        model_spec.notice,
        vocab_size,
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

            recompute_context = functools.partial(cuda_emulation, spec.amp)
        enable_checkpointing(
            model, strategy.gc_every, recompute_context=recompute_context, sac=strategy.sac
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

    AdamW and SGD (momentum 0.9) with ``foreach=True`` (CUDA's default implementation, so every
    backend runs, and the estimate predicts, the same optimizer temporaries); galore and
    adarankgrad from `velora_cli.methods.lowrank`, ``rank`` None meaning the model's hidden size / 4.

    Raises:
        SpecError: an unknown name, a low-rank optimizer without a rank for a model with no
            ``config.hidden_size``, or a setting out of range.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    if name not in LOWRANK_OPTIMIZERS:
        raise SpecError(f"--optimizer {name!r}: choose {'|'.join(OPTIMIZERS)}")
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

    spec = prepared.spec
    device_type = prepared.device.type
    # On meta, autocast does nothing: the estimate backend wraps the step in its emulation.
    amp = (
        torch.autocast(device_type, dtype=torch_dtype(spec.amp))
        if spec.amp and device_type != "meta"
        else contextlib.nullcontext()
    )
    with phase("forward_backward"):
        for i, batch in enumerate(prepared.micro_batches):
            ctx = forward_context() if (forward_context and i == 0) else contextlib.nullcontext()
            with phase("forward"):
                with ctx, amp:
                    loss = prepared.model(**batch).loss
                if spec.grad_accum_steps > 1:
                    loss = loss / spec.grad_accum_steps
            with phase("backward"):
                loss.backward()
                del loss
    with phase("optimizer"):
        prepared.optimizer.step()
    with phase("zero_grad"):
        prepared.optimizer.zero_grad(set_to_none=True)
