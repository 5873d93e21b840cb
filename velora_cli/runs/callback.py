"""`VeloraCallback`: the plan checked in the user's real ``transformers.Trainer`` run.

    from velora_cli import VeloraCallback, apply_config

    apply_config(model, "velora-config.json", checkpointing=False)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[VeloraCallback("velora-config.json")])
    trainer.train()   # warns if the model was not prepared as planned; writes profiles/run-*.json

At train begin it compares the model and arguments with the plan (`velora_cli.runs.plan_check`) and
warns once (`PlanMismatchWarning`) with every difference. Each logging interval it reads the
real peaks (`velora_cli.runs.memory`: CUDA allocator, reserved and NVML device used, or the
process's peak RSS on CPU plus the tracked tensor peak of one step), the tokens a step processes
(counted by a forward pre-hook on ``input_ids``) and the step time, and logs them beside the
plan's prediction with the relative error: into the Trainer's ``logs`` (keys ``velora/...``),
as one line on stderr, and into the run record (`velora_cli.runs.record`), rewritten atomically after
every interval. Only the main process (``state.is_world_process_zero``) writes and prints.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from velora_cli.configs import VeloraConfig, load_config
from velora_cli.runs import record as runs


class PlanMismatchWarning(UserWarning):
    """The model or arguments of a run differ from its velora plan."""


class VeloraCallback(TrainerCallback):
    """Check a velora plan in a real Trainer run and record what the run measured.

    Args:
        config: a velora config (file, dict or `VeloraConfig`), a tune document, or a
            ``--format trl`` export (its ``velora`` part).
        path: where the run record goes (default: ``profiles/run-<model>-<stamp>-<pid>.json``,
            or under ``$VELORA_PROFILES_DIR``).
        track_tensors: also track the tensor peak of one step per logging interval with
            velora's storage tracker (default: on CPU, where no allocator counts peaks; the
            tracked step is not timed).
        echo: print one line per interval on stderr (main process only).

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data,
        ...                   callbacks=[VeloraCallback("velora-config.json")])
    """

    def __init__(
        self,
        config: VeloraConfig | str | Path | dict,
        *,
        path: str | Path | None = None,
        track_tensors: bool | None = None,
        echo: bool = True,
    ) -> None:
        self.config = config if isinstance(config, VeloraConfig) else load_config(config)
        self.prediction = runs.prediction_of(self.config)
        self.path = Path(path) if path else None
        self.track_tensors = track_tensors
        self.echo = echo
        self.record: dict[str, Any] | None = None
        self.mismatches: list[str] = []
        self._model = self._optimizer = self._peaks = self._tracker = self._hook = None
        self._main = True
        self._pending: dict[str, Any] | None = None  # the last interval, for the next on_log
        self._last_tracked = False
        self._carry: dict[str, int | None] = {}  # peaks read before an evaluation mid-interval
        self._cuda = self._torch = None
        self._step_start: float | None = None
        self._step_tokens = 0
        self._reset_counts()

    # -- train begin: the check ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        from velora_cli.profiling.profiler import environment
        from velora_cli.runs import plan_check
        from velora_cli.runs.memory import LABELS, peaks_for

        self._main = state.is_world_process_zero
        self._model, self._optimizer = model, optimizer
        observed = plan_check.observe(model, args, optimizer)
        self.mismatches = plan_check.mismatches(self.config, observed)
        if self.mismatches and self._main:
            warnings.warn(
                "the model was not prepared as the velora plan says, so its prediction does not "
                "apply to this run: " + "; ".join(self.mismatches),
                PlanMismatchWarning,
                stacklevel=2,
            )
        device = next(model.parameters()).device
        self._peaks = peaks_for(device)
        if self.track_tensors is None:
            self.track_tensors = device.type != "cuda"
        self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        self._cuda = device if device.type == "cuda" else None
        self._torch = torch
        if self._main:
            trained = plan_check.run_model_name(self.config, observed)
            self.path = self.path or runs.new_run_path(trained)
            self.record = {
                "kind": runs.KIND,
                "version": runs.VERSION,
                "status": "running",
                "model": trained,  # the model that trained (the plan's is plan.model)
                "planned_model": self.config.model,
                "created": _now(),
                "finished": None,
                "path": str(self.path),
                "plan": self.config.to_dict(),
                "prediction": self.prediction,
                "observed": observed,
                "mismatches": self.mismatches,
                "device": self._peaks.kind,
                "memory_labels": dict(LABELS),
                "rank": f"0 of {args.world_size}",
                "logging_steps": args.logging_steps,
                "intervals": [],
                "summary": None,
                "environment": environment(),
            }
            self._write()
        self._peaks.reset()
        self._reset_counts()

    # -- every step: tokens, time, memory ----------------------------------------------------------

    def _count_tokens(self, module, args, kwargs):
        if not (module.training and self._torch.is_grad_enabled()):
            return None  # evaluation is not training throughput
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            shape = None if ids is None else tuple(ids.shape[:-1])
        else:
            shape = tuple(ids.shape)
        if shape:
            n = 1
            for d in shape:
                n *= d
            self._step_tokens += n  # tokens processed, padding included: the compute's count
            self._seq_max = max(self._seq_max, shape[-1])
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        # One tracked step per interval, never two in a row (with logging_steps=1 every other
        # step is timed), never the first (a warm-up that creates the optimizer state).
        tracked = (
            self.track_tensors
            and self._tracker is None
            and not self._tracked_this_interval
            and not self._last_tracked
            and state.global_step >= 1
        )
        self._last_tracked = bool(tracked)
        if tracked:
            from velora_cli.measure.tracker import MemoryTracker

            optimizer = getattr(self._optimizer, "optimizer", self._optimizer)
            self._tracker = MemoryTracker(self._model, optimizer).__enter__()
        self._sync()
        self._step_tokens = 0
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        seconds = time.perf_counter() - (self._step_start or time.perf_counter())
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tensor_peak = self._tracker.peak_bytes
            self._tensor_breakdown = dict(self._tracker.peak_breakdown)
            self._tracker, self._tracked_this_interval = None, True
        elif state.global_step > 1:  # the first step is a warm-up; tracked steps are slower
            self._timed.append((seconds, self._step_tokens))
        self._steps += 1
        self._tokens += self._step_tokens
        self._peaks.sample()
        if control.should_log or control.should_training_stop:
            self._close_interval(state)
        elif control.should_evaluate:  # keep the training peaks apart from the evaluation's
            self._carry = _highest(self._carry, self._peaks.read())
            self._peaks.reset()

    # -- each logging interval: beside the plan ------------------------------------------------------

    def _close_interval(self, state) -> None:
        if not self._steps:
            return
        memory: dict[str, int | None] = {}
        if self._tensor_peak is not None:
            memory["tensor_peak_bytes"] = self._tensor_peak
        memory.update(_highest(self._carry, self._peaks.read()))
        self._carry = {}
        timed_seconds = sum(s for s, _ in self._timed)
        timed_tokens = sum(t for _, t in self._timed)
        tps = timed_tokens / timed_seconds if timed_seconds > 0 else None
        interval = {
            "step": state.global_step,
            "steps": self._steps,
            "seconds": time.perf_counter() - self._interval_start,
            "step_seconds": statistics.median(s for s, _ in self._timed) if self._timed else None,
            "timed_steps": len(self._timed),
            "timed_seconds": timed_seconds,
            "timed_tokens": timed_tokens,
            "tokens": self._tokens,
            "tokens_per_second": tps,
            "seq_len_max": self._seq_max or None,
            "memory": memory,
            "tensor_peak_breakdown": self._tensor_breakdown,  # by category (tracker.CATEGORIES)
            "versus": runs.versus({**memory, "tokens_per_second": tps}, self.prediction),
        }
        self._pending = interval
        if self._main and self.record is not None:
            self.record["intervals"].append(interval)
            self._write()
            if self.echo:
                print(self.line(interval), file=sys.stderr, flush=True)
        self._peaks.reset()
        self._reset_counts()

    def on_evaluate(self, args, state, control, **kwargs):
        """An evaluation's own peaks (the training steps before it were read at step end)."""
        if self._peaks is None:
            return
        if self._main and self.record is not None:
            self.record.setdefault("evaluations", []).append(
                {"step": state.global_step, "memory": dict(self._peaks.read())}
            )
            self._write()
        self._peaks.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        interval, self._pending = self._pending, None
        if interval is None or logs is None:
            return
        extra = {f"velora/{k}": v for k, v in interval["memory"].items() if v is not None}
        if interval["tokens_per_second"] is not None:
            extra["velora/tokens_per_second"] = interval["tokens_per_second"]
        for name, vs in interval["versus"].items():
            if vs["relative_error"] is not None and vs["like_for_like"]:
                extra[f"velora/{name}_vs_plan"] = vs["relative_error"]
        logs.update(extra)
        if state.log_history:  # the Trainer copied logs before calling callbacks
            state.log_history[-1].update(extra)

    # -- train end: the record --------------------------------------------------------------------

    def on_train_end(self, args, state, control, **kwargs):
        if self._tracker is not None:  # training stopped inside a tracked step
            self._tracker.__exit__(None, None, None)
            self._tracker = None
        self._close_interval(state)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._peaks is not None:
            self._peaks.close()
        if self._main and self.record is not None:
            self.record["status"] = "finished"
            self.record["finished"] = _now()
            self.record["summary"] = runs.summarize(self.record["intervals"], self.prediction)
            self._write()
            if self.echo:
                print(f"velora: run record {self.path}", file=sys.stderr, flush=True)

    # -- helpers ------------------------------------------------------------------------------------

    def line(self, interval: dict[str, Any]) -> str:
        """One log line: each measured figure, the plan's prediction and the relative error."""
        from velora_cli.report.units import format_bytes

        names = {
            "allocated_bytes": "peak allocated",
            "reserved_bytes": "reserved",
            "device_used_bytes": "device used (NVML)",
            "tensor_peak_bytes": "tracked tensors",
            "rss_peak_bytes": "peak RSS (whole process)",
            "rss_peak_since_start_bytes": "peak RSS since start (whole process)",
        }
        parts = []
        for name, value in interval["memory"].items():
            if value is None:
                continue
            text = f"{names.get(name, name)} {format_bytes(value)}"
            vs = interval["versus"].get(name)
            if vs and vs["like_for_like"]:  # RSS counts the process: no error against tensors
                text += f" (plan {format_bytes(vs['predicted'])}, {vs['relative_error']:+.1%})"
            parts.append(text)
        tps = interval["tokens_per_second"]
        if tps is not None:
            text = f"{tps:,.0f} tok/s"
            vs = interval["versus"].get("tokens_per_second")
            if vs:
                text += f" (plan {vs['predicted']:,.0f}, {vs['relative_error']:+.1%})"
            parts.append(text)
        seq = interval["seq_len_max"]
        if seq and self.config.seq_len and seq != self.config.seq_len:
            parts.append(f"longest sequence {seq} tokens, planned {self.config.seq_len}")
        return f"velora step {interval['step']}: " + " · ".join(parts)

    def _reset_counts(self) -> None:
        self._steps = 0
        self._tokens = 0
        self._timed: list[tuple[float, int]] = []
        self._tensor_peak: int | None = None
        self._tensor_breakdown: dict[str, int] | None = None
        self._tracked_this_interval = False
        self._seq_max = 0
        self._interval_start = time.perf_counter()

    def _sync(self) -> None:
        if self._cuda is not None:
            self._torch.cuda.synchronize(self._cuda)

    def _write(self) -> None:
        from velora_cli.profiling.profiler import write_atomic

        write_atomic(self.path, self.record)


def _highest(a: dict[str, int | None], b: dict[str, int | None]) -> dict[str, int | None]:
    """Figure by figure, the higher of two peak readings (None where neither has one)."""
    out = dict(a)
    for name, value in b.items():
        out[name] = value if out.get(name) is None else max(out[name], value or 0)
    return out


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
