"""velora profile: backends agree with independent counts, rows are planned, saved and reported."""

import json

import pytest
import torch
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec, Strategy, prepare, train_step
from velora_cli.profiling.profiler import plan_strategies, run_profile, validate_strategies

runner = CliRunner()


def _plain_saved_bytes(model, batch):
    """An independent count: saved_tensors_hooks, storages de-duplicated, parameters excluded."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    seen = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(seen.values())


def test_estimate_activation_bytes_match_a_plain_saved_tensor_count(mha_dir):
    from velora_cli.emulation.attention import register_estimate_attention

    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, dtype="bf16")
    row = EstimateBackend().measure(spec)
    prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
    train_step(prepared)  # same warm-up as the backend
    plain = _plain_saved_bytes(prepared.model, prepared.micro_batches[0])
    assert row["status"] == "ok"
    assert row["activation_bytes"] == pytest.approx(plain, rel=0.02)


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize(
    "strategy", [Strategy(), Strategy(placement="paper", num_groups=4), Strategy(gc=True)]
)
def test_estimate_and_cpu_agree_on_activations(mha_dir, strategy, amp):
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32, amp=amp, strategy=strategy)
    est = EstimateBackend().measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok"
    assert est["activation_bytes"] == pytest.approx(cpu["activation_bytes"], rel=0.01)
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert est[key] == cpu[key]
    assert est["peak_bytes"] == pytest.approx(cpu["peak_bytes"], rel=0.02)
    assert cpu["step_seconds"] > 0 and est["step_seconds"] is None


def test_velora_and_checkpointing_reduce_saved_activations(mha_dir):
    spec = StepSpec(model=mha_dir, batch_size=2, seq_len=32)
    rows = {
        s.label: EstimateBackend().measure(spec.with_strategy(s))
        for s in (Strategy(), Strategy(placement="down", num_groups=4), Strategy(gc=True))
    }
    base = rows["baseline"]["activation_bytes"]
    # down_proj's input (T x 128 fp32 per layer) leaves; z (T x 4) arrives
    t = 2 * 32
    expected = 2 * (t * 128 * 4 - t * 4 * 4)
    assert base - rows["velora down g4"]["activation_bytes"] == expected
    assert rows["gc"]["activation_bytes"] < base / 2


def test_lora_mode_wraps_adapter_inputs(mha_dir):
    spec = StepSpec(
        model=mha_dir,
        batch_size=2,
        seq_len=16,
        mode="lora",
        lora_rank=4,
        strategy=Strategy(placement="paper", num_groups=4),
    )
    prepared = prepare(spec, "meta")
    assert prepared.wrapped and all(n.endswith("lora_A.default") for n in prepared.wrapped)
    row = EstimateBackend().measure(spec)
    assert row["status"] == "ok"
    assert row["trainable_params"] < sum(p.numel() for p in prepared.model.parameters()) / 10


def test_plan_strategies():
    rows = plan_strategies(["paper", "mlp"], num_groups=[32, 16], gc_every=[1, 2])
    labels = [r.label for r in rows]
    assert labels == [
        "baseline",
        "gc",
        "gc every 2",
        "velora paper g32",
        "velora paper g16",
        "velora mlp g32",
        "velora mlp g16",
        "velora paper g32 + gc",  # the paper's M = D/32 where it is a choice
        "velora mlp g32 + gc",
    ]
    assert [r.kind for r in rows][:3] == ["baseline", "gc", "gc"]
    rows = plan_strategies(["paper"], num_groups=[16, 8, 4], gc_every=[1])
    assert rows[-1].label == "velora paper g8 + gc"  # else the middle choice
    with pytest.raises(SpecError):
        plan_strategies(["paper"], num_groups=[4], sub_token_sizes=[8])


def test_invalid_sub_token_rows_are_errors_or_refused(mha_dir):
    spec = StepSpec(model=mha_dir, batch_size=1, seq_len=8)
    # 3 divides no width (64, 128): refused up front
    with pytest.raises(SpecError, match="divides no targeted layer"):
        validate_strategies(spec, [Strategy(placement="paper", sub_token_size=3)])
    # M=128 fits down_proj (in 128) but not v_proj (in 64): that row is an error, not the run
    invalid = validate_strategies(spec, [Strategy(placement="paper", sub_token_size=128)])
    assert "v_proj" in next(iter(invalid.values()))


def test_profile_saves_after_every_row_and_keeps_rows_on_interrupt(mha_dir, tmp_path):
    spec = StepSpec(model=mha_dir, batch_size=1, seq_len=8)
    strategies = plan_strategies(["paper"], num_groups=[4], gc_every=[])

    class Interrupting:
        name = "estimate"

        def __init__(self):
            self.calls = 0

        def measure(self, spec, breakdown=False):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return EstimateBackend().measure(spec)

    path = tmp_path / "p.json"
    with pytest.raises(KeyboardInterrupt):
        run_profile(spec, strategies, Interrupting(), save_path=path)
    saved = json.loads(path.read_text())
    assert [r["label"] for r in saved["rows"]] == ["baseline", "gc"]
    assert not list(tmp_path.glob(".p.json.*"))  # no temp files left behind


def test_document_shape(mha_dir, tmp_path):
    spec = StepSpec(model=mha_dir, batch_size=1, seq_len=8)
    doc = run_profile(
        spec,
        [Strategy(), Strategy(placement="down", num_groups=2)],
        EstimateBackend(),
        breakdown=True,
        save_path=tmp_path / "d.json",
    )
    for key in (
        "model",
        "mode",
        "batch_size",
        "seq_len",
        "dtype",
        "backend",
        "environment",
        "rows",
    ):
        assert key in doc
    for key in ("torch", "transformers", "gpu_name", "cuda", "driver"):
        assert key in doc["environment"]
    row = doc["rows"][1]
    for key in (
        "strategy",
        "placement",
        "num_groups",
        "sub_token_size",
        "gc",
        "status",
        "peak_bytes",
        "activation_bytes",
        "param_bytes",
        "grad_bytes",
        "optimizer_bytes",
        "step_seconds",
        "tokens_per_second",
        "peak_delta_bytes",
        "activation_delta_bytes",
        "activation_breakdown",
    ):
        assert key in row, key
    assert row["strategy"] == "velora" and row["activation_delta_bytes"] < 0
    assert any("down_proj" in k for k in row["activation_breakdown"])
    assert json.loads((tmp_path / "d.json").read_text())["rows"][1]["label"] == row["label"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_runs_a_row(mha_dir):
    from velora_cli.measure.cuda import CudaBackend

    row = CudaBackend(warmup=1, steps=2).measure(StepSpec(model=mha_dir, batch_size=2, seq_len=32))
    assert row["status"] == "ok" and row["peak_bytes"] > 0 and row["step_seconds"] > 0


# ---- the command line ------------------------------------------------------------------------


def _run(*args):
    return runner.invoke(app, ["profile", *args, "--no-save"])


def test_cli_json_output(mha_dir):
    result = _run(
        mha_dir,
        "--backend",
        "estimate",
        "--batch-size",
        "1",
        "--seq-len",
        "8",
        "--placements",
        "paper",
        "--num-groups",
        "4",
        "--gc-every",
        "1",
        "--no-velora-gc",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["label"] for r in doc["rows"]] == ["baseline", "gc", "velora paper g4"]


def test_cli_saves_profile(mha_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path))
    result = runner.invoke(
        app,
        [
            "profile",
            mha_dir,
            "--backend",
            "estimate",
            "-b",
            "1",
            "-s",
            "8",
            "--placements",
            "down",
            "--num-groups",
            "2",
            "--gc-every",
            "1",
            "--format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = list(tmp_path.glob("profile-*.json"))
    assert len(saved) == 1 and f"saved: {saved[0]}" in result.stderr
    assert result.stdout.splitlines()[0].startswith("strategy,label,")


@pytest.mark.parametrize(
    "args,message",
    [
        (["no-such-model-xyz"], "no-such-model-xyz"),
        (["llama-tiny", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["llama-tiny", "--backend", "tpu"], "--backend 'tpu'"),
        (
            ["llama-tiny", "--backend", "estimate", "--sub-token-size", "7"],
            "divides no targeted layer",
        ),
        (["llama-tiny", "--num-groups", "a,b"], "comma-separated integers"),
        (["llama-tiny", "--placements", "nope"], "unknown placement 'nope'"),
        (["llama-tiny", "--dtype", "fp8"], "--dtype 'fp8'"),
        (["llama-tiny", "--format", "xml"], "--format 'xml'"),
        (["llama-tiny", "--amp", "bf16", "--dtype", "bf16"], "--amp keeps fp32 master weights"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = _run(*args)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_backend_without_cuda():
    result = _run("llama-tiny", "--backend", "cuda")
    assert result.exit_code == 1 and "no CUDA device" in result.stderr


def test_cli_debug_shows_traceback():
    result = runner.invoke(
        app, ["--debug", "profile", "llama-tiny", "--batch-size", "0", "--no-save"]
    )
    assert result.exit_code == 1 and result.exception is not None


def test_cli_default_sizes_are_chosen_to_fit_the_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    ).save_pretrained(tmp_path / "m")
    result = _run(
        str(tmp_path / "m"),
        "--backend",
        "estimate",
        "-b",
        "1",
        "-s",
        "8",
        "--placements",
        "paper",
        "--gc-every",
        "1",
        "--no-velora-gc",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    labels = [r["label"] for r in json.loads(result.stdout)["rows"]]
    # widths 64 and 96: 64 fits no down projection, so three choices from 32 down, no notice
    assert labels == ["baseline", "gc", "velora paper g32", "velora paper g16", "velora paper g8"]
    assert "left out" not in result.stderr and "note:" not in result.stderr
    assert any("default --num-groups 32,16,8" in n for n in json.loads(result.stdout)["notices"])
    # asked for explicitly, the same choice is a row with its reason
    result = _run(
        str(tmp_path / "m"),
        "--backend",
        "estimate",
        "-b",
        "1",
        "-s",
        "8",
        "--placements",
        "paper",
        "--num-groups",
        "64,32",
        "--gc-every",
        "1",
        "--no-velora-gc",
        "--format",
        "json",
    )
    rows = json.loads(result.stdout)["rows"]
    assert rows[2]["status"] == "error" and "in_features=96" in rows[2]["error"]


def test_a_full_mode_estimate_does_not_import_peft_or_bitsandbytes():
    # `import peft` pulls in bitsandbytes and torch._inductor, seconds of the quick start: a
    # full-mode row needs neither (the document's peft version: tests/test_environment.py)
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from velora_cli.estimate.backend import EstimateBackend\n"
        "from velora_cli.measure.train_step import StepSpec\n"
        "row = EstimateBackend().measure(StepSpec(model='llama-tiny', batch_size=1, seq_len=8))\n"
        "print(json.dumps([row['status'],\n"
        "                  sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["ok", []]


def test_cli_debug_shows_the_traceback_of_a_row_that_failed(monkeypatch):
    import logging

    from velora_cli.estimate.backend import EstimateBackend

    def broken(self):
        raise RuntimeError("a kernel the estimate cannot run")

    monkeypatch.setattr(EstimateBackend, "fast_path", broken)
    logger = logging.getLogger("velora_cli")
    level, handlers = logger.level, list(logger.handlers)
    args = ["profile", "llama-tiny", "--backend", "estimate", "--placements", "paper",
            "--no-save", "--format", "json"]  # fmt: skip
    try:
        quiet = runner.invoke(app, args)
        loud = runner.invoke(app, ["--debug", *args])
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
    assert "a kernel the estimate cannot run" in quiet.output and "Traceback" not in quiet.output
    assert "Traceback" in loud.stderr and "in broken" in loud.stderr
