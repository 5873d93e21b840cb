"""Meta models built once and reused from row to row: the estimate's first shortcut.

A row's strategy only wraps layers (VeLoRA) and sets flags (checkpointing); the model, its peft
adapters, its 4-bit stand-ins and its optimizer are the same for every row of one training setup
(model, precision, mode, LoRA settings, optimizer). `MetaModels` builds each setup once on the
meta device (at the real depth or, for the depth shortcut, with fewer layers), runs the warm-up
step once (it creates the optimizer state every tracked step starts from), and for each row
applies the strategy, hands the prepared step to the caller and takes the strategy off again.
What the reference path's per-row warm-up step did besides creating optimizer state is only
VeLoRA's first-batch init of ``v``, which on meta writes no value into the same storage:
`settle_velora` marks it done.

Reuse must not change a row by a byte, so what a row could leave behind is checked after every
row (`_fingerprint`): the module tree (types, hooks, training and checkpointing flags), the
parameters (identity, requires_grad, no gradient left), the buffers, the optimizer's parameters
and state tensors (names, shapes, dtypes), and torch's global module and optimizer hooks. A
setup whose check fails is dropped and built afresh for the next row. The tests compare reused
rows with fresh builds (`EstimateBackend(shortcuts=False)`) byte for byte.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from velora_cli.measure.train_step import Prepared, StepSpec, Strategy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from velora_cli.models import ModelSpec

T = TypeVar("T")


@dataclass
class _Setup:
    """One built and warmed-up meta model with its optimizer, and how it looked when clean."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    vocab_size: int
    notice: str | None
    fingerprint: tuple
    warmed: bool = False
    inputs: Any = None  # the task's `BatchShape`


def setup_key(spec: StepSpec) -> StepSpec:
    """What a built model depends on: ``spec`` without its strategy and batch shape."""
    return dataclasses.replace(
        spec, batch_size=1, seq_len=1, grad_accum_steps=1, strategy=Strategy(), lengths=None
    )


class MetaModels:
    """Meta models by (setup, model spec), built and warmed up once, reused for every row.

    Example:
        >>> models = MetaModels(attn_implementation=register_estimate_attention())
        >>> row = models.run(spec, resolved, lambda prepared: observe(prepared, breakdown=False))

    Args:
        attn_implementation: the attention every model is built with.
        warmup: warm-up steps run once per built model (the reference path runs them per row).
        micro_batches: micro-batches each row's step runs (the estimate runs two at most).
        step_context: zero-argument callable returning the context the warm-up runs in (the
            estimate's autocast emulation), given the spec.
        capacity: models kept; the least recently used one is dropped beyond it. A tune with
            three optimizers in full mode and checkpointing every 2 uses 3 × 5 shallow models
            and the real ones; a meta model holds no tensor data (a 70B QLoRA one measured
            ~24 MiB of Python objects here, a 70B full one ~80-120 MiB).
    """

    def __init__(
        self,
        *,
        attn_implementation: str | None,
        warmup: int = 1,
        micro_batches: int = 2,
        step_context: Callable[[StepSpec], Any] | None = None,
        capacity: int = 24,
    ) -> None:
        self.attn_implementation = attn_implementation
        self.warmup = warmup
        self.micro_batches = micro_batches
        self.step_context = step_context
        self.capacity = capacity
        self._setups: OrderedDict[tuple, _Setup] = OrderedDict()
        self.builds = 0  # models built so far (tests check reuse with it)
        self.dropped = 0  # setups dropped because a row left something behind

    def run(
        self,
        spec: StepSpec,
        model_spec: ModelSpec,
        body: Callable[[Prepared], T],
        *,
        step: bool = True,
    ) -> T:
        """Run ``body`` on the prepared step of ``spec`` built from ``model_spec``.

        Args:
            spec: the row's step (its strategy is applied for the call and removed after).
            model_spec: the resolved model (the real one, or one with fewer layers).
            body: what to do with the prepared step (e.g. a tracked step).
            step: ``body`` runs training steps, so the model is warmed up first (once); False
                for a body that only looks at the model.

        Returns:
            What ``body`` returned.

        Raises:
            SpecError, PlacementError, SubTokenSizeError, ModelError: as `prepare` raises them.
        """
        import torch

        from velora_cli.measure.train_step import apply_strategy, check_seq_len, make_batch

        check_seq_len(spec, model_spec)
        key = (setup_key(spec), model_spec.name, _depth_of(model_spec))
        setup = self._setups.get(key)
        if setup is None:
            setup = self._build(spec, model_spec)
            self._setups[key] = setup
            while len(self._setups) > self.capacity:
                self._setups.popitem(last=False)
        self._setups.move_to_end(key)
        if step and not setup.warmed:
            self._warm_up(setup, spec)
        model = setup.model
        try:
            wrapped = apply_strategy(model, spec, "meta")
            settle_velora(model)
            batches = make_batch(spec, setup.vocab_size, "meta", setup.inputs)
            batches = batches[: self.micro_batches]
            prepared = Prepared(
                spec,
                model,
                setup.optimizer,
                batches,
                wrapped,
                torch.device("meta"),
                setup.notice,
                setup.vocab_size,
                inputs=setup.inputs,
            )
            return body(prepared)
        finally:
            remove_strategy(model)
            # a failed step may leave gradients; a loop that zeroes them in place keeps them
            setup.optimizer.zero_grad(set_to_none=spec.zero_grad_set_to_none)
            if _fingerprint(model, setup.optimizer) != setup.fingerprint:
                self._setups.pop(key, None)
                self.dropped += 1

    def _build(self, spec: StepSpec, model_spec: ModelSpec) -> _Setup:
        from velora_cli.measure.train_step import prepare

        base = dataclasses.replace(spec, strategy=Strategy())
        prepared = prepare(
            base, "meta", attn_implementation=self.attn_implementation, model_spec=model_spec
        )
        self.builds += 1
        return _Setup(
            prepared.model,
            prepared.optimizer,
            prepared.vocab_size,
            prepared.notice,
            _fingerprint(prepared.model, prepared.optimizer),
            inputs=prepared.inputs,
        )

    def _warm_up(self, setup: _Setup, spec: StepSpec) -> None:
        """The reference path's warm-up steps, once: they create the optimizer state."""
        import contextlib

        import torch

        from velora_cli.measure.train_step import make_batch, train_step

        base = dataclasses.replace(spec, strategy=Strategy())
        batches = make_batch(base, setup.vocab_size, "meta", setup.inputs)[: self.micro_batches]
        prepared = Prepared(
            base, setup.model, setup.optimizer, batches, [], torch.device("meta"),
            setup.notice, setup.vocab_size, inputs=setup.inputs,
        )  # fmt: skip
        context = self.step_context(spec) if self.step_context else contextlib.nullcontext()
        with context:
            for _ in range(self.warmup):
                train_step(prepared)
        setup.fingerprint = _fingerprint(setup.model, setup.optimizer)
        setup.warmed = True


def _depth_of(model_spec: ModelSpec) -> int | None:
    config = model_spec.config.get_text_config()
    return getattr(config, "num_hidden_layers", None)


def settle_velora(model: nn.Module) -> None:
    """Mark meta VeLoRA layers' ``v`` as initialized, as the warm-up step's first forward does.

    With ``batch_average_once`` the first training forward writes normalize(mean of sub-tokens)
    into ``v`` in place (``copy_``): on meta no value is written and the storage stays the same,
    so the tracked step that follows is the same step whether that forward ran or not. Real
    tensors are left alone (their ``v`` needs the batch).
    """
    from velora_cli.methods.velora import is_velora

    for module in model.modules():
        meta = is_velora(module) and module.v.device.type == "meta"
        if meta and module.init == "batch_average_once":
            module._v_ready = True


def remove_strategy(model: nn.Module) -> None:
    """Undo `apply_strategy`: checkpointing off (and its input-grad hook, selective
    checkpointing's and activation offload's hooks), VeLoRA layers back to plain ones holding the
    same parameters."""
    from velora_cli.measure.host_offload import remove_offload
    from velora_cli.measure.selective import remove_sac
    from velora_cli.methods.placement import remove_velora

    remove_sac(model)
    remove_offload(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_disable"):  # transformers >= 5
        if base.is_activation_checkpointing:
            base.activation_checkpointing_disable()
    elif getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
    remove_velora(model)


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return tuple(len(getattr(module, name, ())) for name in names)


def _fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """Everything a row could leave behind on a reused model (see the module docstring)."""
    import torch
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    modules = tuple(
        (name, type(m), m.training, getattr(m, "gradient_checkpointing", None), _hook_counts(m))
        for name, m in model.named_modules()
    )
    params = tuple(
        (name, id(p), p.requires_grad, p.grad is None) for name, p in model.named_parameters()
    )
    buffers = tuple((name, id(b), b.dtype) for name, b in model.named_buffers())
    groups = tuple(tuple(id(p) for p in group["params"]) for group in optimizer.param_groups)
    state = tuple(
        (id(p), tuple(
            (k, tuple(v.shape), v.dtype) for k, v in s.items() if isinstance(v, torch.Tensor)
        ))
        for p, s in optimizer.state.items()
    )  # fmt: skip
    hooks = tuple(
        len(getattr(module, name, ()))
        for module, name in (
            (nn_module, "_global_forward_hooks"),
            (nn_module, "_global_forward_pre_hooks"),
            (nn_module, "_global_backward_hooks"),
            (nn_module, "_global_backward_pre_hooks"),
            (optim_module, "_global_optimizer_pre_hooks"),
            (optim_module, "_global_optimizer_post_hooks"),
        )
    )
    return modules, params, buffers, groups, state, hooks
