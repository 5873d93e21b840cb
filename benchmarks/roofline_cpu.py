"""Check the roofline's op accounting on this CPU: predicted vs measured step times, one run.

    python benchmarks/roofline_cpu.py                                   # llama-60m, 4 × 256, fp32
    python benchmarks/roofline_cpu.py --batch-size 1 --seq-len 64 --steps 5   # a quick check
    python benchmarks/roofline_cpu.py --out roofline-cpu.json

In one run, in this order:
1. measure this CPU: achievable fp32 GEMM FLOP/s (an n³ matmul), memory bandwidth (a large copy,
   bytes read + written), the per-op overhead of eager PyTorch (a tiny add) and the extra cost
   per byte of writing a fresh large allocation (page faults: a fill of a new tensor against a
   fill of an existing one);
2. build a roofline "device" from those figures (`roofline.measured_device`: every efficiency 1,
   no GPU tile model, one kernel per tensor in _foreach_ ops) and predict each row's step from
   the ops of its meta step (the same counting and model as the estimate backend);
3. time real CPU steps of each row, interleaved (one step of each row in turn, --steps rounds,
   after --warmup; all rows' models are alive at once), so a change of load hits every row
   alike; report the median (and the minimum); then measure the CPU again (a drift between the
   two says the machine's load changed: distrust the run).
Prints per-row predicted and measured time, the error, the ratios to baseline and whether the
ranking agrees. This tests the FLOP/byte accounting and the additive per-op model, not a GPU's
efficiencies (those are assumptions in velora_cli/timing/roofline.py until a GPU run calibrates
them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from velora_cli.emulation.attention import register_estimate_attention  # noqa: E402
from velora_cli.measure.observe import timed_steps  # noqa: E402
from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step  # noqa: E402
from velora_cli.timing.roofline import measured_device, predict  # noqa: E402
from velora_cli.timing.step_time import count_step  # noqa: E402

ROWS = {
    "baseline": Strategy(),
    "gc": Strategy(gc=True),
    "velora paper g32": Strategy(placement="paper", num_groups=32),
    "velora paper g32 + gc": Strategy(placement="paper", num_groups=32, gc=True),
}


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cpu(gemm_size: int, copy_mib: int, repeat: int) -> dict[str, float]:
    """Achievable fp32 GEMM FLOP/s, copy bandwidth (bytes read + written) and per-op overhead."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(gemm_size, gemm_size, generator=gen)  # random values, never zeros
    b = torch.randn(gemm_size, gemm_size, generator=gen)
    gemm = _median_seconds(lambda: torch.mm(a, b), repeat)
    n = copy_mib * 2**20 // 4
    src, dst = torch.randn(n, generator=gen), torch.empty(n)
    copy = _median_seconds(lambda: dst.copy_(src), repeat)
    x, y = torch.randn(1), torch.randn(1)
    tiny = _median_seconds(lambda: [torch.add(x, y) for _ in range(1000)], repeat) / 1000
    fill_new = _median_seconds(lambda: torch.empty(n).fill_(1.0), repeat)  # n·4 ≥ 32 MiB
    fill_old = _median_seconds(lambda: dst.fill_(1.0), repeat)
    return {
        "gemm_flops": 2 * gemm_size**3 / gemm,
        "bandwidth": 2 * n * 4 / copy,
        "launch_seconds": tiny,
        "fresh_seconds_per_byte": max(0.0, fill_new - fill_old) / (n * 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed CPU steps per row (>= 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gemm-size", type=int, default=1024)
    parser.add_argument("--copy-mib", type=int, default=256, help="copy/fill size, >= 32")
    parser.add_argument("--repeat", type=int, default=10, help="repeats of each CPU figure")
    parser.add_argument("--out", help="write the figures and rows as JSON here")
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be >= 5 (the median of at least five steps)")
    if args.copy_mib < 32:
        parser.error("--copy-mib must be >= 32 (a fresh allocation that size is mmap'ed)")

    before = measure_cpu(args.gemm_size, args.copy_mib, args.repeat)
    device = measured_device("cpu", **before)
    print(
        f"CPU before: GEMM {before['gemm_flops'] / 1e9:.1f} GFLOP/s ({args.gemm_size}³ fp32), "
        f"copy {before['bandwidth'] / 1e9:.2f} GB/s, per-op overhead "
        f"{before['launch_seconds'] * 1e6:.1f} µs, fresh pages "
        f"{1e-9 / max(before['fresh_seconds_per_byte'], 1e-15):.2f} GB/s; "
        f"{torch.get_num_threads()} threads"
    )
    attention = register_estimate_attention()
    rows, runs = [], []
    for label, strategy in ROWS.items():
        spec = StepSpec(
            model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, strategy=strategy
        )
        on_meta = prepare(spec, "meta", attn_implementation=attention)
        for _ in range(args.warmup):
            train_step(on_meta)
        predicted = predict(count_step(on_meta), device, micro_batches=spec.grad_accum_steps)
        on_cpu = prepare(spec, "cpu", attn_implementation=attention)
        for _ in range(args.warmup):
            train_step(on_cpu)
        runs.append((label, predicted, on_cpu, []))
    for _ in range(args.steps):  # interleaved: one step of each row per round
        for _label, _predicted, on_cpu, times in runs:
            times += timed_steps(on_cpu, 1)
    for label, predicted, _on_cpu, times in runs:
        measured = statistics.median(times)
        rows.append(
            {
                "row": label,
                "predicted_seconds": predicted.seconds,
                "predicted_by_kind": predicted.by_kind,
                "measured_seconds": measured,
                "measured_all": times,
                "error": predicted.seconds / measured - 1,
                "error_vs_min": predicted.seconds / min(times) - 1,
                "flops": predicted.flops,
                "bytes": predicted.bytes,
                "kernels": predicted.kernels,
            }
        )
        print(
            f"  {label:<22} predicted {predicted.seconds:7.3f} s   measured {measured:7.3f} s "
            f"(min {min(times):.3f}, max {max(times):.3f})   error {rows[-1]['error']:+.0%} "
            f"(vs min {rows[-1]['error_vs_min']:+.0%})",
            flush=True,
        )
    after = measure_cpu(args.gemm_size, args.copy_mib, args.repeat)
    print(
        f"CPU after:  GEMM {after['gemm_flops'] / 1e9:.1f} GFLOP/s, copy "
        f"{after['bandwidth'] / 1e9:.2f} GB/s, per-op overhead {after['launch_seconds'] * 1e6:.1f} µs"
        f" (GEMM drift {after['gemm_flops'] / before['gemm_flops'] - 1:+.0%}: the load changed "
        "if this is large)"
    )

    base = rows[0]
    print(
        f"\n{args.model} · batch {args.batch_size} × seq {args.seq_len} · fp32 · ratios to baseline"
    )
    print(f"  {'row':<22} {'predicted':>10} {'measured':>10}")
    for r in rows:
        print(
            f"  {r['row']:<22} {r['predicted_seconds'] / base['predicted_seconds']:>10.3f} "
            f"{r['measured_seconds'] / base['measured_seconds']:>10.3f}"
        )
    by_predicted = [r["row"] for r in sorted(rows, key=lambda r: r["predicted_seconds"])]
    by_measured = [r["row"] for r in sorted(rows, key=lambda r: r["measured_seconds"])]
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]
    agree = sum(
        (a["predicted_seconds"] < b["predicted_seconds"])
        == (a["measured_seconds"] < b["measured_seconds"])
        for a, b in pairs
    )
    print(f"ranking predicted: {' < '.join(by_predicted)}")
    print(f"ranking measured:  {' < '.join(by_measured)}")
    print(
        f"ranking agrees: {'yes' if by_predicted == by_measured else 'no'} "
        f"({agree} of {len(pairs)} pairs ordered alike)"
    )
    print(
        "baseline predicted time by op class: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in base["predicted_by_kind"].items())
    )
    print(f"torch {torch.__version__}; timings on a shared machine are noisy: rerun when idle")
    if args.out:
        document = {
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_before": before,
            "cpu_after": after,
            "rows": rows,
            "ranking_agrees": by_predicted == by_measured,
        }
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
