"""Measured against predicted: signed errors, the bounds a case must meet, the summary.

The signed error of a tier is ``(predicted - measured) / measured`` (a fraction; negative =
under-predicted, the side that ends in an out-of-memory). The bounds are issue 23's: allocated
within ±3 %, reserved and device within ±5 %, tokens/s within ±15 %, and no device figure more
than 2 % low. No torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from velora_cli.validation.corpus import TIERS

# tier -> (lowest, highest) signed error allowed
BOUNDS: dict[str, tuple[float, float]] = {
    "allocated_bytes": (-0.03, 0.03),
    "reserved_bytes": (-0.05, 0.05),
    "device_bytes": (-0.02, 0.05),  # ±5 %, and never more than 2 % low (the OOM side)
    "tokens_per_second": (-0.15, 0.15),
}

# the estimate row's field predicting each tier
PREDICTED_FIELDS = {
    "allocated_bytes": "predicted_allocated_bytes",
    "reserved_bytes": "predicted_reserved_bytes",
    "device_bytes": "predicted_device_bytes",
    "tokens_per_second": "predicted_tokens_per_second",
}


def predicted_tiers(row: Mapping[str, Any], tiers: Iterable[str]) -> dict[str, Any]:
    """The estimate row's predictions for ``tiers`` (a tier it has no figure for is left out)."""
    out = {}
    for tier in tiers:
        value = row.get(PREDICTED_FIELDS[tier])
        if value is not None:
            out[tier] = value
    return out


def signed_errors(measured: Mapping[str, Any], predicted: Mapping[str, Any]) -> dict[str, float]:
    """``(predicted - measured) / measured`` for every tier both have (measured > 0)."""
    return {
        tier: (predicted[tier] - measured[tier]) / measured[tier]
        for tier in TIERS
        if tier in measured and tier in predicted and measured[tier]
    }


def out_of_bounds(errors: Mapping[str, float], bounds=BOUNDS) -> list[str]:
    """The tiers whose error is outside its bounds (``"device_bytes -3.1%"``); empty: passes."""
    failed = []
    for tier, error in errors.items():
        low, high = bounds[tier]
        if not low <= error <= high:
            failed.append(f"{tier} {100 * error:+.1f}%")
    return failed


def summarize(cases: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per source and GPU, per tier: cases compared, mean |error|, max |error|, mean signed
    error, the signed range, how many under-predicted; plus counts of cases, of the ones not
    expressible, failed, out of bounds, and out of bounds on a memory tier.

    Args:
        cases: the JSON cases of `run.validate` (keys ``source``, ``gpu``, ``expressible``,
            ``error``, ``status``).
    """
    groups: dict[str, dict[str, Any]] = {}
    for case in cases:
        key = f"{case['source']}/{case['gpu']}"
        group = groups.setdefault(
            key,
            {
                "source": case["source"],
                "gpu": case["gpu"],
                "cases": 0,
                "expressible": 0,
                "not_expressible": 0,
                "failed": 0,
                "out_of_bounds": 0,
                "memory_out_of_bounds": 0,
                "tiers": {},
            },  # fmt: skip
        )
        group["cases"] += 1
        if not case["expressible"]:
            group["not_expressible"] += 1
            continue
        group["expressible"] += 1
        if case.get("status") == "failed":
            group["failed"] += 1
        if case.get("out_of_bounds"):
            group["out_of_bounds"] += 1
        if any(not f.startswith("tokens_per_second") for f in case.get("out_of_bounds") or ()):
            group["memory_out_of_bounds"] += 1
        for tier, error in (case.get("error") or {}).items():
            group["tiers"].setdefault(tier, []).append(error)
    for group in groups.values():
        group["tiers"] = {
            tier: {
                "cases": len(errors),
                "mean_abs_error": sum(abs(e) for e in errors) / len(errors),
                "max_abs_error": max(abs(e) for e in errors),
                "mean_error": sum(errors) / len(errors),
                "min_error": min(errors),
                "max_error": max(errors),
                "under_predicted": sum(e < 0 for e in errors),
            }
            for tier, errors in sorted(group["tiers"].items(), key=lambda kv: TIERS.index(kv[0]))
        }
    return groups


def implied_efficiency(
    measured_seconds: float,
    predicted_seconds: float,
    by_kind: Mapping[str, float],
    gemm_efficiency: float | None = None,
) -> dict[str, float]:
    """What a measured step time says about the roofline's assumed efficiencies.

    Returns:
        ``scale``: predicted / measured seconds, the factor every assumed efficiency would need
        (1: the roofline is right; below 1: the GPU ran slower than assumed);
        ``gemm_efficiency``: the large-GEMM efficiency (of the dense peak) that would match the
        measurement if every other op's time held (absent when the other ops alone take longer
        than measured), relative to ``gemm_efficiency``, the large-GEMM efficiency the
        prediction used (default: the roofline's assumed `GEMM_EFFICIENCY`; a calibrated die's
        own, `gemm_efficiency_in_use`).
    """
    from velora_cli.timing.roofline import GEMM_EFFICIENCY

    used = GEMM_EFFICIENCY if gemm_efficiency is None else gemm_efficiency
    out = {"scale": predicted_seconds / measured_seconds}
    gemm = by_kind.get("gemm", 0.0)
    rest = sum(by_kind.values()) - gemm
    if gemm > 0 and measured_seconds > rest:
        out["gemm_efficiency"] = used * gemm / (measured_seconds - rest)
    return out


def gemm_efficiency_in_use(gpu: str, setup: Mapping[str, Any]) -> float:
    """The large-GEMM efficiency the roofline uses for a case's GEMMs: its die's calibrated
    value (timing.roofline.CALIBRATIONS) of the precision the step computes in (fp16 under AMP
    or with fp16/bf16 weights, else fp32), else the assumed `GEMM_EFFICIENCY`."""
    from velora_cli.gpus import get_gpu
    from velora_cli.timing.roofline import CALIBRATIONS, GEMM_EFFICIENCY

    calibration = CALIBRATIONS.get(get_gpu(gpu).chip)
    half = bool(setup.get("amp")) or setup.get("dtype") in ("float16", "bfloat16")
    if calibration is None:
        return GEMM_EFFICIENCY
    precision = "fp16" if half else "fp32"
    return calibration.efficiency.get("gemm", {}).get(precision, GEMM_EFFICIENCY)


def repeat_spread(measured: Mapping[str, float], predicted: float | None) -> dict[str, Any]:
    """How far apart a source's own repeats of one setup are, and the prediction against them.

    Information only: the bounds and the pass/fail verdict of a case stay its own measurement's.
    A prediction's error cannot be read more finely than the spread of the runs it is compared
    with (fitcheck times one step per run: its three runs of SmolLM2-1.7B, bs 4 x 1024, in one
    session are up to 12 % apart).

    Args:
        measured: case id -> measured tokens/s of every run of the setup (two or more).
        predicted: the predicted tokens/s (None: no prediction).

    Returns:
        ``runs`` (the ids), ``min``/``median``/``max`` tokens/s, ``spread`` (max / min − 1), and
        with a prediction ``error_vs_median`` and ``error_vs_range`` (0 when the prediction lies
        between the slowest and the fastest run, else its signed error against the nearer one).
    """
    values = sorted(measured.values())
    median = statistics.median(values)
    out: dict[str, Any] = {
        "runs": list(measured),
        "min": values[0],
        "median": median,
        "max": values[-1],
        "spread": values[-1] / values[0] - 1,
    }
    if predicted is not None:
        out["error_vs_median"] = (predicted - median) / median
        nearest = min(max(predicted, values[0]), values[-1])
        out["error_vs_range"] = (predicted - nearest) / nearest
    return out
