"""velora profile with low-rank optimizers: state as its own category, rows per optimizer."""

import json

import pytest
import torch
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec, Strategy
from velora_cli.profiling.profiler import run_profile

runner = CliRunner()


def _spec(model, optimizer, **kwargs):
    return StepSpec(model=model, batch_size=2, seq_len=16, optimizer=optimizer, rank=4, **kwargs)


def test_lowrank_state_is_smaller_and_counted_as_optimizer(mha_dir):
    rows = {name: EstimateBackend().measure(_spec(mha_dir, name)) for name in ("adamw", "galore")}
    adamw, galore = rows["adamw"], rows["galore"]
    assert adamw["status"] == galore["status"] == "ok"
    assert galore["optimizer_bytes"] < adamw["optimizer_bytes"]
    assert galore["param_bytes"] == adamw["param_bytes"]
    assert galore["optimizer_rank_cap"] == 4 and galore["optimizer_rank_max"] == 4
    # GaLore's rank is fixed: what it holds is its worst case
    assert galore["optimizer_worst_bytes"] == galore["optimizer_bytes"]
    for row in rows.values():  # the optimizer category at the peak is the state (rounded)
        assert row["peak_breakdown"]["optimizer"] >= row["optimizer_bytes"]


@pytest.mark.parametrize("optimizer", ["galore", "adarankgrad"])
def test_estimate_is_the_worst_case_of_the_cpu_run(mha_dir, optimizer):
    """On meta every weight runs at the rank cap; a real run's state is at most that."""
    spec = _spec(mha_dir, optimizer, strategy=Strategy(placement="paper", num_groups=4))
    est = EstimateBackend().measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok"
    assert est["optimizer_bytes"] == est["optimizer_worst_bytes"] == cpu["optimizer_worst_bytes"]
    assert cpu["optimizer_bytes"] <= est["optimizer_bytes"]
    if optimizer == "galore":
        assert cpu["optimizer_bytes"] == est["optimizer_bytes"]
    assert cpu["refresh_step_seconds"] > 0
    assert est["peak_bytes"] >= cpu["peak_bytes"] * 0.98


def test_rows_per_optimizer_with_deltas_against_the_first(mha_dir):
    spec = _spec(mha_dir, "adamw")
    strategies = [Strategy(), Strategy(placement="paper", num_groups=4)]
    doc = run_profile(spec, strategies, EstimateBackend(), optimizers=["adamw", "adarankgrad"])
    labels = [r["label"] for r in doc["rows"]]
    assert labels == [
        "adamw · baseline",
        "adamw · velora paper g4",
        "adarankgrad · baseline",
        "adarankgrad · velora paper g4",
    ]
    assert doc["optimizer"] == "adamw,adarankgrad"
    assert doc["optimizers"] == ["adamw", "adarankgrad r≤4 η=0.9 T=200"]
    lowrank_base = doc["rows"][2]
    assert (
        lowrank_base["peak_delta_bytes"]
        == lowrank_base["peak_bytes"] - doc["rows"][0]["peak_bytes"]
    )
    assert any("galore/adarankgrad" in n for n in doc["notices"])


def test_cli_profile_with_optimizers_json_and_table(mha_dir):
    args = ["profile", mha_dir, "--backend", "estimate", "-b", "1", "-s", "8", "--no-save"]
    args += ["--placements", "paper", "--num-groups", "4", "--gc-every", "1", "--no-velora-gc"]
    args += ["--optimizer", "adamw,galore", "--rank", "4", "--update-gap", "50"]
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["rows"]) == 6
    assert doc["settings"]["rank"] == 4 and doc["settings"]["update_gap"] == 50
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "memory at each row's peak, by category" in table.stdout
    assert "opt. state" in table.stdout and "rank cap 4" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "lion"], "--optimizer 'lion'"),
        (["--optimizer", "adamw,galore", "--mode", "lora"], "use --mode full"),
        (["--optimizer", "adarankgrad", "--eta", "1.5"], "--eta must be in (0, 1]"),
        (["--optimizer", "galore", "--rank", "0"], "--rank must be >= 1"),
        (["--optimizer", "galore", "--update-gap", "0"], "--update-gap must be >= 1"),
        (["--optimizer", ","], "--optimizer: give at least one"),
    ],
)
def test_cli_optimizer_errors_are_one_line(args, message):
    result = runner.invoke(app, ["profile", "llama-tiny", "--no-save", *args])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_spec_rejects_lowrank_with_adapters():
    with pytest.raises(SpecError, match="--mode full"):
        StepSpec(model="llama-tiny", mode="qlora", optimizer="adarankgrad")


def test_timed_steps_draw_new_batches_of_the_same_shape(mha_dir):
    """A repeated batch would make AdaRankGrad's convergence test fire on every timed step."""
    from velora_cli.measure.train_step import prepare

    prepared = prepare(_spec(mha_dir, "adarankgrad"), "cpu")
    first = prepared.micro_batches[0]["input_ids"].clone()
    prepared.next_batch()
    second = prepared.micro_batches[0]["input_ids"]
    assert second.shape == first.shape and not torch.equal(first, second)
    again = prepare(_spec(mha_dir, "adarankgrad"), "cpu")
    again.next_batch()
    assert torch.equal(again.micro_batches[0]["input_ids"], second)  # seeded


def test_cpu_row_counts_refreshes_made_by_timed_steps(mha_dir):
    row = CpuBackend(warmup=1, steps=2).measure(_spec(mha_dir, "adarankgrad"))
    assert row["status"] == "ok" and row["timed_refreshes"] >= 0
