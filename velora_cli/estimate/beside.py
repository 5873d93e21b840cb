"""The estimate beside a real measurement: what the estimate predicts for the GPU a cuda row ran
on, and its signed errors against what the row measured.

The cuda backend (`velora_cli.measure.cuda`) measures; it does not import the estimate, which sits
above it. The profile hands this function to it (`CudaBackend.beside`), so every ok cuda row
carries the prediction for its own GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velora_cli.measure.cuda import CudaBackend
    from velora_cli.measure.train_step import StepSpec


def estimate_beside(backend: CudaBackend, spec: StepSpec, row: dict[str, Any]) -> dict[str, Any]:
    """The estimate's device-memory prediction of this step, for the GPU the row ran on, and
    its error against the row's measurements (`device_memory.estimate_error`)."""
    from velora_cli.allocator.device_memory import estimate_error
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.gpus import DEFAULT_GPU, gpu_from_device_name
    from velora_cli.timing.step_time import PREDICTED_FIELDS

    gpu = gpu_from_device_name(row.get("gpu_name") or "")
    try:
        estimate = EstimateBackend(
            gpu=gpu.key if gpu else DEFAULT_GPU,
            alloc_conf=backend.alloc_conf,
            cuda_warmup=backend.warmup,
            cuda_steps=backend.steps,
        ).measure(spec)
    except Exception as exc:  # noqa: BLE001 - the measurement stands without its comparison
        estimate = {"status": "error", "error": " ".join(str(exc).split())}
    if estimate.get("status") != "ok":
        return {"estimate_error_note": f"no estimate: {estimate.get('error')}"}
    keys = [
        k
        for k in estimate
        if k.startswith("predicted_") or k in PREDICTED_FIELDS or k == "device_memory_notes"
    ]
    out = {k: estimate[k] for k in keys}
    # whether the replay fitted this card (after how many cache releases), as the estimate of a
    # named GPU says it (`device_memory.device_capacity`)
    for key in ("fits_device", "fits_device_expandable", "alloc_retries"):
        if key in estimate:
            out[f"predicted_{key}"] = estimate[key]
    out["estimate_gpu"] = estimate_gpu = gpu.key if gpu else DEFAULT_GPU
    if gpu is None:
        out["estimate_error_note"] = (
            f"{row.get('gpu_name')!r} is not in the GPU table: memory predicted with "
            f"{estimate_gpu}'s constants"
        )
        # a step time needs this GPU's throughputs: none rather than another GPU's
        for key in PREDICTED_FIELDS:
            out.pop(key, None)
        out["prediction_note"] = (
            f"no step-time prediction: {row.get('gpu_name')!r} is not in velora's GPU table "
            "(velora_cli/gpus.py)"
        )
    elif row.get("step_seconds") and out.get("predicted_step_seconds"):
        out["prediction_error"] = out["predicted_step_seconds"] / row["step_seconds"] - 1
    out.update(estimate_error(row, estimate))
    return out
