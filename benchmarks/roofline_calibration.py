"""What the corpus's timed cases imply for the roofline's assumed efficiencies, per op class.

    python -m velora_cli validate --format json -o validate.json
    python benchmarks/roofline_calibration.py validate.json

Issue 23 §3: "the corpus is also the calibration of the roofline: report each efficiency it
implies, and change an assumed efficiency only where several independent cases agree". Every
timed case gives its measured seconds per step and the roofline's predicted seconds per op class
(``timing.predicted_seconds_by_kind``: gemm, attention, elementwise, reduction, copy, foreach...).
Per GPU and GEMM precision (fp32, or fp16/bf16) this fits one factor per op class, ``measured ≈ Σ_k x_k · t_k`` (non-negative least
squares over the cases), so that ``x_k`` is how much longer that class ran than assumed and the
implied efficiency is the assumed one divided by ``x_k`` (GEMMs: of the dense peak; the memory
bound classes: of the DRAM bandwidth). It prints the factors, the implied efficiencies, the
signed errors left after the fit, and the same fit per source (independent harnesses), so that a
change is made only where independent sources agree. Nothing here changes an efficiency: the
calibrated ones are in timing/roofline.py (`CALIBRATIONS`, each with the rows it was fitted on
and the rows held out), and the factors printed are relative to the efficiencies in use.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from velora_cli.gpus import get_gpu  # noqa: E402
from velora_cli.timing.roofline import (  # noqa: E402
    BANDWIDTH_EFFICIENCY,
    CALIBRATIONS,
    GEMM_EFFICIENCY,
)

# a compute class with under this share of the predicted time joins the memory-bound ones
MIN_SHARE = 0.03


def timed_cases(document: dict) -> list[dict]:
    """(case id, source, gpu, measured seconds, predicted seconds by op class) of each timed case."""
    out = []
    for case in document["cases"]:
        timing = case.get("timing")
        if not timing or not timing.get("predicted_seconds_by_kind"):
            continue
        if unmodelled(case):
            continue
        out.append(
            {
                "id": case["id"],
                "source": case["source"],
                "gpu": case["gpu"],
                "precision": _precision(case.get("setup") or {}),
                "measured": timing["measured_step_seconds"],
                "by_kind": timing["predicted_seconds_by_kind"],
            }
        )
    return out


def unmodelled(case: dict) -> bool:
    """A case whose predicted step is not the one that ran (a mapping note says what is not
    modelled, e.g. fitcheck's K/V repeated before SDPA, which makes the estimate plan SDPA's math
    path where the GPU ran the memory-efficient kernel): its time says nothing about the
    efficiencies."""
    return any("not modelled" in note for note in case.get("notes") or ())


def _precision(setup: dict) -> str:
    """The GEMMs' math precision: fp16/bf16 under autocast or with half weights, else fp32 (the
    peaks differ by up to 8x, so the cases are fitted apart)."""
    if setup.get("amp") or setup.get("dtype") in ("float16", "bfloat16"):
        return "half"
    return "fp32"


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by enumeration of the support (a handful of op classes)."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(b**2))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            full = np.zeros(n)
            full[cols] = x
            residual = float(np.sum((a @ full - b) ** 2))
            if residual < best_residual:
                best, best_residual = full, residual
    return best


# Fitted apart: the compute-bound classes; every memory-bound class (elementwise, reduction,
# copy, foreach, ...) shares one factor, since a handful of cases cannot tell them apart (their
# times move together with the tokens).
COMPUTE = ("gemm", "attention")


def assumed_gemm(gpu: str, precision: str) -> float:
    """The large-GEMM efficiency the roofline uses now for ``gpu``'s GEMMs of ``precision``
    (``half``: fp16; its chip's calibration where `CALIBRATIONS` has one)."""
    calibration = CALIBRATIONS.get(get_gpu(gpu).chip)
    key = "fp16" if precision == "half" else "fp32"
    if calibration is not None:
        return calibration.efficiency.get("gemm", {}).get(key, GEMM_EFFICIENCY)
    return GEMM_EFFICIENCY


def fit(cases: list[dict]) -> dict:
    """Per op class group: the factor x (measured / predicted time) and the efficiency implied.

    Relative errors are what the bounds judge, so each case's equation is divided by its measured
    time (each case weighs the same whatever its length).
    """
    total = defaultdict(float)
    for case in cases:
        for kind, seconds in case["by_kind"].items():
            total[kind] += seconds
    whole = sum(total.values())
    compute = [k for k in COMPUTE if total.get(k, 0.0) / whole >= MIN_SHARE]
    columns = [*compute, "memory-bound"]

    def row(case):
        by = case["by_kind"]
        return [by.get(k, 0.0) for k in compute] + [
            sum(v for k, v in by.items() if k not in compute)
        ]

    a = np.array([row(c) for c in cases]) / np.array([[c["measured"]] for c in cases])
    b = np.ones(len(cases))
    x = nnls(a, b)
    errors = a @ x - 1.0  # (predicted - measured) / measured seconds, with the factors
    before = a.sum(axis=1) - 1.0
    out = {"cases": len(cases), "sources": sorted({c["source"] for c in cases}), "classes": {}}
    shares = a.sum(axis=0) / a.sum()
    for index, (kind, factor) in enumerate(zip(columns, x, strict=True)):
        if kind == "gemm":
            assumed = assumed_gemm(cases[0]["gpu"], cases[0]["precision"])
        elif kind == "memory-bound":
            assumed = BANDWIDTH_EFFICIENCY["elementwise"]
        else:
            assumed = None  # attention: per GPU family (roofline.ATTENTION_EFFICIENCY)
        out["classes"][kind] = {
            "share_of_predicted": float(shares[index]),
            "factor": float(factor),
            "assumed_efficiency": assumed,
            "implied_efficiency": (assumed / factor) if assumed and factor > 0 else None,
        }
    out["error_before"] = (float(before.min()), float(before.max()), float(np.abs(before).mean()))
    out["error_after"] = (float(errors.min()), float(errors.max()), float(np.abs(errors).mean()))
    return out


def report(document: dict) -> str:
    cases = timed_cases(document)
    left_out = sum(1 for c in document["cases"] if c.get("timing") and unmodelled(c))
    lines = []
    if left_out:
        lines.append(
            f"({left_out} timed cases left out: their notes name a part of the step that is not "
            "modelled, so the step predicted is not the one timed.)"
        )
        lines.append("")
    by_gpu: dict[str, list[dict]] = defaultdict(list)  # per GPU and GEMM precision
    for case in cases:
        by_gpu[f"{case['gpu']}, {case['precision']}"].append(case)
    for gpu, group in sorted(by_gpu.items()):
        result = fit(group)
        lines.append(
            f"## {gpu}: {result['cases']} timed cases from {len(result['sources'])} source(s) "
            f"({', '.join(result['sources'])})"
        )
        lines.append("")
        lines.append("| op class | share of predicted time | factor (measured/assumed time) "
                     "| assumed efficiency | implied efficiency |")  # fmt: skip
        lines.append("|:---|---:|---:|---:|---:|")
        for kind, c in result["classes"].items():
            assumed = "—" if c["assumed_efficiency"] is None else f"{c['assumed_efficiency']:.2f}"
            implied = "—" if c["implied_efficiency"] is None else f"{c['implied_efficiency']:.2f}"
            lines.append(
                f"| {kind} | {c['share_of_predicted']:.0%} | {c['factor']:.2f} | {assumed} | "
                f"{implied} |"
            )
        lo, hi, mean = result["error_before"]
        lines.append("")
        lines.append(f"Step time, (predicted − measured) / measured: {lo:+.0%} … {hi:+.0%} "
                     f"(mean |err| {mean:.0%}) as assumed; ")  # fmt: skip
        lo, hi, mean = result["error_after"]
        lines[-1] += f"with the fitted factors: {lo:+.0%} … {hi:+.0%} (mean |err| {mean:.0%})."
        calibration = CALIBRATIONS.get(get_gpu(group[0]["gpu"]).chip)
        if calibration is not None:
            values = ", ".join(
                f"{kind} {precision} {value:.2f}"
                for kind, by_precision in calibration.efficiency.items()
                for precision, value in by_precision.items()
            )
            lines.append(
                f"This die's calibration (timing/roofline.py CALIBRATIONS): {values}, from "
                f"{calibration.source}; the factors above are relative to the efficiencies in use."
            )
        elif len(result["sources"]) < 2:
            lines.append(
                "One source (one harness): not several independent cases; no assumed efficiency "
                "is changed from it."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    document = json.loads(Path(sys.argv[1]).read_text())
    print(report(document))


if __name__ == "__main__":
    main()
