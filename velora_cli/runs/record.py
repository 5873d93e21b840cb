"""The run record: what a real training run measured, beside what its plan predicted.

`velora_cli.VeloraCallback` writes one JSON document per run under ``profiles/`` (or
``$VELORA_PROFILES_DIR``), atomically (`profiler.write_atomic`) at train begin, after every
logging interval and at train end, so a crash keeps every interval measured. `load_run` reads
it back (``velora profile --compare RUN``, ``velora plot``). Its fields::

    kind: "velora-run"   version: 1   status: running | finished
    model, created, finished, path
    plan: the velora config the run was planned with (VeloraConfig.to_dict())
    prediction: the plan's figures: backend, allocated/reserved/device_used/peak bytes,
        tokens_per_second, step_seconds, seq_len, micro_batch_size, grad_accum_steps
    observed: what the run set up (plan_check.observe), and mismatches: how it differs
    device: cuda | cpu;  memory_labels: what each measured figure is (run_memory.LABELS)
    intervals: [{step, steps, seconds, step_seconds, tokens, tokens_per_second, seq_len_max,
        memory: {figure: bytes}, versus: {figure: {predicted, relative_error, like_for_like}}}]
    summary: the highest of each figure over the intervals, tokens/s over the timed steps
        (the first step, a warm-up, left out), and their relative errors
    environment: versions and device (profiler.environment)

Relative error = (measured − predicted) / predicted. Like for like: a CUDA run's allocated,
reserved and device-used peaks against the same figures of a cuda plan (an estimate or cpu plan
predicts the allocated one); a CPU run's tracked tensor peak against the plan's allocated peak.
A CPU run's peak RSS is compared too, marked not like for like (it counts the whole process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from velora_cli.configs import VeloraConfig
from velora_cli.files import profiles_dir

KIND = "velora-run"
VERSION = 1

# measured figure -> (predicted figure, like for like)
PAIRS = {
    "allocated_bytes": ("allocated_bytes", True),
    "reserved_bytes": ("reserved_bytes", True),
    "device_used_bytes": ("device_used_bytes", True),
    "tensor_peak_bytes": ("allocated_bytes", True),
    "rss_peak_bytes": ("allocated_bytes", False),
    "rss_peak_since_start_bytes": ("allocated_bytes", False),
}


class RunRecordError(ValueError):
    """A file that is not a readable velora run record; the message says what it is."""


def new_run_path(model: str, directory: Path | None = None) -> Path:
    """``run-<model>-<stamp>[-n].json`` under the profiles directory, taken by this run alone
    (created exclusively, as profile and tune documents are: `files.reserve`)."""
    from velora_cli.files import reserve, slug

    return reserve(directory or profiles_dir(), f"run-{slug(model)}", ".json")


def prediction_of(config: VeloraConfig) -> dict[str, Any]:
    """The plan's figures, by the names a run measures."""
    allocated = config.allocated_bytes
    if allocated is None and config.backend != "cuda":
        allocated = config.peak_bytes  # estimate/cpu: the tracked tensor peak
    return {
        "backend": config.backend,
        "peak_bytes": config.peak_bytes,
        "allocated_bytes": allocated,
        "reserved_bytes": config.reserved_bytes,
        "device_used_bytes": config.device_used_bytes,
        "tokens_per_second": config.tokens_per_second,
        "step_seconds": config.step_seconds,
        "seq_len": config.seq_len,
        "micro_batch_size": config.micro_batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "source": config.source,
    }


def relative_error(measured: float | None, predicted: float | None) -> float | None:
    """(measured − predicted) / predicted, or None when either is missing (or zero predicted)."""
    if measured is None or not predicted:
        return None
    return (measured - predicted) / predicted


def versus(measured: dict[str, Any], prediction: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each measured figure beside the prediction it is compared with (`PAIRS`)."""
    out = {}
    for name, value in measured.items():
        if name == "tokens_per_second":
            predicted, like = prediction.get("tokens_per_second"), True
        elif name in PAIRS:
            key, like = PAIRS[name]
            predicted = prediction.get(key)
        else:
            continue
        if value is None or predicted is None:
            continue
        out[name] = {
            "predicted": predicted,
            "relative_error": relative_error(value, predicted),
            "like_for_like": like,
        }
    return out


def summarize(intervals: list[dict[str, Any]], prediction: dict[str, Any]) -> dict[str, Any]:
    """The run's highest figure of each kind, its tokens/s over timed steps, and their errors."""
    memory: dict[str, int] = {}
    for interval in intervals:
        for name, value in interval["memory"].items():
            if value is not None:
                memory[name] = max(value, memory.get(name, 0))
    seconds = sum(i["timed_seconds"] for i in intervals)
    tokens = sum(i["timed_tokens"] for i in intervals)
    tps = tokens / seconds if seconds > 0 else None
    return {
        "memory": memory,
        "tokens_per_second": tps,
        "steps": sum(i["steps"] for i in intervals),
        "seq_len_max": max((i["seq_len_max"] or 0 for i in intervals), default=None) or None,
        "versus": versus({**memory, "tokens_per_second": tps}, prediction),
    }


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run record written by `velora_cli.VeloraCallback`.

    Raises:
        FileNotFoundError: no file at ``path``.
        RunRecordError: not JSON, or not a velora run record (the message says what it is).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no run record at {path}; VeloraCallback writes them under {profiles_dir()}/"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunRecordError(f"{path} is not a JSON run record ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        hint = " (a tune document: pass a run record, run-*.json)" if kind == "velora-tune" else ""
        raise RunRecordError(f"{path} is not a velora run record (kind {kind!r}){hint}")
    if data.get("version") != VERSION:
        raise RunRecordError(
            f"{path}: run record version {data.get('version')!r}; this velora reads {VERSION}"
        )
    return data


def latest_run(directory: Path | None = None) -> Path | None:
    """The most recently modified ``run-*.json`` under the profiles directory (a name taken by
    a run that has written nothing yet is passed over)."""
    found = sorted(
        (p for p in (directory or profiles_dir()).glob("run-*.json") if p.stat().st_size),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None
