"""``velora profile --compare RUN``: a recorded run's measured figures beside the prediction of
what it ran, made now on ``--backend`` (`velora_cli.runs.compare`)."""

from __future__ import annotations

import io
from pathlib import Path

import typer

from velora_cli.commands.errors import UserError
from velora_cli.commands.output import err, wide_console

# profile options that define the step: with --compare the run record defines it
STEP_OPTIONS = (
    "batch_size", "seq_len", "dtype", "amp", "mode", "lora_rank", "lora_targets", "optimizer",
    "rank", "update_gap", "eta", "placements", "num_groups", "sub_token_size", "gc_every",
    "velora_gc", "init",
)  # fmt: skip


def compare_run(
    run: str,
    *,
    ctx: typer.Context | None,
    model: str | None,
    backend: str,
    gpu: str | None,
    warmup: int | None,
    steps: int | None,
    output_format: str,
    output: str | None,
    save: bool,
    weights: bool,
    trust_remote_code: bool,
) -> None:
    """Predict the step of run record ``run`` (a path, or ``latest``) and show both.

    Raises:
        UserError: step options given with --compare, another MODEL, no run record, a CSV format.
    """
    import dataclasses
    import json

    from velora_cli.files import profiles_dir
    from velora_cli.profiling import profiler
    from velora_cli.runs import compare as run_compare
    from velora_cli.runs import record as runs

    if ctx is not None:
        # by name: typer ships its own copy of click, whose ParameterSource is another class
        given = [
            f"--{name.replace('_', '-')}"
            for name in STEP_OPTIONS
            if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")
        ]
        if given:
            raise UserError(
                f"--compare predicts what the run ran, so {', '.join(given)} cannot change it: "
                "drop them (the backend, --gpu, --warmup and --steps still apply)"
            )
    if output_format not in ("table", "json"):
        raise UserError(f"--format {output_format!r} with --compare: choose table or json")
    path = runs.latest_run() if run == "latest" else Path(run)
    if path is None:
        raise UserError(f"no run record under {profiles_dir()}/: VeloraCallback writes them")
    record = runs.load_run(path)
    spec, notes = run_compare.spec_of(record, model)  # CompareError: another MODEL, one line
    spec = dataclasses.replace(spec, weights=weights, trust_remote_code=trust_remote_code)
    backend_obj = profiler.make_backend(backend, spec, warmup=warmup, steps=steps, gpu=gpu)
    err(f"predicting {spec.strategy.label} · batch {spec.batch_size} × seq {spec.seq_len} on "
        f"backend {backend_obj.name} for {path}")  # fmt: skip
    row = backend_obj.measure(spec)
    document = {
        "kind": "velora-run-comparison",
        "run": str(path),
        "backend": backend_obj.name,
        "gpu": getattr(backend_obj, "gpu", None),
        "plan_backend": record.get("prediction", {}).get("backend") or "—",
        "label": spec.strategy.label,
        "precision": spec.precision,
        "spec": spec.to_json(),
        "notes": notes,
        "row": row,
        "rows": run_compare.comparison(record, row),
    }
    if save:
        target = path.with_name(f"compare-{path.stem}-{backend_obj.name}.json")
        profiler.write_atomic(target, document)
        err(f"saved: {target}")
    if output_format == "json":
        text = json.dumps(document, indent=2)
    else:
        from velora_cli.report.run import comparison_footer, comparison_table

        console = wide_console() if not output else _file_console()
        console.print(comparison_table(document))
        for line in comparison_footer(document):
            console.print(f"[dim]{line}[/dim]", highlight=False)
        if not output:
            return
        text = console.file.getvalue()
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        err(f"wrote {output}")
    else:
        typer.echo(text)


def _file_console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=140)
