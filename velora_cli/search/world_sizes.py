"""``velora tune --world-size 1,2,4,8``: how many GPUs, which sharding, which strategy.

One tune per GPU count (`autotune.run` with that world size: the parallel strategy is one more
dimension of its search, the budget is per GPU), so each count gets its own best configuration
by the objective; the answer is the fewest GPUs whose best configuration fits. One journal
holds them all (candidate keys carry the layout), so ``--resume`` redoes only unfinished work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any


def summary(document: dict[str, Any], world_size: int) -> dict[str, Any]:
    """One GPU count's outcome: its best configuration (if any), why, the smallest seen."""
    rec = document.get("recommendation")
    keep = ("key", "mode", "placement", "num_groups", "gc", "micro_batch_size",
            "grad_accum_steps", "optimizer", "parallel", "world_size", "peak_bytes",
            "step_seconds", "tokens_per_second", "loss_increase")  # fmt: skip
    smallest = document.get("smallest")
    return {
        "world_size": world_size,
        "recommendation": {k: rec.get(k) for k in keep} if rec else None,
        "tokens_per_second_per_gpu": (
            rec["tokens_per_second"] / world_size if rec and rec.get("tokens_per_second") else None
        ),
        "reason": document.get("reason"),
        "smallest": None
        if smallest is None
        else {k: smallest.get(k) for k in ("key", "smallest_peak_bytes", "peak_source")},
    }


def run_world_sizes(
    settings,
    *,
    save_path: Path | None,
    journal,
    progress: Callable[[str, int, int], None] | None = None,
    echo: Callable[[str], None] | None = None,
    backend=None,
    notices: list[str] | None = None,
) -> dict[str, Any]:
    """Tune each of ``settings.world_sizes`` and answer with the fewest GPUs that fit.

    Returns:
        The tune document of the chosen GPU count (or of the largest one, when none fits),
        with ``world_sizes``, ``by_world_size`` (one `summary` per count), ``gpus_needed``
        (None when none fits) and every count's candidates; written to ``save_path``.
    """
    from velora_cli.budget import format_bytes
    from velora_cli.parallel.estimate import DdpRows
    from velora_cli.profiling.profiler import write_atomic
    from velora_cli.search import autotune

    echo = echo or (lambda line: None)
    documents = {}
    ddp_rows = DdpRows()  # a DDP rank's row is the same at every world size: stepped once
    for n in settings.world_sizes:
        echo(f"— {n} GPU{'s' if n > 1 else ''} —")
        one = dataclasses.replace(settings, world_sizes=(n,))
        documents[n] = autotune.run(
            one,
            save_path=None,
            journal=journal,
            progress=progress,
            echo=echo,
            backend=backend,
            notices=list(notices or []) if n == settings.world_sizes[0] else [],
            ddp_rows=ddp_rows,
        )
    fits = [n for n, d in documents.items() if d["recommendation"] is not None]
    needed = min(fits) if fits else None
    chosen = documents[needed if needed is not None else max(documents)]
    document = dict(chosen)
    document["candidates"] = [row for d in documents.values() for row in d["candidates"]]
    document["notices"] = list(dict.fromkeys(x for d in documents.values() for x in d["notices"]))
    document["calls"] = {k: sum(d["calls"][k] for d in documents.values()) for k in chosen["calls"]}
    document["settings"] = {**chosen["settings"], "world_sizes": list(settings.world_sizes)}
    document["world_sizes"] = list(settings.world_sizes)
    document["by_world_size"] = [summary(documents[n], n) for n in settings.world_sizes]
    document["gpus_needed"] = needed
    limit = format_bytes(chosen["limit_bytes"])
    if needed is None:
        document["reason"] = (
            f"no configuration fits {limit} per GPU at {', '.join(map(str, documents))} GPUs; "
            f"at {max(documents)}: {chosen['reason']}"
        )
    else:
        smaller = [n for n in settings.world_sizes if n < needed]
        before = f" (none fits with {', '.join(map(str, smaller))})" if smaller else ""
        document["reason"] = f"{needed} GPU{'s' if needed > 1 else ''}{before}: {chosen['reason']}"
        rec = {**chosen["recommendation"], "reason": document["reason"]}
        if rec.get("parallel"):
            rec["layer_classes"] = layer_classes(settings)  # for accelerate's auto-wrap
        document["recommendation"] = rec
    if save_path is not None:
        write_atomic(save_path, document)
        document["path"] = str(save_path)
    return document


def layer_classes(settings) -> list[str]:
    """The decoder layer classes the recommendation shards one by one (built on meta)."""
    from velora_cli.measure.train_step import prepare
    from velora_cli.parallel.shard import decoder_layer_classes

    prepared = prepare(settings.base_spec(), "meta")
    return sorted(decoder_layer_classes(prepared.model))
