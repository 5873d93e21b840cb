"""The device-memory prediction: the cuda backend's schedule replayed through the allocator model,
kernel scratch, the comparison with a cuda row, and the fields the estimate backend adds."""

from __future__ import annotations

import json
import types

import pytest

from velora_cli.allocator.device_memory import (
    LoadPlan,
    cublas_workspace_bytes,
    cuda_schedule,
    device_capacity,
    device_memory_fields,
    estimate_error,
    expandable_saving,
    scratch_positions,
)
from velora_cli.allocator.kernel_scratch import (
    EMBEDDING_BACKWARD,
    FLASH_BACKWARD,
    embedding_backward_scratch,
    flash_attention_backward_scratch,
)
from velora_cli.allocator.replay import (
    ALLOC,
    EMPTY_CACHE,
    FREE,
    REPEAT,
    RESET_PEAK,
    SKIP,
    simulate,
)
from velora_cli.gpus import get_gpu
from velora_cli.measure.tracker import AllocationTrace

M = 1 << 20
H100 = get_gpu("h100")
NO_ENV: dict[str, str] = {}


def toy_trace(**extra) -> AllocationTrace:
    """A 40 MiB parameter with two 40 MiB AdamW moments; the step allocates a 30 MiB activation,
    a 40 MiB gradient, a 40 MiB optimizer temporary."""
    fields = dict(
        initial=((0, 40 * M), (1, 40 * M), (2, 40 * M)),
        events=(
            (1, 3, 30 * M),  # forward: activation
            (2, 4, 40 * M),  # backward: gradient
            (2, 3, -30 * M),  # the activation is released
            (3, 5, 40 * M),  # optimizer: temporary
            (3, 5, -40 * M),
            (4, 4, -40 * M),  # zero_grad(set_to_none=True)
        ),
        categories={
            0: "params",
            1: "optimizer",
            2: "optimizer",
            3: "activations",
            4: "grads",
            5: "temporaries",
        },  # fmt: skip
        phases=(
            ("forward_backward", 0, 3),
            ("forward", 0, 1),
            ("backward", 1, 3),
            ("optimizer", 3, 5),
            ("zero_grad", 5, 6),
        ),  # fmt: skip
        round_to=512,
        ops=4,
        op_names=("aten::mm", "aten::mm_backward", "aten::_foreach_add", "aten::zero_"),
    )
    fields.update(extra)
    return AllocationTrace(**fields)


def test_the_cuda_schedule_replayed_by_hand():
    # Load: the 40 MiB parameter, one segment. Warm-up step 1: cuBLAS workspace (32 MiB on
    # Hopper) at the forward's start, the 30 MiB activation, the backward thread's workspace,
    # the 40 MiB gradient; the optimizer creates its two 40 MiB moments, then a 40 MiB temporary
    # (the cached 30 MiB block is too small): 40 + 32 + 30 + 32 + 40 + 80 + 40 = 294 MiB.
    # Steps 2-3 reuse the cached 30, 40, 40 MiB blocks. empty_cache frees those three whole
    # segments (184 MiB stay: parameter, workspaces, moments); the timed steps make them again:
    # reserved peaks at 294 MiB again, when the temporary is allocated and the freed activation's
    # 30 MiB segment sits empty: fragmentation 30 MiB. Allocated peaks then too: 184 + 40 + 40.
    fields = device_memory_fields(toy_trace(), gpu=H100, environ=NO_ENV)
    assert fields["predicted_reserved_bytes"] == 294 * M
    assert fields["predicted_allocated_bytes"] == 264 * M
    assert fields["fragmentation_bytes"] == 30 * M
    assert fields["predicted_device_bytes"] == 294 * M + H100.context_bytes
    assert fields["cublas_workspace_bytes"] == 2 * 32 * M
    # Expandable segments (20 MiB pages, one growing segment): derived step by step, the
    # mapped range reaches 300 MiB in warm-up; empty_cache unmaps the four whole free pages
    # (220 MiB left) and the timed step maps them back, again 300 MiB: pages cost 6 MiB here.
    assert fields["predicted_reserved_expandable_bytes"] == 300 * M
    assert fields["fragmentation_expandable_bytes"] == 36 * M
    assert expandable_saving(fields) is None
    assert "CUDA context 1 GiB (constant for h100" in fields["device_memory_notes"]
    assert "2 cuBLAS workspaces of 32 MiB" in fields["device_memory_notes"]


def test_the_schedule_follows_the_cuda_backend():
    events = cuda_schedule(toy_trace(), workspace=32 * M, warmup=2, steps=5)
    kinds = [kind for kind, _, _ in events]
    # load (1) + first step (2 workspaces + 2 moments + 6) + 2 more warm-up/counting steps (6
    # each, after a SKIP marker), then the cache is emptied, peaks reset, and 5 timed steps
    assert kinds.index(EMPTY_CACHE) == 1 + 10 + 2 * (1 + 6) and kinds.index(RESET_PEAK) == 26
    assert len(events) == 27 + 5 * (1 + 6)  # each timed step after its REPEAT marker
    assert kinds.count(REPEAT) == 5
    # the second warm-up step starts a run of repeats, the third may repeat it
    assert [e for e in events if e[0] == SKIP] == [(SKIP, 6, 0), (SKIP, 6, 1)]
    assert events[0] == (ALLOC, 0, 40 * M)  # the parameter, loaded before any step
    first_optimizer = [e for e in events[:12] if e[2] == 40 * M and e[1] in (1, 2)]
    assert len(first_optimizer) == 2  # the moments are created in the first step only
    simulate(events)  # every free matches an allocation
    # A memory-bound Ampere GPU takes :4096:2:16:8 (8 MiB + 128 KiB); the variable overrides
    assert cublas_workspace_bytes(get_gpu("a100-80gb"), NO_ENV) == 8 * M + 128 * 1024
    assert cublas_workspace_bytes(H100, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) == 32 * M
    assert cublas_workspace_bytes(H100, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == 128 * 1024


def test_a_replaced_state_tensor_carries_over_to_the_next_step():
    # a projection refreshed in the optimizer step: the loaded storage 2 is freed and a new one
    # (6) survives the step; the next step frees that one, and nothing leaks or is freed twice
    trace = toy_trace(events=toy_trace().events + ((4, 2, -40 * M), (4, 6, 40 * M)))
    trace.categories[6] = "optimizer"
    events = cuda_schedule(trace, workspace=0, warmup=2, steps=3)
    stats = simulate(events)
    assert stats.allocated_bytes == 40 * M * 3  # parameter + two moments, as after every step


def test_kernel_scratch_goes_after_the_op_outputs_and_counts_in_allocated():
    # op 2 is a flash-attention backward whose scratch (20 MiB, 10 MiB) lives while the
    # gradient (its output) is allocated and the activation not yet freed: allocated peaks at
    # 184 + 30 + 40 + 30 = 284 MiB during the timed steps
    names = ("aten::mm", FLASH_BACKWARD, "aten::_foreach_add", "aten::zero_")
    trace = toy_trace(op_names=names)
    scratch = {FLASH_BACKWARD: (20 * M, 10 * M)}
    assert scratch_positions(trace, scratch) == {2: (20 * M, 10 * M)}
    fields = device_memory_fields(trace, gpu=H100, scratch=scratch, environ=NO_ENV)
    assert fields["predicted_allocated_bytes"] == 284 * M
    assert fields["kernel_scratch_bytes"] == 30 * M
    assert "kernel scratch up to 30 MiB per op" in fields["device_memory_notes"]
    # no op names (an older trace): no scratch
    assert scratch_positions(toy_trace(op_names=()), scratch) == {}


def test_kernel_scratch_sizes_follow_the_cuda_sources():
    # Llama-2-7B, batch 1 x 2048, bf16: softmax_d 1*32*2048*4 B, dq_accum 2048*32*128*4 B
    assert flash_attention_backward_scratch(1, 32, 32, 2048, 128, 2) == (256 * 1024, 32 * M)
    # Llama-3.2-3B, 4 x 768, 24 heads over 8 kv heads: + dk/dv expanded to 24 heads in bf16
    sizes = flash_attention_backward_scratch(4, 24, 8, 768, 128, 2)
    assert sizes == (4 * 24 * 768 * 4, 36 * M, 18 * M, 18 * M)
    # sequences are rounded to 128 rows, head dims to 32 (<= 128) or 64
    assert flash_attention_backward_scratch(1, 1, 1, 100, 72, 2) == (128 * 4, 128 * 96 * 4)
    # embedding backward: a direct kernel up to 3072 indices, sorted segments beyond
    assert embedding_backward_scratch(3072, 32000, 4096) == ()
    sizes = embedding_backward_scratch(8192, 32000, 4096)
    assert sizes[-1] == (8192 // 10 + 8192) * 4096 * 4 and len(sizes) == 7


def test_estimate_error_compares_a_cuda_row_with_the_prediction():
    measured = {"peak_bytes": 10 * M, "reserved_bytes": 16 * M, "device_used_bytes": 600 * M}
    predicted = {"predicted_allocated_bytes": 11 * M, "predicted_reserved_bytes": 12 * M,
                 "predicted_device_bytes": 1036 * M}  # fmt: skip
    error = estimate_error(measured, predicted)
    assert error["estimate_error_allocated_bytes"] == M
    assert error["estimate_error_allocated_pct"] == pytest.approx(10.0)
    assert error["estimate_error_reserved_pct"] == pytest.approx(-25.0)
    assert error["estimate_error_device_bytes"] == 436 * M
    assert error["context_implied_bytes"] == 584 * M  # what the context constant should be
    # NVML unavailable: no device comparison, no implied context
    error = estimate_error({**measured, "device_used_bytes": None}, predicted)
    assert "estimate_error_device_pct" not in error and "context_implied_bytes" not in error
    # the worker's own NVML usage, where reported, is what the per-process model predicts
    error = estimate_error({**measured, "process_used_bytes": 500 * M}, predicted)
    assert error["estimate_error_process_bytes"] == 536 * M
    assert error["context_implied_bytes"] == 484 * M


def test_expandable_saving_is_reported_over_five_percent():
    row = {"predicted_device_bytes": 100 * M, "predicted_device_expandable_bytes": 94 * M}
    assert expandable_saving(row) == (6 * M, pytest.approx(0.06))
    assert expandable_saving({**row, "predicted_device_expandable_bytes": 96 * M}) is None
    assert expandable_saving({}) is None


def test_the_estimate_backend_adds_the_device_fields(monkeypatch):
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    spec = StepSpec("llama-tiny", batch_size=2, seq_len=64, dtype="bf16")
    row = EstimateBackend().measure(spec)
    assert row["status"] == "ok"
    assert row["predicted_reserved_bytes"] >= row["predicted_allocated_bytes"] > row["peak_bytes"]
    assert row["predicted_device_bytes"] == row["predicted_reserved_bytes"] + H100.context_bytes
    assert row["fragmentation_bytes"] >= 0 and row["allocator_conf"] == "default"
    assert row["kernel_scratch_bytes"] > 0  # bf16: flash-attention backward takes scratch
    # the allocator settings come from the environment, or the option, as torch reads them
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    row = EstimateBackend().measure(spec)
    assert row["allocator_conf"] == "expandable_segments:True"
    assert row["predicted_reserved_bytes"] == row["predicted_reserved_expandable_bytes"]
    with pytest.raises(ValueError, match="True or False"):
        EstimateBackend(alloc_conf="expandable_segments:on")


def test_the_cuda_backend_reports_the_estimate_beside_its_measurement(monkeypatch):
    from velora_cli.estimate.beside import estimate_beside
    from velora_cli.measure import cuda
    from velora_cli.measure.train_step import StepSpec

    measured = {
        "status": "ok", "backend": "cuda", "peak_bytes": 90 * M, "reserved_bytes": 120 * M,
        "device_used_bytes": 700 * M, "gpu_name": "NVIDIA H100 80GB HBM3",
    }  # fmt: skip
    seen = {}

    def fake_run(args, input, env, **kwargs):  # noqa: A002 - subprocess.run's name
        seen["env"] = env
        return types.SimpleNamespace(stdout="log\n" + cuda._MARK + json.dumps(measured), stderr="")

    monkeypatch.setattr(cuda.subprocess, "run", fake_run)
    spec = StepSpec("llama-tiny", batch_size=2, seq_len=32)
    row = cuda.CudaBackend(alloc_conf="max_split_size_mb:64", beside=estimate_beside).measure(spec)
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    assert row["estimate_gpu"] == "h100" and row["peak_bytes"] == 90 * M
    predicted = row["predicted_reserved_bytes"]
    assert row["estimate_error_reserved_bytes"] == predicted - 120 * M
    assert row["estimate_error_reserved_pct"] == pytest.approx(
        100 * (predicted - 120 * M) / (120 * M)
    )
    assert row["context_implied_bytes"] == 580 * M
    assert row["predicted_fits_device"] is True and row["predicted_alloc_retries"] == 0
    assert "max_split_size_mb:64" in row["device_memory_notes"]
    # a GPU the table does not know: predicted with the default GPU's constants, and said so
    measured["gpu_name"] = "NVIDIA Mystery 1"
    row = cuda.CudaBackend(beside=estimate_beside).measure(spec)
    assert row["estimate_gpu"] == "h100" and "not in the GPU table" in row["estimate_error_note"]
    # a failed row gets no comparison
    measured.update(status="oom")
    assert "predicted_reserved_bytes" not in cuda.CudaBackend(beside=estimate_beside).measure(spec)


def test_free_events_of_unknown_storages_are_skipped():
    # a trace may free a storage it never saw allocated (created before tracking, not loaded)
    trace = toy_trace(events=((1, 9, -4 * M), *toy_trace().events))
    events = cuda_schedule(trace, workspace=0, warmup=0, steps=1)
    assert all(key != 9 for kind, key, _ in events if kind == FREE)
    simulate(events)


def test_scratch_for_a_model_reads_its_config():
    from transformers import LlamaConfig

    from velora_cli.allocator.kernel_scratch import scratch_for_model

    config = LlamaConfig(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256)  # fmt: skip
    table = scratch_for_model(config, micro_batch=4, seq_len=768, dtype_bytes=2)
    assert table == {
        FLASH_BACKWARD: flash_attention_backward_scratch(4, 24, 8, 768, 128, 2),
        # cuDNN attention's fp32 dQ accumulator (B, H, N, d), where torch runs cuDNN instead
        "aten::_scaled_dot_product_cudnn_attention_backward": (4 * 24 * 768 * 128 * 4,),
    }
    # 4 x 1024 tokens take the embedding's sorted path
    table = scratch_for_model(config, micro_batch=4, seq_len=1024, dtype_bytes=2)
    assert table[EMBEDDING_BACKWARD] == embedding_backward_scratch(4096, 128256, 3072)


def profile_document(backend="estimate", **row):
    base = dict(status="ok", label="baseline", strategy="baseline", peak_bytes=90 * M,
                predicted_allocated_bytes=100 * M, predicted_reserved_bytes=150 * M,
                fragmentation_bytes=50 * M, predicted_reserved_expandable_bytes=110 * M,
                predicted_device_bytes=1174 * M, predicted_device_expandable_bytes=1134 * M,
                device_memory_notes="device = reserved (modelled: ...) + CUDA context")  # fmt: skip
    base.update(row)
    return {"backend": backend, "gpu": "h100", "rows": [base]}


def test_the_profile_report_shows_what_the_gpu_must_hold():
    from rich.console import Console

    from velora_cli import report
    from velora_cli.report.profile import device_memory_lines

    doc = profile_document()
    console = Console(width=140, record=True)
    console.print(report.device_table(doc))
    text = console.export_text()
    assert "what the GPU must hold (predicted for h100)" in text
    for cell in ("100 MiB", "150 MiB", "50 MiB", "1.15 GiB", "1.11 GiB"):
        assert cell in text
    lines = device_memory_lines(doc)
    assert not any("expandable_segments:True would save" in line for line in lines)  # 3.4%
    doc = profile_document(predicted_device_expandable_bytes=1000 * M)
    console = Console(width=140, record=True)
    console.print(report.device_table(doc))
    assert "174 MiB (14.8%)" in console.export_text()
    lines = device_memory_lines(doc)
    assert any("would save more than 5% of device memory on: baseline (174 MiB, 14.8%)" in x
               for x in lines)  # fmt: skip
    assert "device = reserved (modelled: ...) + CUDA context" in lines
    # a cuda document: measured beside predicted, and the model's error
    doc = profile_document("cuda", reserved_bytes=140 * M, device_used_bytes=700 * M,
                           estimate_error_allocated_pct=11.1, estimate_error_reserved_pct=7.1,
                           estimate_error_device_pct=67.7)  # fmt: skip
    assert "baseline +11.1%/+7.1%/+67.7%" in device_memory_lines(doc)[0]
    console = Console(width=140, record=True)
    console.print(report.device_table(doc))
    assert "measured on this GPU vs predicted" in console.export_text()
    assert report.device_table({"backend": "cpu", "rows": [{"status": "ok"}]}) is None


def test_alloc_conf_option_errors_in_one_line():
    from typer.testing import CliRunner

    from velora_cli.cli import app

    result = CliRunner().invoke(
        app, ["profile", "llama-tiny", "--backend", "estimate", "--alloc-conf", "bogus:1"]
    )
    assert result.exit_code == 1
    assert "error: unrecognized allocator key 'bogus'" in result.output
    result = CliRunner().invoke(
        app, ["tune", "llama-tiny", "--budget", "2GB", "--alloc-conf", "expandable_segments:1"]
    )
    assert result.exit_code == 1 and "True or False" in result.output


def traced_tiny_llama(settings: dict, strategy: dict):
    """A tiny Llama's step on meta, warmed up: (spec, prepared, trace of one tracked step)."""
    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.emulation.step import cuda_emulation
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step

    spec = StepSpec("llama-tiny", **{"batch_size": 2, "seq_len": 64, **settings},
                    strategy=Strategy(**strategy))  # fmt: skip
    prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
    with cuda_emulation(spec.amp):
        train_step(prepared)
    _row, trace = EstimateBackend(trace_fields=False).observe(prepared, breakdown=False)
    return spec, prepared, trace


@pytest.mark.parametrize(
    ("settings", "strategy"),
    [({}, {}), ({"dtype": "bf16"}, {"gc": True}), ({"mode": "lora"}, {"placement": "paper",
     "num_groups": 4}), ({"optimizer": "galore", "rank": 8}, {"gc": 2}),
     ({"batch_size": 4, "grad_accum_steps": 2}, {})],
)  # fmt: skip
@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True", "max_split_size_mb:20"])
def test_a_steady_replay_stops_early_with_the_statistics_of_the_whole_replay(
    settings, strategy, alloc_conf
):
    """The timed steps repeat one traced step: once the allocator's state at a step's start
    equals the previous step's, the replay stops (allocator.REPEAT). The reference replays every
    step: the same statistics, on real traces of a tiny Llama."""
    from velora_cli.allocator.config import parse_alloc_conf

    _spec, _prepared, trace = traced_tiny_llama(settings, strategy)
    events = cuda_schedule(trace, workspace=32 * M, warmup=2, steps=5)
    config = parse_alloc_conf(alloc_conf)
    every_step = [e for e in events if e[0] not in (REPEAT, SKIP)]
    assert simulate(events, config) == simulate(every_step, config)


@pytest.mark.parametrize(
    ("settings", "strategy", "warmup"),
    [({}, {}, 3), ({"dtype": "bf16"}, {"gc": True}, 2), ({"mode": "lora"}, {}, 4),
     ({"mode": "lora"}, {"placement": "paper", "num_groups": 4}, 3),
     ({"batch_size": 4, "grad_accum_steps": 2, "zero_grad_set_to_none": False}, {}, 3)],
)  # fmt: skip
@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True", "max_split_size_mb:20"])
def test_a_repeated_warm_up_step_is_skipped_with_the_statistics_of_the_whole_replay(
    settings, strategy, warmup, alloc_conf
):
    """A warm-up step that starts where the one before started is passed over (allocator.SKIP):
    the same statistics as the replay of every event, on real traces of a tiny Llama, and the
    skip happens (it would not be tested otherwise)."""
    from velora_cli.allocator.caching import CachingAllocator
    from velora_cli.allocator.config import parse_alloc_conf
    from velora_cli.allocator.replay import _replay

    _spec, _prepared, trace = traced_tiny_llama(settings, strategy)
    events = cuda_schedule(trace, workspace=32 * M, warmup=warmup, steps=5)
    config = parse_alloc_conf(alloc_conf)
    allocator = CachingAllocator(config)
    stats = _replay(events, allocator)
    every_event = [e for e in events if e[0] not in (REPEAT, SKIP)]
    assert stats == simulate(every_event, config)
    assert allocator.skipped_steps >= 1
    # within a card's capacity (the estimate always has one, allocator/device_memory.py): at
    # the replay's own peak the skip still happens, with the whole replay's statistics (a step
    # is passed over only when the one before made no retry, so retries count the same)
    allocator = CachingAllocator(config, capacity=stats.peak_reserved_bytes)
    assert _replay(events, allocator) == simulate(
        every_event, config, capacity=stats.peak_reserved_bytes
    )
    assert allocator.skipped_steps >= 1


def test_a_skip_marker_says_whether_the_step_repeats_the_one_before():
    """``(SKIP, stride, 1)`` only before a warm-up step whose events are the previous step's with
    the keys of that step (≥ stride) one stride on; kernel scratch (negative keys, allocated and
    freed in the op) aside. Checked against the steps `_step_events` makes one by one, on the
    tiny Llama cases of the template test (a refreshed projection among them)."""
    from velora_cli.allocator.device_memory import (
        _Keys,
        _step_events,
        load_events,
        scratch_for_step,
    )

    for settings, strategy in [({}, {}), GALORE, SCRATCH]:
        spec, prepared, trace = traced_tiny_llama(settings, strategy)
        scratch = scratch_for_step(spec, prepared.model)
        events = cuda_schedule(trace, workspace=32 * M, scratch=scratch, warmup=3, steps=1)
        marks = [e for e in events if e[0] == SKIP]
        keys = _Keys(trace)
        at = scratch_positions(trace, scratch)
        load_events(trace, keys, None)
        steps = [_step_events(trace, keys, s, at, first=s == 0, workspace=32 * M) for s in range(4)]
        stride = keys.stride

        def named(step, shift, stride=stride):
            return [(kind, "scratch" if key < 0 else key + shift if key >= stride else key, n)
                    for kind, key, n in step]  # fmt: skip

        repeats = [int(named(steps[s], 0) == named(steps[s - 1], stride)) for s in (2, 3)]
        assert marks == [(SKIP, stride, 0)] + [(SKIP, stride, r) for r in repeats]
        assert repeats == [1, 1]


def test_a_harness_that_keeps_the_pool_before_measuring():
    # fitcheck's loop: load, one warm-up step, reset_peak_memory_stats() with no empty_cache(),
    # one measured step (validation/published/fitcheck_t4.json, setup.loop)
    events = cuda_schedule(toy_trace(), workspace=32 * M, warmup=0, steps=1, empty_cache=False)
    kinds = [kind for kind, _, _ in events]
    assert EMPTY_CACHE not in kinds and kinds.count(RESET_PEAK) == 1
    assert kinds.count(REPEAT) == 1
    # the warm-up reserves 294 MiB (as in the test above); nothing is returned, so the measured
    # window starts with all of it reserved: the peak is that pool. Allocated: 184 MiB live at
    # the reset (parameter, workspaces, moments) + the 30 MiB activation and 40 MiB gradient,
    # then the 40 MiB temporary after the activation is freed: 264 MiB.
    fields = device_memory_fields(
        toy_trace(), gpu=H100, environ=NO_ENV, warmup=0, steps=1, empty_cache=False
    )
    assert fields["predicted_reserved_bytes"] == 294 * M
    assert fields["predicted_allocated_bytes"] == 264 * M


@pytest.mark.parametrize(
    "gpu, cuda, context",
    [
        ("t4", "12.8", int(140.875 * M)),  # fitcheck, measured after a step (lazy loading)
        ("v100-16gb", "11.2", 1343 * M),  # the transformers guide (eager loading)
        ("h100", "11.2", 2048 * M),  # eager loading, not measured on this die: extrapolated
        ("h100", None, 1024 * M),  # no version: today's default, unchanged
    ],
)
def test_the_context_follows_the_cuda_version(gpu, cuda, context):
    spec = get_gpu(gpu)
    fields = device_memory_fields(toy_trace(), gpu=spec, environ=NO_ENV, cuda_version=cuda)
    assert fields["cuda_context_bytes"] == context == spec.cuda_context(cuda).nbytes
    assert fields["predicted_device_bytes"] == fields["predicted_reserved_bytes"] + context


def quantized_load_trace() -> AllocationTrace:
    """A QLoRA model's storages: a 4-bit weight packed in 6 MiB with its 0.75 MiB fp32 absmax,
    a 16 MiB fp32 embedding; the step allocates and frees a 30 MiB activation."""
    return AllocationTrace(
        initial=((0, 6 * M), (1, 3 * M // 4), (2, 16 * M)),
        events=((1, 3, 30 * M), (2, 3, -30 * M)),
        categories={0: "params", 1: "buffers", 2: "params", 3: "activations"},
        phases=(("forward", 0, 1), ("backward", 1, 2), ("optimizer", 2, 2)),
        round_to=512,
        ops=2,
        op_names=("aten::mm", "aten::mm_backward"),
    )


# the weight was 24 MiB of fp16 when transformers materialized it for bitsandbytes to quantize;
# the embedding was loaded as 8 MiB of fp16 and upcast to fp32 by prepare_model_for_kbit_training
QLORA_LOAD = LoadPlan(staged={6 * M: (24 * M, (3 * M // 4,))}, upcast={16 * M: 8 * M})


def test_load_events_stage_quantized_weights_and_upcast_after_loading():
    trace = quantized_load_trace()
    schedule = cuda_schedule(trace, workspace=0, warmup=0, steps=1, empty_cache=False,
                             load=QLORA_LOAD)  # fmt: skip
    load = schedule[:7]  # then warm-up step 1
    full, half = load[0][1], load[4][1]
    assert load == [
        (ALLOC, full, 24 * M),  # the fp16 weight on the device
        (ALLOC, 0, 6 * M),  # quantize_4bit: packed codes,
        (ALLOC, 1, 3 * M // 4),  # then absmax,
        (FREE, full, 0),  # the fp16 weight dropped
        (ALLOC, half, 8 * M),  # the embedding as loaded
        (ALLOC, 2, 16 * M),  # kbit preparation: the fp32 copy,
        (FREE, half, 0),  # the fp16 one dropped
    ]
    assert full < 0 and half < 0 and full != half
    # without a plan each storage is one allocation
    plain = cuda_schedule(trace, workspace=0, warmup=0, steps=1, empty_cache=False)
    assert plain[:3] == [(ALLOC, 0, 6 * M), (ALLOC, 1, 3 * M // 4), (ALLOC, 2, 16 * M)]


def test_what_loading_reserved_stays_reserved_without_empty_cache():
    """By hand, with CUDACachingAllocator.cpp's rules (a request under 10 MiB gets a 20 MiB
    segment, a larger one its size rounded to 2 MiB, <= 1 MiB the 2 MiB small pool; best fit;
    a large block is split when more than 1 MiB remains):

    loaded once each: packed 6 -> new 20 MiB segment (14 free); absmax -> small 2 MiB; embedding
    16 -> no free block fits, new 16 MiB segment: 38 MiB. Warm-up step: the 30 MiB activation
    gets a new 30 MiB segment: 68 MiB, kept through the reset; the measured step reuses it.

    loaded as transformers + peft do it: fp16 weight 24 -> new 24 MiB segment; packed 6 -> new
    20 MiB segment (14 free); absmax -> small 2 MiB; the 24 MiB freed; fp16 embedding 8 -> best
    fit is the 14 MiB remainder (6 left); fp32 embedding 16 -> the 24 MiB segment (8 left); the
    fp16 one freed (14 free again): 46 MiB reserved, no free block of 30 MiB, so the activation
    takes a new 30 MiB segment: 76 MiB. Allocated is the same either way."""
    trace = quantized_load_trace()
    plain = simulate(cuda_schedule(trace, workspace=0, warmup=0, steps=1, empty_cache=False))
    loaded = simulate(cuda_schedule(trace, workspace=0, warmup=0, steps=1, empty_cache=False,
                                    load=QLORA_LOAD))  # fmt: skip
    assert plain.peak_reserved_bytes == 68 * M
    assert loaded.peak_reserved_bytes == 76 * M
    assert plain.peak_allocated_bytes == loaded.peak_allocated_bytes == (52 * M + 3 * M // 4)
    # empty_cache() cannot undo it here: the fp32 embedding holds the 24 MiB segment and the
    # packed weight the 20 MiB one (only the activation's free 30 MiB segment is released, and
    # the measured step takes it again)
    emptied = simulate(cuda_schedule(trace, workspace=0, warmup=0, steps=1, load=QLORA_LOAD))
    assert emptied.peak_reserved_bytes == 76 * M


def test_load_transients_of_a_quantized_layer_and_an_upcast_embedding():
    import torch
    from torch import nn

    from velora_cli.methods.quant import MetaLinear4bit, QuantConfig, load_transients

    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 1024, bias=False))
    model.half()
    config = QuantConfig(double_quant=False)
    model[1] = MetaLinear4bit.from_linear(model[1], config)
    model[0].weight.data = model[0].weight.data.float()  # prepare_model_for_kbit_training
    model[0].weight.requires_grad = False
    staged, upcast = load_transients(model)
    # packed: 256 × 1024 codes, two per byte; state: the 16-value code table (fp32), then
    # one fp32 absmax per block of 64
    assert staged == {256 * 1024 // 2: (256 * 1024 * 2, (16 * 4, 256 * 1024 // 64 * 4))}
    assert upcast == {1000 * 256 * 4: 1000 * 256 * 2}


def every_step_by_hand(trace, *, scratch, warmup: int, steps: int) -> list:
    """`cuda_schedule`'s events with every step made by `_step_events` (the reference of the
    step template that builds the steps after the first)."""
    from velora_cli.allocator.device_memory import _Keys, _step_events, load_events

    keys = _Keys(trace)
    at = scratch_positions(trace, scratch)
    events = load_events(trace, keys, None)
    for step in range(warmup + 1 + steps):
        if step > warmup:
            events.append((REPEAT, keys.stride, 0))
        events += _step_events(trace, keys, step, at, first=step == 0, workspace=32 * M)
        if step == warmup:
            events += [(EMPTY_CACHE, 0, 0), (RESET_PEAK, 0, 0)]
    return events


def template_case(settings: dict, strategy: dict):
    """A tiny Llama's traced step: its `_StepTemplate`, and whether `cuda_schedule` made from
    the template equals `every_step_by_hand`."""
    from velora_cli.allocator.device_memory import _Keys, _StepTemplate, scratch_for_step

    spec, prepared, trace = traced_tiny_llama(settings, strategy)
    scratch = scratch_for_step(spec, prepared.model)
    template = _StepTemplate(trace, _Keys(trace).slot, scratch_positions(trace, scratch))
    events = cuda_schedule(trace, workspace=32 * M, scratch=scratch, warmup=2, steps=5)
    events = [e for e in events if e[0] != SKIP]  # (their own test below)
    return template, events == every_step_by_hand(trace, scratch=scratch, warmup=2, steps=5)


GALORE = ({"optimizer": "galore", "rank": 8, "zero_grad_set_to_none": False}, {"gc": 2})
# bf16 at 4 x 1024 tokens: flash-attention and embedding-backward scratch
SCRATCH = ({"mode": "lora", "dtype": "bf16", "batch_size": 4, "seq_len": 1024}, {})


@pytest.mark.parametrize(
    ("settings", "strategy"),
    [({}, {}), GALORE, SCRATCH,
     ({"batch_size": 4, "grad_accum_steps": 2, "optimizer": "adarankgrad", "rank": 4}, {})],
)  # fmt: skip
def test_the_steps_after_the_first_come_from_a_template_with_the_same_events(settings, strategy):
    """The steps after the first repeat one template with their keys moved on: the events equal
    those `_step_events` makes step by step (its own storages, the loaded storages a step frees
    and replaces, kernel scratch), on real traces of a tiny Llama."""
    _template, same = template_case(settings, strategy)
    assert same


def test_the_template_cases_cover_freed_loaded_storages_and_scratch():
    # a test of the template that never met a replaced loaded storage or kernel scratch could
    # not fail on them: the galore case frees and replaces loaded storages (its refreshed
    # projections), the bf16 case takes kernel scratch
    assert template_case(*GALORE)[0].freed_slots
    assert template_case(*SCRATCH)[0].scratch_count


def _gpu_with_capacity(capacity: int):
    """The H100's entry with a total that leaves ``capacity`` to the allocator after the context."""
    import dataclasses

    return dataclasses.replace(
        H100, total_bytes=capacity + H100.context_bytes, total_source="a test's figure"
    )


def test_near_capacity_the_allocator_frees_its_cache_and_retries():
    # The toy step reserves 294 MiB unlimited (test_the_cuda_schedule_replayed_by_hand) while
    # 264 MiB are allocated at most. With 284 MiB reservable: in warm-up step 1 the 40 MiB
    # temporary would take reserved from 254 to 294 MiB; cudaMalloc fails, the retry path frees
    # the cached 30 MiB activation segment (224), and the temporary gets its segment: 264 MiB.
    # Steps 2-3 reuse the cached 40 MiB blocks (the activation splits one): no growth.
    # empty_cache leaves 184 MiB (parameter, workspaces, moments); timed step 1 repeats warm-up
    # step 1's pattern and its retry (2 retries in all); timed step 2 reuses cached blocks.
    # Reserved peaks at 264 MiB, within the 284 MiB, with nothing trapped.
    capacity = 284 * M
    gpu = _gpu_with_capacity(capacity)
    fields = device_memory_fields(toy_trace(), gpu=gpu, environ=NO_ENV)
    assert fields["device_capacity_bytes"] == capacity
    assert fields["fits_device"] is True and fields["alloc_retries"] == 2
    assert fields["predicted_reserved_bytes"] == 264 * M
    assert fields["predicted_allocated_bytes"] == 264 * M  # what the step allocates is unchanged
    assert fields["fragmentation_bytes"] == 0
    assert fields["predicted_device_bytes"] == 264 * M + H100.context_bytes
    assert fields["predicted_device_bytes"] <= gpu.total_bytes
    assert fields["fits_device_expandable"] is True
    assert fields["predicted_reserved_expandable_bytes"] <= capacity
    assert "freed cached segments and retried" in fields["device_memory_notes"]
    # far from the limit nothing changes: the H100's own total leaves the 294 MiB alone
    roomy = device_memory_fields(toy_trace(), gpu=H100, environ=NO_ENV)
    assert roomy["predicted_reserved_bytes"] == 294 * M
    assert roomy["fits_device"] is True and roomy["alloc_retries"] == 0
    assert "retried" not in roomy["device_memory_notes"]


def test_a_step_over_capacity_does_not_fit_and_keeps_its_unlimited_figures():
    # 250 MiB reservable: the 264 MiB allocated at once cannot fit however the cache is freed
    # (an out-of-memory error on the card); the row says so and carries the unlimited replay.
    fields = device_memory_fields(toy_trace(), gpu=_gpu_with_capacity(250 * M), environ=NO_ENV)
    assert fields["fits_device"] is False and fields["fits_device_expandable"] is False
    assert fields["predicted_reserved_bytes"] == 294 * M
    assert fields["predicted_allocated_bytes"] == 264 * M
    assert fields["predicted_device_bytes"] > fields["device_capacity_bytes"] + H100.context_bytes
    assert "DOES NOT FIT" in fields["device_memory_notes"]


def test_the_capacity_is_cudas_total_less_the_context():
    t4 = get_gpu("t4")
    capacity, source = device_capacity(t4, "12.8")
    # fitcheck's T4: 15,636,365,312 B total (torch), 140.875 MiB context after a step
    assert capacity == 15_636_365_312 - int(140.875 * M)
    assert "measured" in source


def test_a_harness_that_never_resets_its_peaks():
    # fms-acceleration reads max_memory_allocated once after train(): no reset, so the peaks
    # cover the load and every step (validation/published/fms_*.json, setup.loop.peak_reset)
    kept = cuda_schedule(toy_trace(), workspace=32 * M, warmup=1, steps=1, empty_cache=False)
    whole = cuda_schedule(toy_trace(), workspace=32 * M, warmup=1, steps=1, empty_cache=False,
                          reset_peak=False)  # fmt: skip
    assert RESET_PEAK in [k for k, _, _ in kept]
    assert whole == [e for e in kept if e[0] != RESET_PEAK]
    # a load transient above the step's peak (a 100 MiB fp16 weight staged for quantization):
    # the step after a reset peaks at 52.75 MiB allocated (test above's trace), the whole run at
    # the load's 100 + 6 + 0.75 MiB; reserved keeps the load's segments either way (122 MiB)
    plan = LoadPlan(staged={6 * M: (100 * M, (3 * M // 4,))}, upcast={})
    trace = quantized_load_trace()
    after_reset = simulate(cuda_schedule(trace, workspace=0, warmup=0, steps=1,
                                         empty_cache=False, load=plan))  # fmt: skip
    run = simulate(cuda_schedule(trace, workspace=0, warmup=0, steps=1, empty_cache=False,
                                 load=plan, reset_peak=False))  # fmt: skip
    assert after_reset.peak_allocated_bytes == 52 * M + 3 * M // 4
    assert run.peak_allocated_bytes == 106 * M + 3 * M // 4
    assert run.peak_reserved_bytes == after_reset.peak_reserved_bytes == 122 * M


def test_a_steady_replay_builds_no_step_after_the_marker_it_stops_at():
    # the timed steps' REPEAT markers are parts of their own: the replay stops at one before the
    # step behind it is built; the events, all of them built, are `cuda_schedule`'s
    from velora_cli.allocator.device_memory import Schedule

    schedule = Schedule(toy_trace(), workspace=32 * M, warmup=2, steps=5)
    stats = simulate(schedule)
    assert schedule.parts[-1] == [(REPEAT, 6, 0)] and schedule._next < 3 + 5
    assert stats == simulate(cuda_schedule(toy_trace(), workspace=32 * M, warmup=2, steps=5))
    assert list(schedule) == cuda_schedule(toy_trace(), workspace=32 * M, warmup=2, steps=5)


@pytest.mark.parametrize("capacity", [250 * M, 263 * M, 264 * M, 284 * M])
def test_a_step_over_capacity_skips_its_replays_within_the_card_and_loses_nothing(
    capacity, monkeypatch
):
    # live_peak: with the H100's cuBLAS workspaces the toy step's requests hold 264 MiB at once,
    # and a replay within less runs out
    from velora_cli.allocator import device_memory

    workspace = device_memory.cublas_workspace_bytes(H100, NO_ENV)
    schedule = device_memory.Schedule(toy_trace(), workspace=workspace)
    assert device_memory.live_peak(schedule) == 264 * M
    assert simulate(schedule, capacity=264 * M) and _raises_oom(schedule, 264 * M - 512)
    gpu = _gpu_with_capacity(capacity)
    fast = device_memory_fields(toy_trace(), gpu=gpu, environ=NO_ENV)
    monkeypatch.setattr(device_memory, "live_peak", lambda events: 0)  # the replays within, always
    slow = device_memory_fields(toy_trace(), gpu=gpu, environ=NO_ENV)
    assert fast == slow
    assert fast["fits_device"] is (capacity >= 264 * M)


def _raises_oom(events, capacity: int) -> bool:
    from velora_cli.allocator.caching import AllocatorOutOfMemory

    try:
        simulate(events, capacity=capacity)
    except AllocatorOutOfMemory:
        return True
    return False
