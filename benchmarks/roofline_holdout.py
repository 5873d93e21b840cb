"""Fit the roofline's efficiencies on one part of the corpus's timed cases, check them on the rest.

    python benchmarks/roofline_holdout.py --gpu t4 --hold-out 2026-09-21
    python benchmarks/roofline_holdout.py --gpu v100-16gb --only fp16 --leave-one-out

How `timing/roofline.py`'s `CALIBRATIONS` were found (issue 23: "change an assumed efficiency only
where several independent cases agree"). Every timed case is predicted as `velora validate` does,
and its counted ops are priced with the ASSUMED efficiencies (the chip's calibration switched
off), split into classes: fp16 and fp32 GEMMs, fused attention in fp16 and fp32, the memory-bound
ops, and the kernel count. Then ``measured ≈ Σ_class factor × assumed time of the class +
seconds per kernel × kernels`` is fitted (non-negative least squares on the relative error) on
the cases that are not held out, and the held-out cases are predicted with the fitted factors.
A factor's implied efficiency is the assumed one over it. Classes given with ``--fixed`` keep
that factor (1: as assumed). Nothing here changes an efficiency. About 5 s per case here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from roofline_calibration import nnls  # noqa: E402

CLASSES = ("gemm16", "gemm32", "attention16", "attention32", "memory", "kernel_us")


def class_seconds(counts, gpu: str, micro_batches: int) -> dict[str, float]:
    """Seconds per class at the assumed efficiencies (no calibration, no launch cost), and the
    kernels launched (``kernel_us``: kernels × 1e-6, so its factor is µs per kernel)."""
    from velora_cli.gpus import get_gpu
    from velora_cli.timing import roofline

    device = roofline.gpu_device(get_gpu(gpu))
    device = dataclasses.replace(device, precision_efficiency={}, launch_seconds=0.0)
    out = dict.fromkeys(CLASSES, 0.0)
    extra = max(0, micro_batches - counts.micro_batches)
    last = max((s.micro for s in counts.segments if s.micro is not None), default=None)
    for segment in counts.segments:
        repeat = 1 + (extra if segment.micro is not None and segment.micro == last else 0)
        for op, n in segment.ops:
            seconds = roofline.op_seconds(op, device) * n * repeat
            half = op.precision in ("fp16", "bf16")
            if op.kind in ("gemm", "attention"):
                out[f"{op.kind}{16 if half else 32}"] += seconds
            else:
                out["memory"] += seconds
            out["kernel_us"] += roofline.op_launches(op, device) * n * repeat * 1e-6
    return out


def timed_cases(gpu: str, only: str | None) -> list[dict]:
    """Predict every timed case of ``gpu`` (``only``: ids containing it) and price its ops."""
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.validation.corpus import load_cases
    from velora_cli.validation.run import validate

    captured: dict[str, dict] = {}
    current: dict[str, str] = {}

    class Capturing(EstimateBackend):
        def finish(self, prepared, row, trace, counts, *, regular=None):
            if counts is not None:
                captured[current["id"]] = class_seconds(
                    counts, self.gpu, prepared.spec.grad_accum_steps
                )
            return super().finish(prepared, row, trace, counts, regular=regular)

    backends: dict[tuple, EstimateBackend] = {}

    def predict(case, mapped, spec):
        current["id"] = case.id
        key = (case.gpu, case.cuda_version, tuple(sorted(mapped.backend.items())))
        if key not in backends:
            backends[key] = Capturing(
                gpu=case.gpu, cuda_version=case.cuda_version, alloc_conf="", **mapped.backend
            )
        return backends[key].measure(spec)

    cases = [
        c
        for c in load_cases()
        if c.gpu == gpu
        and (c.record.get("measured") or {}).get("step_seconds")
        and (only is None or only in c.id)
    ]
    document = validate(cases, predict=predict)
    out = []
    for case in document["cases"]:
        if case["id"] in captured and case.get("timing"):
            out.append(
                {
                    "id": case["id"],
                    "measured": case["timing"]["measured_step_seconds"],
                    "classes": captured[case["id"]],
                }
            )
    return out


def fit(cases: list[dict], fixed: dict[str, float]) -> dict[str, float]:
    """Factors per class (the fixed ones as given), least squares on the relative error."""
    free = [k for k in CLASSES if k not in fixed and any(c["classes"][k] for c in cases)]
    a = np.array([[c["classes"][k] / c["measured"] for k in free] for c in cases])
    b = np.array(
        [1 - sum(c["classes"][k] * v for k, v in fixed.items()) / c["measured"] for c in cases]
    )
    x = nnls(a, b) if free else np.zeros(0)
    return {**dict(fixed), **dict(zip(free, (float(v) for v in x), strict=True))}


def errors(cases: list[dict], factors: dict[str, float]) -> list[float]:
    """tokens/s errors, (predicted − measured) / measured = measured / predicted seconds − 1."""
    out = []
    for c in cases:
        predicted = sum(c["classes"][k] * factors.get(k, 0.0) for k in CLASSES)
        out.append(c["measured"] / predicted - 1)
    return out


def _line(name: str, errs: list[float]) -> str:
    e = np.array(errs)
    return (
        f"{name}: {len(e)} cases, tokens/s mean |err| {100 * abs(e).mean():.1f}%, signed "
        f"{100 * e.min():+.1f} … {100 * e.max():+.1f}%, outside ±15%: {int((abs(e) > 0.15).sum())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--only", help="only the cases whose id contains this")
    parser.add_argument("--hold-out", help="hold out the cases whose id contains this")
    parser.add_argument("--leave-one-out", action="store_true")
    parser.add_argument(
        "--fixed",
        default="gemm32=1,memory=1",
        help="class=factor,... kept fixed (default: fp32 GEMMs and memory-bound ops as assumed)",
    )
    args = parser.parse_args()
    fixed = {k: float(v) for k, v in (p.split("=") for p in args.fixed.split(",") if p)}
    cases = timed_cases(args.gpu, args.only)
    held = [c for c in cases if args.hold_out and args.hold_out in c["id"]]
    fitted = [c for c in cases if c not in held]
    factors = fit(fitted, fixed)
    print("factors (measured / assumed time; kernel_us: µs per kernel):")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in factors.items()))
    print(_line("as assumed (factors 1, 5 µs per kernel)",
                errors(cases, {**dict.fromkeys(CLASSES, 1.0), "kernel_us": 5.0})))  # fmt: skip
    print(_line("fitted cases", errors(fitted, factors)))
    if held:
        print(_line(f"held out ({args.hold_out})", errors(held, factors)))
    if args.leave_one_out:
        loo = [errors([c], fit([o for o in fitted if o is not c], fixed))[0] for c in fitted]
        print(_line("each fitted case left out in turn", loo))


if __name__ == "__main__":
    main()
