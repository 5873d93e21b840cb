"""The GPU reference suite's dry run: the same script on the CPU with tiny shapes, so it cannot rot
before a GPU is lent (benchmarks/gpu_suite.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_every_part_within_the_device_tools_file_limit(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        # the parts' deadlines are fractions of the limit: a generous one, so a loaded machine
        # (the suite runs on every core) still reaches the tune; the test checks plumbing, not speed
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_suite.py"),
            "--dry-run",
            "--out",
            str(out),
            "--time-limit",
            "450",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["documents.tar.gz", "log.txt", "summary.json", "summary.md"]  # <= 8 files
    results = json.loads((out / "summary.json").read_text())
    assert all(r["ok"] for r in results["correctness"].values()), results["correctness"]
    (case,) = results["profiles"].values()
    # cpu rows of an MHA tiny Llama beside the estimate: the plumbing compares real figures
    figures = {(c["row"], c["figure"]) for c in case["comparisons"]}
    assert ("baseline", "tensor peak") in figures and ("gc", "saved activations") in figures
    assert all(c["within"] for c in case["comparisons"]), case["comparisons"]
    assert results["layer_bench"], "the layer micro-benchmark did not run"
    assert results["tune"]["recommendation"], results["tune"]
    summary = (out / "summary.md").read_text()
    assert "| case | row | figure |" in summary and "estimates within ±5%" in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last


def test_gpu_comparisons_pair_each_prediction_with_its_measurement():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = suite  # dataclasses look their module up
    spec.loader.exec_module(suite)
    measured = {"baseline": {"status": "ok", "peak_bytes": 1000, "reserved_bytes": 1200,
                             "device_used_bytes": 3000, "process_used_bytes": 2000,
                             "activation_bytes": 400, "step_seconds": 0.1}}  # fmt: skip
    estimated = {"baseline": {"status": "ok", "predicted_allocated_bytes": 1040,
                              "predicted_reserved_bytes": 1300, "predicted_device_bytes": 2050,
                              "activation_bytes": 400, "predicted_step_seconds": 0.08,
                              "peak_bytes": 900}}  # fmt: skip
    found = {c["figure"]: c for c in suite.compare_rows(measured, estimated)}
    assert (
        found["allocated peak"]["error"] == pytest.approx(0.04)
        and found["allocated peak"]["within"]
    )
    assert not found["reserved peak"]["within"]  # +8.3%
    # device level: the worker's own NVML usage, not the whole device's
    assert found["device used (NVML)"]["measured_field"] == "process_used_bytes"
    assert found["device used (NVML)"]["within"]
    assert found["step time"]["error"] == pytest.approx(-0.2)
    assert set(found) == {"allocated peak", "reserved peak", "device used (NVML)",
                          "saved activations", "step time"}  # fmt: skip
