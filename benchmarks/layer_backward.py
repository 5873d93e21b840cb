"""Micro-benchmark: VeLoRA layer backward vs the naive reconstruct path vs plain nn.Linear.

    python benchmarks/layer_backward.py                       # fp32 on CPU (T=2048 tokens)
    python benchmarks/layer_backward.py --device cuda --dtype bf16 --tokens 8192

For each shape (4096->11008 and 11008->4096, M = in/32) it first checks correctness (factorized vs
naive weight gradient in float64 on a slice), then times, in the same run and interleaved:
  linear : plain nn.Linear forward + backward (grad_input + grad_weight from the saved input)
  velora : VeLoRALinear forward + backward (factorized grad_weight, x̂ never built)
  naive  : the same compression, but backward rebuilds x̂ = z ⊗ v (T×D) and does gᵀx̂
Median of --repeat timed runs after --warmup; CUDA events on a GPU. Prints ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from velora_cli.methods.velora import VeLoRALinear, compress, reference_weight_grad  # noqa: E402


class NaiveVeLoRA(torch.autograd.Function):
    """The slow reference path: reconstruct x̂ explicitly in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, v):
        ctx.save_for_backward(compress(x, v), weight, v)
        ctx.x_shape = x.shape
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        z, weight, v = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        x_hat = (z.unsqueeze(-1) * v.to(z.dtype)).reshape(z.shape[0], -1)  # (T, D) built
        grad_w = g2.t().mm(x_hat.to(g2.dtype))
        grad_x = g2.mm(weight).view(ctx.x_shape)
        return grad_x, grad_w, g2.sum(0), None


def _timer(device):
    if device.type == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    return run


def check(d_in, d_out, m):
    """Factorized vs naive weight gradient in float64: returns the max relative difference."""
    torch.manual_seed(0)
    layer = VeLoRALinear.from_linear(
        nn.Linear(d_in, d_out).double(), sub_token_size=m, init="random"
    )
    x = torch.randn(16, d_in, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    naive = reference_weight_grad(x.detach(), g, layer.v)
    return ((layer.weight.grad - naive).abs().max() / naive.abs().max()).item()


def bench(d_in, d_out, tokens, dtype, device, warmup, repeat):
    m = d_in // 32
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    velora = VeLoRALinear.from_linear(
        nn.Linear(d_in, d_out, device=device, dtype=dtype), sub_token_size=m, init="random"
    )
    v = velora.v
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d_out, device=device, dtype=dtype)

    def step_linear():
        linear(x).backward(g)

    def step_velora():
        velora(x).backward(g)

    def step_naive():
        NaiveVeLoRA.apply(x, velora.weight, velora.bias, v).backward(g)

    cases = {"linear": step_linear, "velora": step_velora, "naive": step_naive}
    timer = _timer(torch.device(device))
    times = {k: [] for k in cases}
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    for _ in range(repeat):  # interleaved so drift hits every case alike
        for name, fn in cases.items():
            for t in (x, linear.weight, linear.bias, velora.weight, velora.bias):
                t.grad = None  # no gradient accumulation (an extra O×D add) in any case
            times[name].append(timer(fn))
    return {k: statistics.median(t) for k, t in times.items()}, m


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--tokens", type=int, default=None, help="T (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    tokens = args.tokens or (8192 if args.device == "cuda" else 2048)
    print(
        f"device={args.device} dtype={args.dtype} tokens={tokens} threads="
        f"{torch.get_num_threads()} torch={torch.__version__}"
    )
    for d_in, d_out in ((4096, 11008), (11008, 4096)):
        err = check(d_in, d_out, d_in // 32)
        assert err < 1e-10, f"factorized backward disagrees with naive path: {err:.2e}"
        t, m = bench(d_in, d_out, tokens, dtype, args.device, args.warmup, args.repeat)
        print(
            f"{d_in:>5}->{d_out:<5} M={m:<3} fwd+bwd median: linear {t['linear'] * 1e3:8.1f} ms | "
            f"velora {t['velora'] * 1e3:8.1f} ms | naive {t['naive'] * 1e3:8.1f} ms | "
            f"velora/linear {t['velora'] / t['linear']:.2f}x  naive/velora "
            f"{t['naive'] / t['velora']:.2f}x  (float64 check rel err {err:.1e})"
        )


if __name__ == "__main__":
    main()
