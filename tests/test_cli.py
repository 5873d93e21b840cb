"""The command line as a user meets it: start-up, help, version, one-line errors."""

import subprocess
import sys

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
