"""`velora tune` and `velora export-config` as a user meets them: arguments, output, errors."""

import json

import pytest
from typer.testing import CliRunner

from velora_cli.cli import app

runner = CliRunner()
# llama-tiny, 4 candidates (baseline, gc, VeLoRA paper, both), estimated only: a second or two
# (AdamW only: the low-rank optimizers, which triple the candidates, have their own test)
TINY = ["llama-tiny", "--batch-size", "4", "--seq-len", "128", "--backend", "estimate",
        "--micro-batches", "4", "--placements", "paper", "--gc-every", "1",
        "--mode", "full", "--optimizer", "adamw"]  # fmt: skip


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    return tmp_path / "profiles"


def tune(*args):
    return runner.invoke(app, ["tune", *TINY, *args])


def test_tune_json_document_and_export_round_trip(tmp_path, profiles):
    # the estimate's peaks are device-level (a 1 GiB CUDA context included): 2 GB leaves room
    result = tune("--budget", "2GB", "--format", "json", "--probe-steps", "0")
    assert result.exit_code == 0, result.output
    assert "budget: 2 GB = 1.86 GiB" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["budget_bytes"] == 2 * 10**9 and doc["backend"] == "estimate"
    rec = doc["recommendation"]
    assert rec["status"] == "ok" and rec["budget_bytes"] == 2 * 10**9
    assert rec["peak_bytes"] == rec["predicted_device_bytes"] > rec["allocator_peak_bytes"]
    assert rec["peak_source"].startswith("predicted_device_bytes")
    for field in ("micro_batch_size", "grad_accum_steps", "mode", "peak_bytes", "loss_increase"):
        assert field in rec and all(field in row for row in doc["candidates"])
    saved = sorted(profiles.glob("tune-llama-tiny-*"))
    assert [p.suffix for p in saved] == [".json", ".jsonl"]

    out = runner.invoke(app, ["export-config"])  # the latest tune document
    assert out.exit_code == 0, out.output
    velora = json.loads(out.stdout)
    assert velora["format"] == "velora-config" and velora["model"] == "llama-tiny"

    lora = tmp_path / "lora.json"  # a full fine-tune: never velora's format where PEFT was asked
    out = runner.invoke(app, ["export-config", "--format", "peft", "-o", str(lora)])
    assert out.exit_code == 1 and out.stdout == "" and not lora.exists()
    assert "error: not expressible as a peft.LoraConfig: mode full" in out.stderr
    assert "measure it with: velora tune llama-tiny --budget 2GB" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    target = tmp_path / "trainer.json"
    out = runner.invoke(app, ["export-config", "--format", "trainer", "-o", str(target)])
    assert out.exit_code == 0 and f"wrote {target}" in out.stderr
    trainer = json.loads(target.read_text())
    assert trainer["training_arguments"]["per_device_train_batch_size"] == 4
    assert "TrainingArguments(" in trainer["snippet"]


def test_tune_table_shows_the_recommendation_and_why():
    result = tune("--budget", "2GB", "--probe-steps", "0")
    assert result.exit_code == 0, result.output
    assert "recommended: full" in result.stdout and "why:" in result.stdout
    assert "estimated, not run" in result.stdout
    assert "(predicted device memory: allocator-reserved + CUDA context;" in result.stdout


def test_lora_all_linear_exports_a_peft_config(profiles):
    import peft

    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.train_step import StepSpec, Strategy

    # a budget between LoRA with VeLoRA on every adapter and plain LoRA, without checkpointing;
    # llama-60m at 4 × 256: VeLoRA's saving (~70 MB) survives the allocator's segments (llama-
    # tiny's few MB do not: both reserve the same segments)
    spec = StepSpec("llama-60m", batch_size=4, seq_len=256, mode="lora")
    # (the tune compares the budget with the device-level prediction)
    plain = EstimateBackend().measure(spec)["predicted_device_bytes"]
    velora = EstimateBackend().measure(spec.with_strategy(Strategy("all-linear", 32)))[
        "predicted_device_bytes"
    ]
    assert velora < plain
    budget = f"{(velora + plain) // 2}B"
    result = runner.invoke(app, ["tune", "llama-60m", *TINY[1:], "--budget", budget, "--margin",
                                 "0", "--mode", "lora", "--seq-len", "256", "--placements",
                                 "all-linear", "--probe-steps", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(next(profiles.glob("tune-*.json")).read_text())
    assert doc["recommendation"]["key"] == "lora|all-linear|g32|gc=off|mb4x1|adamw"
    out = runner.invoke(app, ["export-config", "--format", "peft"])
    assert out.exit_code == 0 and all(line.startswith("note: ") for line in out.stderr.splitlines())
    assert "the measured run used 1.0" in out.stderr
    lora = peft.LoraConfig(**json.loads(out.stdout))
    assert lora.velora_config.num_groups == 32 and lora.r == 8
    assert lora.task_type == "CAUSAL_LM" and "task" in doc and doc["task"] == "causal-lm"


def test_tune_searches_low_rank_optimizers_and_exports_them(profiles, tmp_path):
    # 256 wide: GaLore's smaller state (~10 MB less than AdamW's) shows through the 2 MiB
    # segments of the device-level prediction, which llama-tiny's (under 1 MB) would not
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1024).save_pretrained(tmp_path / "wide")  # fmt: skip
    args = ["tune", str(tmp_path / "wide"), *TINY[1:]]
    result = runner.invoke(app, [*args, "--budget", "2GB", "--optimizer", "adamw,galore",
                                 "--rank", "8", "--update-gap", "50", "--eta", "0.8",
                                 "--placements", "none", "--objective", "memory",
                                 "--probe-steps", "0", "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["optimizer"] == "adamw,galore"
    assert [doc["settings"][k] for k in ("rank", "update_gap", "eta")] == [8, 50, 0.8]
    keys = [row["key"] for row in doc["candidates"]]
    assert len(keys) == len(set(keys)) == 2 * 2  # optimizers × (no gc, gc)
    assert any("galore/adarankgrad (full mode only)" in note for note in doc["notices"])
    rec = doc["recommendation"]  # the smallest optimizer state (AdaRankGrad's cap ties with it)
    assert (rec["optimizer"], rec["gc"], rec["optimizer_rank_cap"]) == ("galore", True, 8)
    assert rec["optimizer_targets"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from velora_cli import report

    assert report.describe(rec) == "full · galore · gc · micro-batch 4 × 1"

    out = runner.invoke(app, ["export-config"])
    velora = json.loads(out.stdout)
    assert [velora[k] for k in ("optimizer", "rank", "update_gap", "eta")] == ["galore", 8, 50, 0.8]
    out = runner.invoke(app, ["export-config", "--format", "trainer"])
    assert out.exit_code == 0 and "note: GaLore: optim='galore_adamw' needs" in out.stderr
    args = json.loads(out.stdout)["training_arguments"]
    assert args["optim"] == "galore_adamw"
    assert args["optim_args"] == "rank=8,update_proj_gap=50,scale=0.25"


# -- one test per error path: message and exit code --------------------------------------------


def test_bad_budget():
    result = tune("--budget", "10XB")
    assert result.exit_code == 1
    assert "error: unknown unit 'XB' in budget '10XB'" in result.stderr


def test_no_budget_and_no_gpu():
    result = tune()
    assert result.exit_code == 1 and "pass --budget, e.g. --budget 10GB" in result.stderr


def test_nothing_fits_shows_the_smallest_configuration():
    result = tune("--budget", "1MB", "--probe-steps", "0")
    assert result.exit_code == 1
    assert "error: no configuration fits" in result.stderr
    assert "smallest configuration: full" in result.stdout and "peak" in result.stdout


def test_unknown_tune_option_values():
    result = tune("--budget", "1GB", "--format", "xml")
    assert result.exit_code == 1 and "--format 'xml': choose table or json" in result.stderr
    result = tune("--budget", "1GB", "--objective", "fun")
    assert result.exit_code == 1 and "choose speed, memory, accuracy" in result.stderr
    result = tune("--budget", "1GB", "--micro-batches", "3")
    assert result.exit_code == 1 and "do not divide batch size 4" in result.stderr


def test_unknown_optimizer():
    result = tune("--budget", "1GB", "--optimizer", "adamw,adam")
    assert result.exit_code == 1
    assert "error: --optimizer adam: choose from adamw, sgd, galore, adarankgrad" in result.stderr


def test_low_rank_optimizer_with_adapter_modes_only():
    result = tune("--budget", "1GB", "--mode", "lora,qlora", "--optimizer", "galore,adarankgrad")
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --optimizer galore,adarankgrad projects full weight gradients")
    assert last.endswith("add full to --mode, or adamw to --optimizer")


def test_resume_without_a_journal():
    result = tune("--budget", "1GB", "--resume")
    assert result.exit_code == 1 and "no tune journal under" in result.stderr


def test_resume_with_other_settings():
    assert tune("--budget", "2GB", "--probe-steps", "0").exit_code == 0
    result = tune("--probe-steps", "0", "--resume", "--seq-len", "64")
    assert result.exit_code == 1
    assert "cannot resume" in result.stderr and "seq_len=128" in result.stderr


def test_resume_finishes_from_the_journal(profiles):
    assert tune("--budget", "2GB", "--probe-steps", "0").exit_code == 0
    result = tune("--probe-steps", "0", "--resume")  # the budget comes from the journal
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and "finished results" in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert progress and all("] resume " in line for line in progress)  # nothing run again
    assert len(list(profiles.glob("tune-*.json"))) == 1


def test_export_without_a_tune_document():
    result = runner.invoke(app, ["export-config"])
    assert result.exit_code == 1
    assert "no tune document under" in result.stderr and "run velora tune first" in result.stderr


def test_export_from_a_corrupt_config(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "velora-config", ')
    result = runner.invoke(app, ["export-config", "--from", str(bad)])
    assert result.exit_code == 1
    assert f"error: {bad} is not valid JSON" in result.stderr


def test_export_unknown_format():
    result = runner.invoke(app, ["export-config", "--format", "yaml"])
    assert result.exit_code == 1
    assert (
        "--format 'yaml': choose velora, peft, trainer, trl, accelerate, torchrun" in result.stderr
    )


def test_export_of_a_tune_where_nothing_fitted():
    assert tune("--budget", "1MB", "--probe-steps", "0").exit_code == 1
    result = runner.invoke(app, ["export-config"])
    assert result.exit_code == 1 and "nothing to export" in result.stderr


def test_probe_steps_default_matches_the_probe_module():
    import inspect

    from velora_cli.commands.tune import tune
    from velora_cli.search import autotune, probes

    defaults = {k: p.default for k, p in inspect.signature(tune).parameters.items()}
    assert defaults["probe_steps"] == probes.DEFAULT_STEPS == autotune.DEFAULT_PROBE_STEPS
    settings = autotune.TuneSettings("m", budget_bytes=1, backend="cpu")
    assert defaults["optimizer"] == ",".join(autotune.DEFAULT_OPTIMIZERS)
    assert (defaults["update_gap"], defaults["eta"]) == (settings.update_gap, settings.eta)


def test_a_tune_that_fails_before_any_result_leaves_no_journal(profiles):
    # issue 28: --weights on a built-in failed after the journal was created, and left it empty
    result = runner.invoke(app, ["tune", "llama-tiny", "--weights", "--backend", "cpu",
                                 "--budget", "1GB", "--probe-steps", "0"])  # fmt: skip
    assert result.exit_code == 1 and "built-in architectures have no weights" in result.stderr
    assert not list(profiles.glob("tune-*"))


def test_nothing_fits_says_when_the_weights_alone_exceed_the_budget():
    # issue 28: "more --placements" was suggested where parameters + gradients + optimizer state
    # alone exceed the budget (placements only shrink activations)
    result = runner.invoke(app, ["tune", "llama-tiny", "--backend", "estimate", "--budget", "2MB",
                                 "--probe-steps", "0", "--mode", "full", "--optimizer", "adamw",
                                 "--placements", "none"])  # fmt: skip
    assert result.exit_code == 1
    said = " ".join(result.stdout.split())
    assert "gradients and optimizer state alone take" in said
    assert "no placement, checkpointing or smaller batch helps" in said
    assert "more --placements" not in said
    from velora_cli.report.tune import nothing_fits_lines

    document = {"reason": "r", "limit_bytes": 10**9,
                "smallest": {"mode": "full", "placement": None, "num_groups": None, "gc": True,
                             "micro_batch_size": 1, "grad_accum_steps": 1, "optimizer": "adamw",
                             "peak_source": "estimate", "smallest_peak_bytes": 2 * 10**9,
                             "static_bytes": 10**8}}  # fmt: skip
    assert "more --placements" in nothing_fits_lines(document)[-1]  # activations do dominate
