"""Accuracy study: AdamW vs GaLore vs AdaRankGrad, each with and without VeLoRA, same steps.

    python benchmarks/optimizer_probe.py                      # llama-60m, 300 steps, CPU
    python benchmarks/optimizer_probe.py --steps 100 --placements paper --json out.json

Every run is ``velora_cli.search.probes.training_probe``: the same seeded from-scratch model, the same
batches of the embedded text in the same order, the same warmup + cosine schedule, and the held-out
loss after K steps. Each optimizer runs at its default probe learning rate
(``probes.DEFAULT_LR``; GaLore's paper pre-trains at 1e-2 with update scale 0.25, AdamW at 1e-3).
A global optimizer-step hook records, for the low-rank optimizers, the optimizer-state bytes, the
ranks (AdaRankGrad's adapt) and the relative change of the projected gradient between steps (what
AdaRankGrad's convergence test compares with its tolerance). Prints the held-out losses and their
ratio to AdamW's without VeLoRA, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from velora_cli.measure.train_step import StepSpec, Strategy  # noqa: E402
from velora_cli.search import probes  # noqa: E402


class Recorder:
    """Per-step optimizer facts, from a global step post-hook."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def __call__(self, optimizer, args, kwargs) -> None:
        if not hasattr(optimizer, "ranks"):
            return
        states = [s for s in optimizer.state.values() if "rank" in s]
        changes = [s["relative_change"] for s in states if "relative_change" in s]
        self.steps.append(
            {
                "state_bytes": optimizer.state_bytes(),
                "ranks": sorted(optimizer.ranks().values()),
                "refreshes": sum(s.get("refreshes", 0) for s in states),
                "relative_change_median": statistics.median(changes) if changes else None,
                "converged_weights": sum(c < g for c in changes for g in [_tolerance(optimizer)]),
            }
        )


def _tolerance(optimizer) -> float:
    return next((g.get("tolerance", 0.0) for g in optimizer.param_groups if g["lowrank"]), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", default="adamw,galore,adarankgrad")
    parser.add_argument("--placements", default="paper", help="VeLoRA rows (num_groups 32)")
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--eta", type=float, default=0.9)
    parser.add_argument("--update-gap", type=int, default=200)
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()

    strategies = [Strategy()] + [
        Strategy(placement=p, num_groups=args.num_groups) for p in args.placements.split(",") if p
    ]
    results = []
    for name in args.optimizers.split(","):
        for strategy in strategies:
            spec = StepSpec(
                model=args.model,
                optimizer=name,
                rank=args.rank,
                eta=args.eta,
                update_gap=args.update_gap,
                strategy=strategy,
            )
            recorder = Recorder()
            handle = register_optimizer_step_post_hook(recorder)
            start = time.perf_counter()
            try:
                probe = probes.training_probe(spec, steps=args.steps)
            finally:
                handle.remove()
            row = {
                "optimizer": spec.optimizer_label,
                "strategy": strategy.label,
                "loss": probe["loss"],
                "initial_loss": probe["initial_loss"],
                "lr": probe["lr"],
                "seconds": time.perf_counter() - start,
                "train_losses": probe["train_losses"],
                "trace": recorder.steps,
            }
            results.append(row)
            trace = recorder.steps[-1] if recorder.steps else {}
            ranks = trace.get("ranks") or []
            print(
                f"{row['optimizer']:<32} {row['strategy']:<22} held-out loss {row['loss']:.4f} "
                f"(from {row['initial_loss']:.2f}) lr {row['lr']:g}  {row['seconds']:.0f} s"
                + (
                    f"  state {trace['state_bytes'] / 2**20:.2f} MiB, ranks "
                    f"{ranks[0]}-{ranks[-1]} (median {ranks[len(ranks) // 2]}), "
                    f"{trace['refreshes']} refreshes"
                    if ranks
                    else ""
                ),
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}))
    reference = results[0]["loss"]
    print(f"\nheld-out loss after {args.steps} steps, ratio to {results[0]['optimizer']} baseline:")
    for row in results:
        print(f"  {row['optimizer']:<32} {row['strategy']:<22} {row['loss']:.4f}  "
              f"{row['loss'] / reference:.3f}×")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
