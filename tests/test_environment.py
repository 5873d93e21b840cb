"""The environment a document records: the same versions, read without importing what it names."""

import subprocess
import sys

import pytest


def test_the_peft_version_is_read_without_importing_peft():
    # importing peft imports bitsandbytes and torch._inductor: seconds of a quick start's time
    pytest.importorskip("peft")
    code = (
        "import sys; from velora_cli.profiling.profiler import environment; "
        "env = environment(); print('peft' in sys.modules, env['peft'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, version = out.stdout.split()
    assert imported == "False"
    import peft  # the version it reported is the one the package says

    assert version == peft.__version__


def test_an_imported_package_reports_its_own_version(monkeypatch):
    from velora_cli.profiling import profiler

    fake = type(sys)("fake_pkg_for_env")
    fake.__version__ = "9.9"
    monkeypatch.setitem(sys.modules, "fake_pkg_for_env", fake)
    assert profiler._installed_version("fake_pkg_for_env") == "9.9"
    assert profiler._installed_version("no_such_package_for_env") is None
