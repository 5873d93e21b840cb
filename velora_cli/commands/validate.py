"""``velora validate``: predict the published GPU measurements of validation/ and compare."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from velora_cli.commands.errors import UserError, guarded
from velora_cli.commands.options import (
    ValidateCases,
    ValidateCorpus,
    ValidateFormat,
    ValidateSources,
)
from velora_cli.commands.output import err

FORMATS = ("table", "json", "markdown")


@guarded
def validate(
    case: ValidateCases = None,
    source: ValidateSources = None,
    output_format: ValidateFormat = "table",
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here, updated after each case.")
    ] = None,
    corpus: ValidateCorpus = None,
) -> None:
    """Predict every published GPU run of the corpus (validation/) with the estimate backend
    and print measured vs predicted with the signed error per tier. Exit code 1 when an
    expressible case is out of bounds (allocated ±3%, reserved and device ±5%, device never
    more than 2% low, tokens/s ±15%) or its estimate failed."""
    if output_format not in FORMATS:
        raise UserError(f"--format {output_format!r}: choose {', '.join(FORMATS)}")
    from velora_cli.validation.corpus import load_cases
    from velora_cli.validation.run import validate as run_validate

    if output:
        from velora_cli.files import check_output_file

        check_output_file(output, "--output")
    cases = load_cases(corpus, ids=case or (), sources=source or ())
    err(f"validating {len(cases)} cases (estimate backend, one step each on meta tensors)")

    def progress(index: int, count: int, out: dict, seconds: float) -> None:
        what = out["status"]
        if out["out_of_bounds"]:
            what = "out of bounds: " + ", ".join(out["out_of_bounds"])
        elif out["status"] == "not expressible":
            what = "not expressible: " + "; ".join(out["missing"])[:160]
        err(f"[{index}/{count}] {out['id']} ({seconds:.1f}s): {what}")

    def write(document: dict) -> None:
        if output:
            from velora_cli.files import write_text_atomic

            write_text_atomic(output, _text(document, output_format))

    # the whole corpus: the repeats of a selected case's setup (information beside its error)
    everything = load_cases(corpus) if (case or source) else cases
    document = run_validate(cases, progress=progress, on_case=write, corpus=everything)
    text = _text(document, output_format)
    if output:
        err(f"wrote {output}")
    else:
        typer.echo(text, nl=False)
    if not document["passed"]:
        raise typer.Exit(code=1)


def _text(document: dict, output_format: str) -> str:
    if output_format == "json":
        return (
            json.dumps(
                {
                    "cases": document["cases"],
                    "summary": document["summary"],
                    "passed": document["passed"],
                },
                indent=2,  # fmt: skip
            )
            + "\n"
        )
    from velora_cli.report.validate import render

    return render(document, output_format)
