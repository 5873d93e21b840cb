"""The command line as a user meets it: start-up, help, version, one-line errors."""

import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from velora_cli import __version__
from velora_cli.cli import app

runner = CliRunner()


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "from velora_cli.cli import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"velora {__version__}"


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "velora_cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "profile" in out.stdout and "tune" in out.stdout


# -- issue 18: what a newcomer met (one clear line, exit 1; output that matches the run) --------

# llama-tiny, 3 rows on the estimate backend
ROWS = ["llama-tiny", "--backend", "estimate", "--seq-len", "32", "--placements", "paper",
        "--num-groups", "32", "--gc-every", "1", "--no-velora-gc"]  # fmt: skip
TUNE = ["tune", "llama-tiny", "--backend", "estimate", "--seq-len", "32", "--mode", "full",
        "--optimizer", "adamw", "--placements", "paper", "--micro-batches", "4",
        "--gc-every", "1", "--probe-steps", "0"]  # fmt: skip


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    return tmp_path / "profiles"


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_no_arguments_prints_help_and_exits_0():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "Usage:" in result.output and "tune" in result.output


def test_models_lists_small_models_in_fractions_of_a_million():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    row = next(line for line in result.stdout.splitlines() if "llama-tiny" in line)
    assert "0.23M" in row and " 0M " not in row


def test_a_batch_size_beyond_int64_is_one_line(profiles):
    result = runner.invoke(app, ["profile", *ROWS, "--batch-size", "99999999999999999999"])
    message = one_line_error(result)
    assert "more than torch can index" in message and len(message) < 300
    assert "Exception raised from" not in result.stderr
    result = runner.invoke(app, ["profile", *ROWS, "--batch-size", "999999999999999"])
    assert "the widest activation" in one_line_error(result)  # int64 batch, overflowing logits


@pytest.mark.parametrize(
    ("budget", "says"),
    [
        ("1e400GB", "more than 8 EiB"),
        ("0", "is zero"),
        ("1.5B", "not a whole number of bytes"),
        ("1e-9GB", "under 1 MB, less than any model's training step"),
    ],
)
def test_budgets_that_make_no_sense(profiles, budget, says):
    message = one_line_error(runner.invoke(app, [*TUNE, "--budget", budget]))
    assert says in message and "OverflowError" not in message and "e.g. 0GB" not in message


def test_cuda_without_a_gpu_is_refused_before_the_model_is_looked_up(profiles, monkeypatch):
    from velora_cli import models
    from velora_cli.measure.cuda import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")

    def no_lookup(*args, **kwargs):
        raise AssertionError("resolved the model before checking the backend")

    monkeypatch.setattr(models, "resolve_model", no_lookup)
    for args in (["profile", "meta-llama/Llama-2-7b", "--backend", "cuda"],
                 ["tune", "meta-llama/Llama-2-7b", "--backend", "cuda", "--budget", "1GB"]):  # fmt: skip
        message = one_line_error(runner.invoke(app, args))
        assert "--backend cuda: no CUDA device is visible" in message


def test_export_output_paths(profiles, tmp_path):
    assert runner.invoke(app, [*TUNE, "--budget", "2GB"]).exit_code == 0
    message = one_line_error(runner.invoke(app, ["export-config", "-o", str(tmp_path)]))
    assert f"--output {tmp_path} is a directory; give a file name" in message
    missing = tmp_path / "no" / "such" / "c.json"
    message = one_line_error(runner.invoke(app, ["export-config", "-o", str(missing)]))
    assert f"directory {missing.parent} does not exist" in message
    target = tmp_path / "c.json"
    assert runner.invoke(app, ["export-config", "-o", str(target)]).exit_code == 0
    assert json.loads(target.read_text())["format"] == "velora-config"


def test_export_read_only_directory_is_one_line(profiles, tmp_path, monkeypatch):
    from velora_cli import files

    assert runner.invoke(app, [*TUNE, "--budget", "2GB"]).exit_code == 0

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # what a read-only directory answers
    message = one_line_error(runner.invoke(app, ["export-config", "-o", str(tmp_path / "c.json")]))
    assert (
        "cannot write in" in message and "Permission denied" in message and "Errno" not in message
    )


def test_export_of_a_profile_document_says_so(profiles):
    result = runner.invoke(app, ["profile", *ROWS])
    assert result.exit_code == 0, result.output
    (saved,) = profiles.glob("profile-*.json")
    message = one_line_error(runner.invoke(app, ["export-config", "--from", str(saved)]))
    assert "this is a profile document (velora profile), not a tune document" in message
    assert "velora tune llama-tiny --budget SIZE" in message


def test_piped_tables_are_never_cut(profiles):
    result = runner.invoke(app, ["profile", *ROWS, "--breakdown"])
    assert result.exit_code == 0, result.output
    assert "model.layers.*.post_attention_layernorm" in result.stdout  # was model.layers.*.ml…
    assert "…" not in result.stdout


def test_estimate_footer_does_not_claim_a_device(profiles):
    result = runner.invoke(app, ["profile", *ROWS])
    assert "estimated on meta tensors, no device used; torch" in result.stdout
    assert "measured on CPU" not in result.stdout


def test_tune_table_leaves_unprobed_loss_blank_and_says_min_grad_cos():
    from velora_cli.commands.output import wide_console
    from velora_cli.report import tune_table

    row = {"mode": "full", "placement": None, "num_groups": None, "gc": False,
           "micro_batch_size": 4, "grad_accum_steps": 1, "optimizer": "adamw", "key": "exact",
           "status": "feasible", "measure_status": "ok", "peak_bytes": 100, "step_seconds": 1.0,
           "tokens_per_second": 10.0, "estimate_peak_bytes": 100, "loss": None,
           "loss_increase": 0.0, "grad_cosine_min": None, "note": ""}  # fmt: skip
    probed = {**row, "key": "velora", "placement": "paper", "num_groups": 32, "peak_bytes": 90,
              "loss": 2.5, "loss_increase": 0.0021, "grad_cosine_min": 0.93}  # fmt: skip
    doc = {"model": "m", "batch_size": 4, "seq_len": 8, "precision": "p", "backend": "cpu",
           "budget_bytes": 1000, "limit_bytes": 950, "candidates": [row, probed]}  # fmt: skip
    console = wide_console(io.StringIO())
    console.print(tune_table(doc))
    text = console.file.getvalue()
    assert "min grad cos" in text and "+0.21%" in text and "0.930" in text
    exact = next(
        line for line in text.splitlines() if "micro-batch 4 × 1" in line and "velora" not in line
    )
    assert "+0.00%" not in exact
