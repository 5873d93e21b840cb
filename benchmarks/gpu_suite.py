"""One call on a GPU: velora's estimates against the real allocator and clock (issue 16).

    PYTHONPATH=. python3 benchmarks/gpu_suite.py --out $OUT/suite     # on one GPU, <= 8 minutes
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite         # CPU, tiny shapes, seconds

Parts, in order of value; each stops at its deadline so that the later ones still run:

  1. correctness: the VeLoRA layer's output and gradients in bf16 against a float64 reference
     (fresh random inputs, never zeros), and the factorized weight gradient against the naive one;
  3. ``velora profile --backend cuda`` rows (baseline, gc, VeLoRA paper g32, VeLoRA qkv+down g32,
     VeLoRA + gc) for llama-130m (fp32 and --amp bf16), llama-1b and Llama-2-7b (bf16), LoRA and,
     when bitsandbytes imports, QLoRA on Llama-2-7b, each beside ``--backend estimate`` of the
     same rows: every predicted figure the estimate gives (allocated peak, activations, and where
     they exist predicted reserved, device-level and step time) against the measured one;
  2. the layer micro-benchmark (bf16, T = 8192, 4096->11008 and 11008->4096, M = in/32): forward +
     backward of VeLoRA vs nn.Linear vs the naive reconstruct path (benchmarks/layer_backward.py);
  4. the tuner end to end on the GPU once: llama-130m with a budget between its measured gc and
     baseline peaks.

Everything goes under --out, at most 8 files (what the device tool brings back): summary.md (the
table printed last), summary.json, log.txt and documents.tar.gz (every profile and tune JSON).
``--dry-run`` runs the same code on the CPU with tiny shapes (cpu backend for cuda), so the script
is tested before a GPU is lent (tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TOLERANCE = 0.05  # every estimate within ±5% of the figure it predicts (issue 16's target)
# estimate field -> measured field of the same cuda row; missing fields are skipped (a model that
# has not landed predicts nothing), each found pair is compared
PREDICTIONS = {
    "predicted_allocated_bytes": (("peak_bytes",), "allocated peak"),
    "activation_bytes": (("activation_bytes",), "saved activations"),
    "predicted_reserved_bytes": (("reserved_bytes",), "reserved peak"),
    # the worker's own NVML usage where NVML lists it, else the whole device's
    "predicted_device_bytes": (("process_used_bytes", "device_used_bytes"), "device used (NVML)"),
    "predicted_step_seconds": (("step_seconds",), "step time"),
}
# The dry run's cpu rows hold tensors only (no cuBLAS workspace, no allocator, no GPU clock): the
# estimate's tensor peak and saved activations are what they can check.
DRY_PREDICTIONS = {
    "peak_bytes": (("peak_bytes",), "tensor peak"),
    "activation_bytes": (("activation_bytes",), "saved activations"),
}
ROWS = ["--placements", "paper,qkv+down", "--num-groups", "32", "--gc-every", "1"]


@dataclass
class Case:
    """One ``velora profile`` run, measured on the backend and estimated."""

    name: str
    model: str
    args: list[str]
    needs: str | None = None  # a module that must import (bitsandbytes for QLoRA)


GPU_CASES = [
    Case("llama-130m fp32", "llama-130m", ["--batch-size", "8", "--seq-len", "1024"]),
    Case("llama-130m amp bf16", "llama-130m",
         ["--batch-size", "8", "--seq-len", "1024", "--amp", "bf16"]),
    Case("llama-1b bf16", "llama-1b", ["--batch-size", "4", "--seq-len", "2048", "--dtype", "bf16"]),
    Case("llama-2-7b bf16", "llama-2-7b",
         ["--batch-size", "2", "--seq-len", "2048", "--dtype", "bf16"]),
    Case("llama-2-7b lora bf16", "llama-2-7b",
         ["--batch-size", "4", "--seq-len", "2048", "--dtype", "bf16", "--mode", "lora",
          "--lora-rank", "16"]),
    Case("llama-2-7b qlora", "llama-2-7b",
         ["--batch-size", "4", "--seq-len", "2048", "--mode", "qlora", "--lora-rank", "16"],
         needs="bitsandbytes"),
]  # fmt: skip
# The dry run's model: a tiny Llama with as many kv heads as heads, written to a temporary
# directory, so that the CPU's fused attention and the GPU kernels the estimate predicts save the
# same tensors and the cpu rows check the estimate's plumbing to the byte.
DRY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                  max_position_embeddings=256)  # fmt: skip
DRY_CASES = [Case("tiny-llama fp32", "<dry-model>", ["--batch-size", "2", "--seq-len", "64"])]


@dataclass
class Suite:
    out: Path
    dry_run: bool
    started: float = field(default_factory=time.monotonic)
    limit: float = 480.0
    log_lines: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    documents: list[Path] = field(default_factory=list)

    dry_model: str | None = None  # the dry run's model directory
    # where the velora runs save their documents (VELORA_PROFILES_DIR): this run's own folder
    profiles: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="velora-suite-")))

    @property
    def backend(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def model(self, case: Case) -> str:
        return self.dry_model if case.model == "<dry-model>" else case.model

    def left(self, share_end: float) -> float:
        """Seconds until ``share_end`` (a fraction of the whole limit) from the start."""
        return self.started + share_end * self.limit - time.monotonic()

    def log(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.1f}s] "
        print(stamp + line, flush=True)
        self.log_lines.append(stamp + line)

    def velora(self, args: list[str], timeout: float) -> tuple[int, str]:
        """Run ``python -m velora_cli ARGS`` in its own process group; kill it at the timeout."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        # the documents velora saves go to a folder of this run, not the repository's profiles/
        env.setdefault("VELORA_PROFILES_DIR", str(self.profiles))
        cmd = [sys.executable, "-m", "velora_cli", *args]
        self.log("$ velora " + " ".join(args))
        if timeout < 5:
            return 124, "skipped: no time left before the part's deadline"
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the row workers too
            output, _ = proc.communicate()
            return 124, (output or "") + f"\nkilled at the part's deadline ({timeout:.0f} s)"
        return proc.returncode, output or ""


# -- 1. correctness -------------------------------------------------------------------------------


def part_correctness(suite: Suite) -> dict:
    """bf16 VeLoRA layer against float64 (same inputs upcast); fp64 factorized vs naive."""
    import torch
    from layer_backward import check
    from torch import nn

    from velora_cli.methods.velora import VeLoRALinear, compress

    device = "cpu" if suite.dry_run else "cuda"
    tokens, shapes = (64, [(64, 96)]) if suite.dry_run else (4096, [(4096, 11008), (11008, 4096)])
    out = {}
    for d_in, d_out in shapes:
        m = d_in // 32
        gen = torch.Generator(device=device).manual_seed(1234)
        layer = VeLoRALinear.from_linear(
            nn.Linear(d_in, d_out, device=device, dtype=torch.bfloat16), sub_token_size=m,
            init="random",
        )  # fmt: skip
        x = torch.randn(tokens, d_in, device=device, generator=gen).to(torch.bfloat16)
        x.requires_grad_(True)
        g = torch.randn(tokens, d_out, device=device, generator=gen).to(torch.bfloat16)
        y = layer(x)
        y.backward(g)
        x64, g64 = x.detach().double(), g.double()
        w64, b64, v64 = layer.weight.detach().double(), layer.bias.detach().double(), layer.v
        v64 = v64.double()
        z = compress(x64, v64)  # (T, D/M)
        x_hat = (z.unsqueeze(-1) * v64).reshape(tokens, d_in)
        ref = {
            "output": x64 @ w64.T + b64,
            "grad_input": g64 @ w64,
            "grad_weight": g64.T @ x_hat,
            "grad_bias": g64.sum(0),
        }
        got = {"output": y, "grad_input": x.grad, "grad_weight": layer.weight.grad,
               "grad_bias": layer.bias.grad}  # fmt: skip
        errors = {}
        for name, r in ref.items():
            a = got[name].double()
            assert a.abs().sum() > 0, f"{name} is all zeros"
            errors[name] = ((a - r).norm() / r.norm()).item()
        factorized = check(min(d_in, 1024), min(d_out, 1024), m)
        key = f"{d_in}->{d_out} M={m}"
        out[key] = {"bf16_rel_error": errors, "fp64_factorized_vs_naive": factorized}
        worst = max(errors.values())
        ok = worst < 1e-2 and not math.isnan(worst) and factorized < 1e-10
        out[key]["ok"] = ok
        suite.log(f"correctness {key}: bf16 rel errors "
                  + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
                  + f"; fp64 factorized vs naive {factorized:.1e} -> {'ok' if ok else 'FAIL'}")  # fmt: skip
    return out


# -- 3. profile rows beside the estimate ------------------------------------------------------------


def _rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["label"]: r for r in json.loads(path.read_text())["rows"]}


def compare_rows(
    measured: dict[str, dict], estimated: dict[str, dict], predictions: dict = PREDICTIONS
) -> list[dict]:
    """One comparison per (row, predicted figure) present on both sides."""
    out = []
    for label, m in measured.items():
        e = estimated.get(label)
        if e is None or m.get("status") != "ok" or e.get("status") != "ok":
            continue
        for est_key, (meas_keys, what) in predictions.items():
            meas_key = next((k for k in meas_keys if m.get(k)), None)
            if e.get(est_key) is None or meas_key is None:
                continue
            error = (e[est_key] - m[meas_key]) / m[meas_key]
            out.append({"row": label, "figure": what, "estimate": e[est_key],
                        "measured": m[meas_key], "measured_field": meas_key, "error": error,
                        "within": abs(error) <= TOLERANCE})  # fmt: skip
    return out


def part_profiles(suite: Suite, share_end: float) -> dict:
    cases = DRY_CASES if suite.dry_run else GPU_CASES
    steps = (
        ["--warmup", "1", "--steps", "2"] if suite.dry_run else ["--warmup", "2", "--steps", "3"]
    )
    rows = (["--placements", "paper", "--num-groups", "4", "--gc-every", "1", "--no-velora-gc"]
            if suite.dry_run else ROWS)  # fmt: skip
    out = {}
    for i, case in enumerate(cases):
        if case.needs and not _imports(case.needs):
            out[case.name] = {"status": "skipped", "why": f"{case.needs} does not import here"}
            suite.log(f"profile {case.name}: skipped ({case.needs} does not import)")
            continue
        slug = case.name.replace(" ", "-")
        docs = {b: suite.out / f"profile-{slug}-{b}.json" for b in (suite.backend, "estimate")}
        # the remaining time of the part, shared by the remaining cases
        budget = suite.left(share_end) / (len(cases) - i)
        results = {}
        for backend, path in docs.items():
            args = ["profile", suite.model(case), *case.args, *rows, "--backend", backend,
                    "--format", "json", "-o", str(path), "--no-save"]  # fmt: skip
            if backend != "estimate":
                args += steps
            rc, output = suite.velora(args, timeout=budget if backend != "estimate" else 120)
            results[backend] = {"rc": rc, "tail": output.strip().splitlines()[-3:]}
            if path.is_file():
                suite.documents.append(path)
        comparisons = compare_rows(
            _rows(docs[suite.backend]),
            _rows(docs["estimate"]),
            DRY_PREDICTIONS if suite.dry_run else PREDICTIONS,
        )
        out[case.name] = {"runs": results, "comparisons": comparisons,
                          "rows": _rows(docs[suite.backend])}  # fmt: skip
        bad = [c for c in comparisons if not c["within"]]
        suite.log(f"profile {case.name}: {len(comparisons)} comparisons, {len(bad)} outside ±5%")
    return out


def _imports(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- 2. layer micro-benchmark ----------------------------------------------------------------------


def part_layer_bench(suite: Suite) -> dict:
    import torch
    from layer_backward import bench

    if suite.dry_run:
        shapes, tokens, dtype, device, repeat = [(64, 96)], 256, torch.float32, "cpu", 3
    else:
        shapes, tokens, dtype, device, repeat = (
            [(4096, 11008), (11008, 4096)],
            8192,
            torch.bfloat16,
            "cuda",
            20,
        )
    out = {}
    for d_in, d_out in shapes:
        times, m = bench(d_in, d_out, tokens, dtype, device, warmup=3, repeat=repeat)
        ratio = times["velora"] / times["linear"]
        out[f"{d_in}->{d_out}"] = {"M": m, "seconds": times, "velora_over_linear": ratio,
                                   "naive_over_velora": times["naive"] / times["velora"]}  # fmt: skip
        suite.log(f"layer {d_in}->{d_out} M={m}: linear {times['linear'] * 1e3:.2f} ms, velora "
                  f"{times['velora'] * 1e3:.2f} ms, naive {times['naive'] * 1e3:.2f} ms; "
                  f"velora/linear {ratio:.2f}x")  # fmt: skip
    return out


# -- 4. the tuner end to end ------------------------------------------------------------------------


def part_tune(suite: Suite, profiles: dict, share_end: float) -> dict:
    name = DRY_CASES[0].name if suite.dry_run else GPU_CASES[0].name
    case = next(c for c in (DRY_CASES if suite.dry_run else GPU_CASES) if c.name == name)
    rows = profiles.get(name, {}).get("rows", {})
    key = "device_used_bytes" if not suite.dry_run else "peak_bytes"
    peaks = {lab: r.get(key) or r.get("peak_bytes") for lab, r in rows.items()
             if r.get("status") == "ok"}  # fmt: skip
    if not peaks.get("baseline") or not peaks.get("gc"):
        return {"status": "skipped", "why": f"no measured baseline and gc rows of {name}"}
    if peaks["baseline"] > 1.1 * peaks["gc"]:
        budget = (peaks["baseline"] + peaks["gc"]) // 2  # only memory-saving configurations fit
    else:  # (tiny models) checkpointing does not lower the peak: a budget everything fits
        budget = int(peaks["baseline"] / 0.9)
    path = suite.out / "tune.json"
    args = ["tune", suite.model(case), *case.args, "--backend", suite.backend, "--budget", f"{budget}B",
            "--mode", "full", "--optimizer", "adamw", "--placements", "paper",
            "--num-groups", "4" if suite.dry_run else "32", "--probe-steps",
            "2" if suite.dry_run else "8", "--max-measured", "3", "--format", "json"]  # fmt: skip
    rc, output = suite.velora(args, timeout=suite.left(share_end))
    start = output.find("{\n")
    document = json.loads(output[start : output.rfind("}") + 1]) if start >= 0 else None
    if document is not None:
        path.write_text(json.dumps(document, indent=2) + "\n")
        suite.documents.append(path)
    rec = (document or {}).get("recommendation")
    result = {"rc": rc, "budget_bytes": budget, "recommendation": rec and rec.get("key"),
              "verified_peak_bytes": rec and rec.get("peak_bytes"),
              "reason": (document or {}).get("reason")}  # fmt: skip
    suite.log(
        f"tune {case.model} --budget {budget}B: rc {rc}, recommended {result['recommendation']}"
    )
    return result


# -- the run ---------------------------------------------------------------------------------------


def summarize(suite: Suite) -> str:
    """The table printed last: every comparison, then the targets."""
    lines = ["| case | row | figure | measured | estimate | error | ±5% |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for case, result in suite.results.get("profiles", {}).items():
        for c in result.get("comparisons", []):
            fmt = _fmt_seconds if c["figure"] == "step time" else _fmt_bytes
            lines.append(f"| {case} | {c['row']} | {c['figure']} | {fmt(c['measured'])} | "
                         f"{fmt(c['estimate'])} | {c['error']:+.1%} | "
                         f"{'yes' if c['within'] else 'NO'} |")  # fmt: skip
    lines += ["", *targets(suite)]
    return "\n".join(lines) + "\n"


def targets(suite: Suite) -> list[str]:
    out = []
    rows = (
        suite.results.get("profiles", {})
        .get(DRY_CASES[0].name if suite.dry_run else "llama-2-7b bf16", {})
        .get("rows", {})
    )
    seconds = {lab: r.get("step_seconds") for lab, r in rows.items() if r.get("status") == "ok"}
    velora = seconds.get("velora paper g4" if suite.dry_run else "velora paper g32")
    if velora and seconds.get("baseline") and seconds.get("gc"):
        out.append(f"VeLoRA paper / baseline step time: {velora / seconds['baseline']:.2f}x "
                   f"(target <= 1.00); gc / VeLoRA: {seconds['gc'] / velora:.2f}x "
                   "(target >= 1.25)")  # fmt: skip
    for shape, r in suite.results.get("layer_bench", {}).items():
        if isinstance(r, dict) and "velora_over_linear" in r:
            out.append(f"layer {shape}: VeLoRA fwd+bwd / nn.Linear {r['velora_over_linear']:.2f}x "
                       "(target <= 1.00)")  # fmt: skip
    comparisons = [c for r in suite.results.get("profiles", {}).values()
                   for c in r.get("comparisons", [])]  # fmt: skip
    if comparisons:
        inside = sum(c["within"] for c in comparisons)
        out.append(f"estimates within ±5%: {inside} of {len(comparisons)}")
    return out


def _fmt_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt_seconds(s) -> str:
    return f"{s * 1e3:.1f} ms"


def run_part(suite: Suite, name: str, fn, *args) -> None:
    start = time.monotonic()
    try:
        suite.results[name] = fn(suite, *args)
    except Exception as exc:  # noqa: BLE001 - a broken part must not stop the later ones
        suite.results[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        suite.log(f"{name}: {type(exc).__name__}: {exc}")
    suite.results.setdefault("seconds", {})[name] = time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole suite (default 480; dry run 120)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, args.dry_run,
                  limit=args.time_limit or (120.0 if args.dry_run else 480.0))  # fmt: skip
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
            return 1
        suite.results["device"] = torch.cuda.get_device_name(0)
    suite.results["dry_run"] = args.dry_run
    if args.dry_run:
        import tempfile

        from transformers import LlamaConfig

        suite.dry_model = tempfile.mkdtemp(prefix="velora-suite-")
        LlamaConfig(**DRY_CONFIG).save_pretrained(suite.dry_model)
    # deadlines as fractions of the limit, by value: 1 then 3 then 2 then 4
    run_part(suite, "correctness", part_correctness)
    run_part(suite, "profiles", part_profiles, 0.70)
    run_part(suite, "layer_bench", part_layer_bench)
    run_part(suite, "tune", part_tune, suite.results.get("profiles", {}), 1.0)
    summary = summarize(suite)
    (args.out / "summary.md").write_text(summary)
    (args.out / "summary.json").write_text(json.dumps(suite.results, indent=2, default=str) + "\n")
    (args.out / "log.txt").write_text("\n".join(suite.log_lines) + "\n")
    with tarfile.open(args.out / "documents.tar.gz", "w:gz") as tar:
        for path in suite.documents:
            tar.add(path, arcname=path.name)
    for path in suite.documents:
        path.unlink()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
