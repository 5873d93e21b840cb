"""Cross-check: velora's per-rank tracker against torch's own FSDPMemTracker on real ranks.

    torchrun --standalone --nproc-per-node 2 benchmarks/rank_tracker_vs_torch.py
    torchrun --standalone --nproc-per-node 2 benchmarks/rank_tracker_vs_torch.py --parallel fsdp-no-reshard --gc

Each rank builds the step velora measures (`velora_cli.parallel.shard`), warms up, then runs one
step under torch's ``FSDPMemTracker`` (``torch.distributed._tools``, private, an independent
implementation: it instruments FSDP2's param groups and collectives) and one under velora's
tracker with the rank's roles, both counting exact bytes (no 512-byte rounding: MemTracker rounds
CUDA storages only). Prints both peaks and their ratio, and the categories each one reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from velora_cli.emulation.attention import register_estimate_attention  # noqa: E402
from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step  # noqa: E402
from velora_cli.parallel.rank_step import rank_roles, tracked_rank_step, warm_up  # noqa: E402
from velora_cli.parallel.shard import shard_prepared  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--parallel", default="fsdp", choices=("fsdp", "fsdp-no-reshard"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gc", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = StepSpec(
        model=args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        world_size=dist.get_world_size(),
        parallel=args.parallel,
        strategy=Strategy(gc=args.gc),
    )
    prepared = prepare(spec, "cpu", attn_implementation=register_estimate_attention())
    shard_prepared(prepared)
    roles = rank_roles(prepared)
    warm_up(prepared, 1, roles.buckets)

    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    theirs = FSDPMemTracker(prepared.model, prepared.optimizer)
    theirs.track_inputs(tuple(prepared.micro_batches[0].values()))
    with theirs:
        train_step(prepared)
    snapshot = theirs.get_tracker_snapshot("peak")
    device = next(d for d in snapshot if d.type == "cpu")
    their_peak = snapshot[device]["Total"]
    their_categories = {k: v for k, v in snapshot[device].items() if v and k != "Total"}

    row, _ = tracked_rank_step(prepared, roles, round_to=1)
    ours = row["peak_bytes"]
    print(
        f"rank {rank}: {args.parallel}{' + gc' if args.gc else ''}: velora {ours:,} B, "
        f"FSDPMemTracker {their_peak:,} B, ratio {ours / their_peak:.4f}\n"
        f"  velora: { {k: v for k, v in row['peak_breakdown'].items() if v} }\n"
        f"  torch:  {their_categories}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
