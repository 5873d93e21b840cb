"""The roofline: per-op times derivable by hand on fake devices, the GEMM shape model, the fp32
matmul precision, micro-batch extrapolation, and the predictions on estimate and cuda rows."""

import dataclasses
import json
import subprocess
from collections import Counter

import pytest
import torch
from torch import nn

from velora_cli.gpus import GpuSpec
from velora_cli.timing import roofline
from velora_cli.timing.opcount import OpCost, OpCounter, Segment, StepCounts
from velora_cli.timing.roofline import (
    gemm_efficiency,
    gpu_device,
    measured_device,
    op_launches,
    op_seconds,
    predict,
)

FAKE = GpuSpec(
    key="fake",
    name="Fake GPU",
    arch="hopper",
    compute_capability=(9, 0),
    memory_bytes=10**10,
    bandwidth=1e9,  # 1 GB/s
    dense_flops={"bf16": 1e12, "fp16": 1e12, "tf32": 5e11, "fp32": 1e11},
    source="test",
    sms=4,
)


def gemm(m, n, k, *, precision="bf16", batch=1, nbytes=0):
    return OpCost("gemm", "mm", precision, 2 * batch * m * n * k, nbytes, gemm=(batch, m, n, k))


def test_gemm_time_on_a_fake_gpu_by_hand():
    device = gpu_device(FAKE, fp32_matmul="fp32")
    # 256×256 output on 4 SMs: four 128×128 tiles, one full wave; k = 8192 (the reference):
    # efficiency = GEMM_EFFICIENCY exactly
    assert gemm_efficiency(device, 1, 256, 256, 8192) == pytest.approx(roofline.GEMM_EFFICIENCY)
    op = gemm(256, 256, 8192, nbytes=4_000_000)
    compute = 2 * 256 * 256 * 8192 / (1e12 * roofline.GEMM_EFFICIENCY)  # 1.34 ms
    memory = 4_000_000 / (1e9 * roofline.BANDWIDTH_EFFICIENCY["gemm"])  # 4.44 ms: memory-bound
    assert op_seconds(op, device) == pytest.approx(max(compute, memory) + 5e-6)
    assert op_seconds(dataclasses.replace(op, bytes=0), device) == pytest.approx(compute + 5e-6)


def test_gemm_shape_model_by_hand():
    device = gpu_device(FAKE)  # 4 SMs
    ramp = (256 / (256 + 128)) / (8192 / (8192 + 128))  # k = 256 against the 8192³ reference
    # k = 256 cannot be split (each split needs >= 256): tiles and waves only.
    # 128×128: one 128-tile on 4 SMs (1/4 busy) or four 64-tiles at half speed: 1/2
    assert gemm_efficiency(device, 1, 128, 128, 256) == pytest.approx(0.8 * 0.5 * ramp)
    # 384×128: three 128-tiles, one wave of four SMs: 3/4 (64-tiles: 12 in 3 full waves, ½)
    assert gemm_efficiency(device, 1, 384, 128, 256) == pytest.approx(0.8 * 0.75 * ramp)
    # 100×100: one tile, 100²/128² of it useful, on 1 of 4 SMs; 64-tiles: 4 tiles, 100²/(4·64²)/2
    expected = max(100 * 100 / (4 * 128 * 128), 0.5 * 100 * 100 / (4 * 64 * 64))
    assert gemm_efficiency(device, 1, 100, 100, 256) == pytest.approx(0.8 * expected * ramp)
    # batched GEMMs fill the SMs with tiles of every batch: 4 × 128×128 in one full wave
    assert gemm_efficiency(device, 4, 128, 128, 256) == pytest.approx(0.8 * ramp)
    # split-K: 128×128×8192 splits K in 4 (one 128-tile per SM, each k = 2048 long)
    split = (2048 / (2048 + 128)) / (8192 / (8192 + 128))
    assert gemm_efficiency(device, 1, 128, 128, 8192) == pytest.approx(0.8 * split)


def test_fp32_matmuls_run_without_tf32_by_default():
    # PyTorch's default since 1.12: no TF32 for CUDA matmuls (velora's steps keep it)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert roofline.fp32_matmul_precision() == "fp32"
    device = gpu_device(FAKE)
    op = gemm(256, 256, 8192, precision="fp32")
    assert op_seconds(op, device) == pytest.approx(op.flops / (1e11 * 0.8) + 5e-6)
    torch.backends.cuda.matmul.allow_tf32 = True  # as torch.set_float32_matmul_precision("high")
    try:
        assert roofline.fp32_matmul_precision() == "tf32"
        assert op_seconds(op, gpu_device(FAKE)) == pytest.approx(op.flops / (5e11 * 0.8) + 5e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_attention_elementwise_and_foreach_by_hand():
    device = gpu_device(FAKE)
    attention = OpCost("attention", "_scaled_dot_product_flash_attention", "bf16", 10**9, 10**3)
    assert op_seconds(attention, device) == pytest.approx(
        1e9 / (1e12 * roofline.ATTENTION_EFFICIENCY["hopper"]) + 5e-6
    )
    add = OpCost("elementwise", "add", "bf16", 10**6, 3 * 10**6)  # charged at the fp32 rate
    assert op_seconds(add, device) == pytest.approx(3e6 / (1e9 * 0.85) + 5e-6)
    # multi_tensor_apply: 200 tensors of 3 lists → ceil(200 / 48) = 5 launches; 2000 chunks →
    # ceil(2000 / 320) = 7: the larger
    foreach = OpCost(
        "foreach", "_foreach_addcdiv_", "fp32", 0, 10**6, tensors=200, lists=3, chunks=2000
    )
    assert op_launches(foreach, device) == 7
    assert op_launches(dataclasses.replace(foreach, chunks=10), device) == 5
    assert op_seconds(foreach, device) == pytest.approx(1e6 / (1e9 * 0.85) + 7 * 5e-6)
    cpu = measured_device("cpu", gemm_flops=1e10, bandwidth=1e9, launch_seconds=1e-6)
    assert op_launches(foreach, cpu) == 200  # the CPU loops over the tensors


def test_a_linear_step_predicted_by_hand():
    """Forward, backward and an SGD step of one linear layer on a device with round figures."""
    t, d, o = 64, 32, 48
    with torch.device("meta"):
        layer = nn.Linear(d, o)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, foreach=True)
    x, g = torch.empty(t, d, device="meta"), torch.empty(t, o, device="meta")
    counter = OpCounter()
    with counter:
        with counter.phase("forward"):
            y = layer(x)
        with counter.phase("backward"):
            y.backward(g)
        with counter.phase("optimizer"):
            opt.step()
    device = measured_device("unit", gemm_flops=1e9, bandwidth=1e8, launch_seconds=1e-6)
    p = predict(counter.counts(), device)
    f32 = 4
    # forward addmm: 2·t·d·o FLOPs at 1 GFLOP/s vs (b + x + W + y) bytes at 100 MB/s
    fwd = max(2 * t * d * o / 1e9, f32 * (o + t * d + o * d + t * o) / 1e8) + 1e-6
    # backward: grad_W = xᵀ·g (mm), grad_b = Σ g (sum)
    mm = max(2 * t * d * o / 1e9, f32 * (t * o + t * d + o * d) / 1e8) + 1e-6
    bias = max(t * o / 1e9, f32 * (t * o + o) / 1e8) + 1e-6
    # SGD without momentum: p += −lr·g over 2 tensors: read p and g, write p; one per tensor
    sgd = f32 * 3 * (o * d + o) / 1e8 + 2 * 1e-6
    assert p.by_phase["forward"] == pytest.approx(fwd)
    assert p.by_phase["backward"] == pytest.approx(mm + bias)
    assert p.by_phase["optimizer"] == pytest.approx(sgd)
    assert p.seconds == pytest.approx(fwd + mm + bias + sgd)
    assert p.flops == 4 * t * d * o + t * o + (o * d + o)


def test_later_micro_batches_repeat_the_last_counted_one():
    a, b = (
        OpCost("elementwise", "mul", "fp32", 0, 10**6),
        OpCost("elementwise", "add", "fp32", 0, 10**6),
    )
    counts = StepCounts(
        (
            Segment("forward", 0, ((a, 1),)),
            Segment("backward", 0, ((a, 2),)),
            Segment("forward", 1, ((b, 1),)),
            Segment("backward", 1, ((b, 3),)),
            Segment("optimizer", None, ((a, 1),)),
        )
    )
    device = measured_device("unit", gemm_flops=1e9, bandwidth=1e9, launch_seconds=0.0)
    two, five = predict(counts, device), predict(counts, device, micro_batches=5)
    assert two.seconds == pytest.approx(8e-3)
    assert five.seconds == pytest.approx(8e-3 + 3 * 4e-3)  # 3 more copies of micro-batch 1
    assert five.bytes == two.bytes + 3 * 4 * 10**6


# -- rows ---------------------------------------------------------------------------------------


def attention():
    from velora_cli.emulation.attention import register_estimate_attention

    return register_estimate_attention()


def spec(**overrides):
    from velora_cli.measure.train_step import StepSpec

    return StepSpec(**{"model": "llama-tiny", "batch_size": 2, "seq_len": 32, **overrides})


@pytest.fixture(scope="module")
def estimate():
    from velora_cli.estimate.backend import EstimateBackend

    cache = {}

    def measure(**overrides):
        key = json.dumps(overrides, sort_keys=True, default=str)
        if key not in cache:
            gpu = overrides.pop("gpu", "h100")
            cache[key] = EstimateBackend(gpu=gpu).measure(spec(**overrides))
        return cache[key]

    return measure


def test_estimate_rows_carry_a_labelled_prediction(estimate):
    row = estimate()
    assert row["status"] == "ok" and row["step_seconds"] is None  # nothing was measured
    assert row["step_seconds_source"] == "predicted (roofline, h100)"
    assert row["predicted_gpu"] == "h100"
    seconds = row["predicted_step_seconds"]
    assert seconds > 0 and row["predicted_tokens_per_second"] == pytest.approx(2 * 32 / seconds)
    assert sum(row["predicted_seconds_by_phase"].values()) == pytest.approx(seconds)
    assert sum(row["predicted_seconds_by_kind"].values()) == pytest.approx(seconds)
    assert set(row["predicted_seconds_by_phase"]) >= {"forward", "backward", "optimizer"}
    slower = estimate(gpu="a100-80gb")["predicted_step_seconds"]
    assert slower > seconds  # same ops, an A100's smaller peaks


def test_counted_ops_carry_checkpointing_and_velora(estimate):
    from velora_cli.measure.train_step import Strategy

    base, gc = estimate(), estimate(strategy=Strategy(gc=True))
    # checkpointing recomputes the forward of every layer inside backward: more FLOPs and bytes,
    # the same forward, a longer backward
    assert (
        gc["step_flops"] > base["step_flops"] and gc["step_bytes_moved"] > base["step_bytes_moved"]
    )
    bp, gp = base["predicted_seconds_by_phase"], gc["predicted_seconds_by_phase"]
    assert gp["forward"] == pytest.approx(bp["forward"])
    assert gp["backward"] > bp["backward"]


def test_velora_flops_by_hand_on_a_model():
    """VeLoRA paper g8 on a 2-layer model: forward + compress (2·T·D per wrapped layer),
    backward − grad_W's (1 − 1/M) share (2·T·O·D·(1 − 1/M) per wrapped layer)."""
    from velora_cli.measure.train_step import Strategy, prepare
    from velora_cli.timing.step_time import count_step

    def gemm_flops(strategy):
        prepared = prepare(spec(strategy=strategy), "meta", attn_implementation=attention())
        counts = count_step(prepared)  # warm-up: optimizer state, v
        counts = count_step(prepared)
        by_phase = {}
        for s in counts.segments:
            flops = sum(op.flops * n for op, n in s.ops if op.kind == "gemm")
            by_phase[s.phase] = by_phase.get(s.phase, 0) + flops
        return prepared, by_phase

    _, base = gemm_flops(Strategy())
    prepared, velora = gemm_flops(Strategy(placement="paper", num_groups=8))
    tokens = 2 * 32
    layers = [prepared.model.get_submodule(name) for name in prepared.wrapped]
    assert len(layers) == 4  # v_proj and down_proj of 2 layers
    compress = sum(2 * tokens * m.in_features for m in layers)
    saved = sum(
        2 * tokens * m.out_features * m.in_features * (1 - 1 / m.sub_token_size) for m in layers
    )
    assert velora["forward"] - base["forward"] == compress
    assert base["backward"] - velora["backward"] == pytest.approx(saved)


def test_qlora_dequantization_is_counted():
    from velora_cli.measure.train_step import prepare
    from velora_cli.timing.step_time import count_step

    prepared = prepare(spec(mode="qlora", dtype="bf16"), "meta", attn_implementation=attention())
    count_step(prepared)
    counts = count_step(prepared)
    forward = Counter()
    for segment in counts.segments:
        if segment.phase == "forward":
            for op, n in segment.ops:
                if op.op == "dequantize":
                    forward[op.bytes] += n
    # each quantized linear dequantizes its fp32 block scales (double quantization: 8-bit codes
    # + nested scales -> nblocks fp32) and then its whole weight: ½ byte per packed weight and
    # the fp32 scales read, 2 bytes (bf16) per weight written
    expected = Counter()
    for q in (m for m in prepared.model.modules() if type(m).__name__ == "MetaLinear4bit"):
        n_w, blocks = q.in_features * q.out_features, q.weight_absmax.numel()
        nested = q.weight_nested_absmax.numel()
        expected[blocks + 4 * nested + 4 * blocks] += 1
        expected[n_w // 2 + 4 * blocks + 2 * n_w] += 1
    assert forward == expected


def test_ranking_agrees_with_cost_rank_where_it_is_unambiguous(estimate):
    """Predicted tokens/s orders candidates as `cost_rank` does on its unambiguous axes: less
    checkpointing is faster, a larger micro-batch is faster, qlora is slower than lora."""
    from velora_cli.measure.train_step import Strategy
    from velora_cli.search.candidates import Candidate, cost_rank
    from velora_cli.search.estimator import measurement_of

    def tps(**o):
        return estimate(**o)["predicted_tokens_per_second"]

    none, every2, full = (tps(strategy=Strategy(gc=gc)) for gc in (False, 2, True))
    assert none > every2 > full
    c = [Candidate(gc=gc) for gc in (False, 2, True)]
    assert cost_rank(c[0]) < cost_rank(c[1]) < cost_rank(c[2])
    big, small = tps(batch_size=4), tps(batch_size=4, grad_accum_steps=4)
    assert big > small
    assert cost_rank(Candidate(micro_batch_size=4)) < cost_rank(
        Candidate(micro_batch_size=1, grad_accum_steps=4)
    )
    assert tps(mode="lora", dtype="bf16") > tps(mode="qlora", dtype="bf16")
    assert cost_rank(Candidate(mode="lora")) < cost_rank(Candidate(mode="qlora"))
    # the tuner's estimate Measurement carries the predicted tokens/s
    m = measurement_of(estimate(), spec(), False)
    assert m.tokens_per_second == estimate()["predicted_tokens_per_second"]
    assert m.step_seconds == estimate()["predicted_step_seconds"]


def test_cuda_rows_get_the_prediction_for_their_gpu(monkeypatch, estimate):
    """The parent adds the roofline for the GPU the child ran on (no GPU needed here: the child
    is faked, the prediction runs on meta tensors)."""
    from velora_cli.estimate.beside import estimate_beside
    from velora_cli.measure import cuda

    child = {"status": "ok", "backend": "cuda", "peak_bytes": 1, "step_seconds": 0.004,
             "tokens_per_second": 16000.0, "gpu_name": "NVIDIA H100 80GB HBM3"}  # fmt: skip

    def fake_run(*args, **kwargs):
        stdout = cuda._MARK + json.dumps(child) + "\n"
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(cuda.subprocess, "run", fake_run)
    row = cuda.CudaBackend(beside=estimate_beside).measure(spec())
    predicted = estimate()["predicted_step_seconds"]
    assert row["step_seconds"] == 0.004  # the measurement is untouched
    assert row["predicted_gpu"] == "h100"
    assert row["predicted_step_seconds"] == pytest.approx(predicted)
    assert row["prediction_error"] == pytest.approx(predicted / 0.004 - 1)
    child["gpu_name"] = "NVIDIA Mystery 1"  # not in the table (the T4 now is)
    row = cuda.CudaBackend(beside=estimate_beside).measure(spec())
    assert "predicted_step_seconds" not in row and "Mystery 1" in row["prediction_note"]


def test_auto_without_a_gpu_predicts_instead_of_timing_the_cpu(monkeypatch):
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure import cuda
    from velora_cli.profiling import profiler

    monkeypatch.setattr(cuda, "cuda_available", lambda: False)
    backend = profiler.make_backend("auto", spec())
    assert isinstance(backend.single, EstimateBackend) and backend.single.gpu == "h100"


def test_profile_table_marks_predictions():
    from rich.console import Console

    from velora_cli import report

    rows = [
        {"label": "baseline", "status": "ok", "strategy": "baseline", "peak_bytes": 1 << 30,
         "predicted_step_seconds": 0.02, "predicted_tokens_per_second": 51200.0,
         "predicted_gpu": "h100", "step_seconds": None},
        {"label": "gc", "status": "ok", "strategy": "gc", "peak_bytes": 1 << 29,
         "predicted_step_seconds": 0.025, "predicted_tokens_per_second": 40960.0,
         "predicted_gpu": "h100", "step_seconds": None},
    ]  # fmt: skip
    from velora_cli.profiling.profiler import with_deltas

    doc = {"model": "m", "mode": "full", "batch_size": 4, "seq_len": 256, "precision": "fp32",
           "backend": "estimate", "rows": with_deltas(rows), "environment": {}}  # fmt: skip
    assert doc["rows"][1]["predicted_time_ratio"] == pytest.approx(1.25)
    console = Console(width=200, record=True)
    console.print(report.profile_table(doc))
    text = console.export_text()
    assert "~step" in text and "~tok/s" in text and "25.0 ms" in text and "1.25" in text
    footer = " ".join(report.profile_footer(doc))
    assert "~ predicted step time, not measured" in footer and "NVIDIA H100" in footer


def test_measured_rows_show_the_prediction_beside_the_measurement():
    from rich.console import Console

    from velora_cli import report

    row = {"label": "baseline", "status": "ok", "strategy": "baseline", "peak_bytes": 1 << 30,
           "step_seconds": 0.030, "tokens_per_second": 34133.0, "step_seconds_source": "measured",
           "predicted_step_seconds": 0.024, "predicted_gpu": "h200", "prediction_error": -0.2}  # fmt: skip
    doc = {"model": "m", "mode": "full", "batch_size": 4, "seq_len": 256, "precision": "bf16",
           "backend": "cuda", "rows": [row], "environment": {}}  # fmt: skip
    console = Console(width=200, record=True)
    console.print(report.profile_table(doc))
    header = console.export_text().splitlines()[2]
    assert header.index(" step ") < header.index("~step") < header.index("tok/s")
    assert "baseline −20%" in " ".join(report.profile_footer(doc)).replace("-", "−")


def test_every_gpu_has_an_sm_count_for_the_gemm_model():
    from velora_cli.gpus import GPUS, SM_SOURCE

    assert all(20 <= gpu.sms <= 200 for gpu in GPUS.values()), {k: g.sms for k, g in GPUS.items()}
    assert GPUS["h100"].sms == 132 and GPUS["a100-80gb"].sms == 108 and "whitepaper" in SM_SOURCE


def test_fresh_pages_cost_only_on_a_device_that_faults_them():
    op = OpCost("elementwise", "sqrt", "fp32", 0, 10**8, fresh_bytes=5 * 10**7)
    cpu = measured_device(
        "cpu", gemm_flops=1e10, bandwidth=1e10, launch_seconds=0.0, fresh_seconds_per_byte=1e-9
    )
    assert op_seconds(op, cpu) == pytest.approx(1e8 / 1e10 + 5e7 * 1e-9)
    gpu = gpu_device(FAKE)
    assert op_seconds(op, gpu) == pytest.approx(1e8 / (1e9 * 0.85) + 5e-6)


def test_a_calibrated_chip_by_hand():
    # TU104 (the T4's die) carries the corpus's calibration (roofline.CALIBRATIONS): fp16 GEMMs
    # at 0.35 of the fp16 peak, the fused attention at 0.17 (fp16) / 0.25 (fp32), 13 µs per
    # kernel; fp32 GEMMs, bf16 attention and memory-bound ops keep the assumptions
    t4 = gpu_device(dataclasses.replace(FAKE, chip="TU104"), fp32_matmul="fp32")
    calibration = roofline.CALIBRATIONS["TU104"]
    assert calibration.efficiency["gemm"]["fp16"] == 0.35 and calibration.launch_seconds == 13e-6
    assert t4.launch_seconds == 13e-6 and any("calibrated (TU104)" in n for n in t4.notes)
    half, single = gemm(256, 256, 8192, precision="fp16"), gemm(256, 256, 8192, precision="fp32")
    assert gemm_efficiency(t4, 1, 256, 256, 8192, precision="fp16") == pytest.approx(0.35)
    assert op_seconds(half, t4) == pytest.approx(half.flops / (1e12 * 0.35) + 13e-6)
    assert op_seconds(single, t4) == pytest.approx(single.flops / (1e11 * 0.8) + 13e-6)
    # the shape model scales the calibrated large-GEMM efficiency as it scales the assumed one
    assert gemm_efficiency(t4, 1, 384, 128, 256, precision="fp16") == pytest.approx(
        0.35 / 0.8 * gemm_efficiency(gpu_device(FAKE), 1, 384, 128, 256)
    )
    for precision, peak, efficiency in (("fp16", 1e12, 0.17), ("fp32", 1e11, 0.25),
                                        ("bf16", 1e12, roofline.ATTENTION_EFFICIENCY["hopper"])):  # fmt: skip
        op = OpCost("attention", "_scaled_dot_product_efficient_attention", precision, 10**9, 0)
        assert op_seconds(op, t4) == pytest.approx(1e9 / (peak * efficiency) + 13e-6), precision
    add = OpCost("elementwise", "add", "fp16", 10**6, 3 * 10**6)
    assert op_seconds(add, t4) == pytest.approx(3e6 / (1e9 * 0.85) + 13e-6)
    # a chip without a calibration: every assumption as before
    plain = gpu_device(FAKE, fp32_matmul="fp32")
    assert plain.precision_efficiency == {} and plain.launch_seconds == roofline.LAUNCH_SECONDS
    assert op_seconds(half, plain) == pytest.approx(half.flops / (1e12 * 0.8) + 5e-6)


def test_calibrations_name_real_chips_and_their_sources():
    from velora_cli.gpus import GPUS

    chips = {gpu.chip for gpu in GPUS.values()}
    for chip, calibration in roofline.CALIBRATIONS.items():
        assert chip in chips, chip
        assert calibration.source and calibration.efficiency
        for kind, by_precision in calibration.efficiency.items():
            assert kind in ("gemm", "attention"), kind
            assert all(0 < e <= 1 for e in by_precision.values()), (chip, kind)


def test_the_holdout_fit_recovers_known_factors():
    # benchmarks/roofline_holdout.py (how CALIBRATIONS were fitted): on synthetic cases whose
    # measured time is a known mix of the classes, the fit returns that mix and the cases it did
    # not see are predicted exactly; a fixed class keeps its factor
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "roofline_holdout.py"
    spec = importlib.util.spec_from_file_location("roofline_holdout", path)
    holdout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(holdout)
    truth = {"gemm16": 2.3, "gemm32": 1.0, "attention16": 2.0, "attention32": 1.4,
             "memory": 1.0, "kernel_us": 13.0}  # fmt: skip
    rng = __import__("random").Random(0)
    cases = []
    for i in range(12):
        classes = {k: rng.uniform(0.01, 1.0) for k in holdout.CLASSES}
        classes["kernel_us"] = rng.uniform(2000, 9000) * 1e-6
        measured = sum(classes[k] * truth[k] for k in holdout.CLASSES)
        cases.append({"id": f"c{i}", "measured": measured, "classes": classes})
    factors = holdout.fit(cases[:8], {"gemm32": 1.0, "memory": 1.0})
    for k, v in truth.items():
        assert factors[k] == pytest.approx(v, rel=1e-6), k
    assert max(abs(e) for e in holdout.errors(cases[8:], factors)) < 1e-9
    # as assumed (every factor 1, 5 µs per kernel) the same cases come out too fast
    assumed = {**dict.fromkeys(holdout.CLASSES, 1.0), "kernel_us": 5.0}
    assert min(holdout.errors(cases, assumed)) > 0
