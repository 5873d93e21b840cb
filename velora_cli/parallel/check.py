"""Does one sharded step compute what one process computes on the global batch?

The job (N gloo ranks, each on its own batch, `worker.batch_seed`) takes one optimizer step;
rank 0 gathers the full gradients and updated parameters (``DTensor.full_tensor``). The
reference is one process, the same seeded model, the ranks' batches concatenated: with full-
length sequences every rank predicts as many tokens, so the mean loss over the global batch has
the rank-averaged gradient. A reduction that sums instead of averaging (the reported gloo AVG
trap under FSDP2, pytorch issue 162338) shows as gradients N times too large; AdamW's first step
hides a gradient scale (its update is about lr·sign(g)), hence the gradients are compared too.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from velora_cli.measure.train_step import StepSpec


def reference_step(spec: StepSpec) -> dict[str, tuple[Any, Any]]:
    """One process, the global batch: {name: (gradient, updated parameter)}."""
    import torch

    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.measure.train_step import make_batch, prepare, train_step
    from velora_cli.parallel.worker import batch_seed

    single = dataclasses.replace(spec, world_size=1, parallel=None, cpu_offload=False)
    prepared = prepare(single, "cpu", attn_implementation=register_estimate_attention())
    per_rank = [
        make_batch(dataclasses.replace(spec, seed=batch_seed(spec, r)), prepared.vocab_size, "cpu")
        for r in range(spec.world_size)
    ]
    # micro-batch i of the global batch: every rank's micro-batch i, concatenated
    prepared.micro_batches = [
        {k: torch.cat([ranks[i][k] for ranks in per_rank]) for k in per_rank[0][i]}
        for i in range(len(per_rank[0]))
    ]
    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in prepared.model.named_parameters()}

    def before_step(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    handle = prepared.optimizer.register_step_pre_hook(before_step)
    train_step(prepared)
    handle.remove()
    return {n: (grads.get(n), p.detach().clone()) for n, p in prepared.model.named_parameters()}


def compare_step(spec: StepSpec, *, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``spec`` as a real job and as one process; the largest differences.

    Returns:
        ``grad_rel_error`` (max over parameters of ‖g_job − g_ref‖ / ‖g_ref‖), ``grad_ratio``
        (‖g_job‖ / ‖g_ref‖ summed over parameters: N would mean summed gradients),
        ``param_max_abs_diff`` (updated parameters; the step's lr is 1e-5, so the gradients
        are the sensitive comparison), ``worst`` (the parameter of the largest gradient error)
        and ``torch`` (the version checked).
    """
    import torch

    from velora_cli.parallel.launch import RanksBackend, run_job

    backend = RanksBackend(device="cpu", timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="velora-check-") as tmp:
        path = Path(tmp, "step.pt")
        request = {**backend.request([spec]), "check": str(path)}
        (ranks,) = run_job(request, spec.world_size, timeout=timeout)
        failed = [r for r in ranks if r.get("status") != "ok"]
        if failed:
            raise RuntimeError("; ".join(f"rank {r['rank']}: {r.get('error')}" for r in failed))
        job = torch.load(path)
    reference = reference_step(spec)
    worst, grad_err, norm_job, norm_ref, param_diff = None, 0.0, 0.0, 0.0, 0.0
    for name, (g_ref, p_ref) in reference.items():
        g_job, p_job = job[name]
        param_diff = max(param_diff, (p_job - p_ref).abs().max().item())
        if g_ref is None:
            continue
        norm_job += g_job.norm().item()
        norm_ref += g_ref.norm().item()
        err = ((g_job - g_ref).norm() / g_ref.norm().clamp_min(1e-30)).item()
        if err >= grad_err:
            worst, grad_err = name, err
    return {
        "grad_rel_error": grad_err,
        "grad_ratio": norm_job / norm_ref,
        "param_max_abs_diff": param_diff,
        "worst": worst,
        "torch": torch.__version__,
    }
