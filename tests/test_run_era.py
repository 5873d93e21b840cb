"""What a run held that the estimate missed, found on the HF guide's BERT runs (issue 23):

- gradients zeroed in place (``zero_grad(set_to_none=False)``: torch < 2.0's default, the
  Trainer's ``model.zero_grad()`` before transformers 4.27) stay allocated through the next step;
- torch < 1.11 saved softmax's input for backward;
- autocast keeps the half cast of every trained fp32 weight until its region ends, which
  checkpointing makes visible.

Each is checked against real torch on CPU where the installed torch can run it (autocast's cache,
zero_grad), else against the count its source gives (softmax before 1.11, cited below).
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from velora_cli.allocator.device_memory import first_step_grads
from velora_cli.emulation.amp import MetaAutocast, autocast_region
from velora_cli.emulation.softmax import MetaSoftmaxSavesInput, softmax_saves_input
from velora_cli.emulation.step import cuda_emulation
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.tracker import AllocationTrace, MemoryTracker
from velora_cli.measure.train_step import StepSpec

SHAPE = (2, 4, 16, 16)  # eager attention's (B, H, N, N) scores
NUMEL = 2 * 4 * 16 * 16


# -- softmax's saved input (torch < 1.11) ------------------------------------------------------


def test_softmax_saved_its_input_before_1_11():
    # pytorch#64000: derivatives.yaml had `self: _softmax_backward_data(grad, result, dim, self)`
    # (and the same for _log_softmax); #65242 / #66018 (landed 2021-10-01, after the 1.10
    # branch) save self.scalar_type() instead
    assert softmax_saves_input("1.10")
    assert softmax_saves_input("1.10.1+cu113")
    assert softmax_saves_input("1.9.0")
    assert not softmax_saves_input("1.11")
    assert not softmax_saves_input("2.0.1")
    assert not softmax_saves_input(None)
    assert not softmax_saves_input("nightly")


class Scores(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.empty(16, device="meta", dtype=dtype))

    def forward(self, x, fn):
        return fn(x * self.w)


def held_after_forward(fn, torch_version, dtype=torch.float32) -> tuple[int, torch.Tensor]:
    """Bytes live after the forward (what backward will need), and the output."""
    module = Scores(dtype)
    tracker = MemoryTracker(module, torch.optim.SGD(module.parameters(), lr=0.1), round_to=1)
    x = torch.empty(SHAPE, device="meta", dtype=dtype)
    with tracker, cuda_emulation(None, torch_version):
        out = module(x, fn)
        live = tracker.current_bytes
        out.float().sum().backward()  # the graph still runs backward
    return live, out


@pytest.mark.parametrize(
    "fn",
    [lambda s: F.softmax(s, dim=-1), lambda s: torch.log_softmax(s, -1), lambda s: s.softmax(-1)],
)
def test_softmax_before_1_11_keeps_the_scores_for_backward(fn):
    # The scores (x * w) are freed after the softmax on torch >= 1.11 (SoftmaxBackward0 keeps
    # only its result); before, SoftmaxBackward kept them too: one more (B, H, N, N) tensor
    now, reference = held_after_forward(fn, None)
    then, out = held_after_forward(fn, "1.10")
    assert then - now == NUMEL * 4
    assert (out.shape, out.dtype) == (reference.shape, reference.dtype)


def test_an_fp32_softmax_of_bf16_scores_kept_the_fp32_copy_it_ran_on():
    # ATen's softmax(input, dim, dtype) converts first, then _softmax saves what it ran on
    fn = lambda s: F.softmax(s, dim=-1, dtype=torch.float32)  # noqa: E731
    now, _ = held_after_forward(fn, None, torch.bfloat16)
    then, out = held_after_forward(fn, "1.10", torch.bfloat16)
    assert then - now == NUMEL * 4  # the fp32 copy, not the bf16 scores
    assert out.dtype == torch.float32


def test_no_softmax_input_is_kept_without_grad():
    x = torch.empty(SHAPE, device="meta", requires_grad=True)
    with torch.no_grad(), MetaSoftmaxSavesInput():
        out = F.softmax(x, dim=-1)
    assert out.grad_fn is None


# -- autocast's weight-cast cache ------------------------------------------------------------


class _Casts(TorchDispatchMode):
    """Weak references to every cast of an (8, 8) tensor (the weight)."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (8, 8):
            self.refs.append(weakref.ref(out))
        return out


def _weight_cast_alive(device, requires_grad, region, autocast):
    """Run a linear under no_grad (a checkpointed layer's forward) inside ``region``; whether
    the weight's half cast is alive inside the region after the op, and after it."""
    w = nn.Parameter(torch.ones(8, 8, device=device), requires_grad=requires_grad)
    x = torch.ones(2, 3, 8, device=device)
    casts = _Casts()
    with autocast:
        with region():
            with torch.no_grad(), casts:
                F.linear(x, w)
            inside = [r() is not None for r in casts.refs]
        after = [r() is not None for r in casts.refs]
    return inside, after


@pytest.mark.parametrize("requires_grad", [True, False])
def test_autocast_keeps_trained_weight_casts_until_its_region_ends(requires_grad):
    # real torch (CPU autocast shares cached_cast with CUDA: autocast_mode.cpp)
    real = _weight_cast_alive(
        "cpu",
        requires_grad,
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        contextlib.nullcontext(),
    )
    # the emulation on meta: the train step marks the region torch.autocast would cover
    emulated = _weight_cast_alive("meta", requires_grad, autocast_region, MetaAutocast("bf16"))
    assert real == emulated == ([requires_grad], [False])


def test_a_region_outside_any_emulation_does_nothing():
    with autocast_region():
        pass


# -- gradients zeroed in place -------------------------------------------------------------


def _spec(mha_dir, **kwargs):
    # activations outweigh the weights: the peak is where backward starts, before any gradient
    return StepSpec(model=mha_dir, batch_size=4, seq_len=128, **kwargs)


def test_gradients_zeroed_in_place_stay_allocated_through_the_step(mha_dir):
    """A real CPU step (the cpu backend's tracker) against the estimate: with
    ``zero_grad(set_to_none=False)`` the step starts with every gradient allocated, so the
    peak holds all of them, and grows by what set_to_none=True had not yet made there."""
    rows = {}
    for keep in (False, True):
        spec = _spec(mha_dir, zero_grad_set_to_none=not keep)
        rows["cpu", keep] = CpuBackend(warmup=1, steps=1).measure(spec)
        rows["est", keep] = EstimateBackend().measure(spec)
    assert all(r["status"] == "ok" for r in rows.values())
    for backend in ("cpu", "est"):
        kept, freed = rows[backend, True], rows[backend, False]
        # every gradient at the peak (the breakdown rounds each to the allocator's 512 bytes)
        assert kept["peak_breakdown"]["grads"] >= kept["grad_bytes"] > 0
        assert freed["peak_breakdown"]["grads"] < kept["grad_bytes"]
        assert kept["peak_bytes"] > freed["peak_bytes"]
    grown = {b: rows[b, True]["peak_bytes"] - rows[b, False]["peak_bytes"] for b in ("cpu", "est")}
    assert grown["est"] == grown["cpu"]


def test_the_first_steps_gradients_are_its_backward_buffers():
    # storages 1, 2 are gradients live when the traced step starts (4096 and 512 bytes);
    # backward makes 10 (4096, freed at once: accumulated into 1), 11 (an activation's
    # gradient, 4096, lives long), 12 (512, freed at once: accumulated into 2)
    trace = AllocationTrace(
        initial=((0, 8192), (1, 4096), (2, 512)),
        events=(
            (1, 5, 8192),  # forward activation
            (2, 10, 4096),
            (2, 11, 4096),
            (3, 10, -4096),
            (4, 12, 512),
            (4, 12, -512),
            (5, 5, -8192),
            (5, 11, -4096),
        ),
        categories={
            0: "params",
            1: "grads",
            2: "grads",
            5: "activations",
            10: "temporaries",
            11: "temporaries",
            12: "temporaries",
        },  # fmt: skip
        phases=(("forward", 0, 1), ("backward", 1, 8), ("optimizer", 8, 8)),
        round_to=512,
        ops=5,
    )
    assert first_step_grads(trace) == {10: 1, 12: 2}


def test_profile_documents_of_todays_setups_do_not_change():
    data = StepSpec(model="m").to_json()
    assert "zero_grad_set_to_none" not in data and "torch_version" not in data
    old = StepSpec(model="m", zero_grad_set_to_none=False, torch_version="1.10")
    assert StepSpec.from_json(old.to_json()) == old
