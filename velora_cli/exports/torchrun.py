"""The torchrun export: a launch line and a training script that builds the model and shards it
exactly as velora measured it (`velora_cli.parallel.shard`), self-contained (the velora config is
inlined).

The order in the script, and why:

1. load the model (bf16 weights for ``--dtype bf16``);
2. ``velora_cli.apply_config(model, CONFIG)``: VeLoRA swaps ``nn.Linear`` modules for
   subclasses reusing their parameters, and checkpointing wraps the decoder layers' forward;
   both must happen before sharding, which hands FSDP2 the modules it will manage;
3. shard: FSDP2 ``fully_shard`` on each decoder layer (``model._no_split_modules``), then on
   the root; or DDP;
4. ``velora_cli.make_optimizer(model, CONFIG, lr=...)`` over the sharded parameters (an
   optimizer built before sharding would hold the unsharded tensors FSDP2 replaced).

``--dry-run N`` trains N steps on random tokens and prints each rank's peak memory: the check
that the configuration fits the GPUs it is launched on.
"""

from __future__ import annotations

import json
from typing import Any

from velora_cli.configs import VeloraConfig
from velora_cli.exports.recipe import attn_implementation, auto_class, head_kwargs, task_of
from velora_cli.models.public import is_builtin

_TEMPLATE = '''\
"""Train {model} with the configuration velora tuned: {parallel} on {world_size} GPUs.

Launch:  {launch}
Check:   {launch} --dry-run 3   (random tokens; each rank's peak beside the plan's)
Tuned:   {tuned}
"""

import argparse
import os

import torch
import torch.distributed as dist
{model_import}
from velora_cli import apply_config, make_optimizer
from velora_cli.parallel.dry_run import tracked_peak, versus_plan

MODEL = {model_literal}
DTYPE = torch.{dtype}
ATTN = {attn_literal}  # attn_implementation, as planned
PARALLEL = {parallel_literal}  # ddp | fsdp (reshard after forward) | fsdp-no-reshard
CPU_OFFLOAD = {cpu_offload}
MICRO_BATCH, ACCUMULATION, SEQ_LEN = {micro}, {accum}, {seq_len}  # per rank
CONFIG = {config}


def shard(model, device):
    """As velora measured it: fully_shard per decoder layer, then the root (or DDP)."""
    if PARALLEL == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model.to(device), device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if CPU_OFFLOAD else OffloadPolicy()
    options = dict(mesh=mesh, reshard_after_forward=PARALLEL == "fsdp", offload_policy=offload)
    layers = set(model._no_split_modules)  # the decoder layer classes
    for module in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def train_step(model, optimizer, micro_batches):
    for batch in micro_batches:
        loss = model(**batch).loss / len(micro_batches)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", type=int, default=0, help="steps on random tokens (>= 2)")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    if args.dry_run == 1:
        parser.error("--dry-run needs 2 steps or more: the first creates the optimizer state")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    model = {model_load}
    model.config.use_cache = False
    # 1. the model (above); 2. VeLoRA and checkpointing (use_reentrant as planned), before sharding
    apply_config(model, CONFIG)
    model = shard(model, device)  # 3. FSDP2 / DDP
    optimizer = make_optimizer(model, CONFIG, lr=args.lr)  # 4. over the sharded parameters
    model.train()

    holds = True
    if args.dry_run:
        cfg = (model.module if PARALLEL == "ddp" else model).config
        vocab = getattr(cfg, "vocab_size", 2)

        def step():
            ids = torch.randint(0, vocab, (ACCUMULATION, MICRO_BATCH, SEQ_LEN), device=device)
            train_step(model, optimizer, [{dry_batch} for x in ids])  # {task}

        for _ in range(args.dry_run - 1):
            step()
        if cuda:  # the allocator counts the peak
            step()
            peak, how = torch.cuda.max_memory_allocated(), "peak allocated"
        else:  # nothing counts it on a CPU: the last step runs under velora's tracker
            peak, how = tracked_peak(model, optimizer, PARALLEL, step), "tracked tensors"
        line, holds = versus_plan(dist.get_rank(), peak, how, CONFIG)
        print(f"{{line}} (after {{args.dry_run}} steps)", flush=True)
    else:
        raise SystemExit("add your data loader here: train_step(model, optimizer, micro_batches)")
    dist.destroy_process_group()
    if not holds:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
'''


# the dry run's random micro-batch of each head, from x: (MICRO_BATCH, SEQ_LEN) token ids and
# cfg: the model's config (labels as the HF heads take them, as velora planned the step)
_CLASSES = "cfg.num_labels"
DRY_BATCHES = {
    "causal-lm": "dict(input_ids=x, labels=x)",
    "masked-lm": "dict(input_ids=x, labels=x)",
    "sequence-classification": "dict(input_ids=x, labels=torch.randint(0, "
    f"{_CLASSES}, x.shape[:1], device=device))",
    "token-classification": f"dict(input_ids=x, labels=torch.randint(0, {_CLASSES}, x.shape, "
    "device=device))",
    "question-answering": "dict(input_ids=x, start_positions=x[:, 0] % SEQ_LEN, "
    "end_positions=x[:, 1] % SEQ_LEN)",
    "image-classification": "dict(pixel_values=torch.randn(MICRO_BATCH, cfg.num_channels, "
    "cfg.image_size, cfg.image_size, device=device), labels=torch.randint(0, "
    f"{_CLASSES}, (MICRO_BATCH,), device=device))",
}


def torchrun_blockers(config: VeloraConfig) -> list[str]:
    """Why ``config`` makes no torchrun script (empty when it does)."""
    why = []
    if config.parallel is None:
        why.append(
            "the configuration runs in one process (world size 1): there is nothing to launch "
            "(tune with --world-size N for a multi-GPU configuration)"
        )
    if config.trainer != "hf":
        why.append(
            f"the plan measured the {config.trainer} step; the script's loop computes the "
            "model's own loss (tune without --trainer trl)"
        )
    if config.mode != "full":
        why.append(
            f"mode {config.mode}: the script loads a full model; for LoRA wrap it with "
            "peft.get_peft_model before apply_config yourself (the order stays the same)"
        )
    return why


def launch_line(config: VeloraConfig, script: str = "train_velora.py") -> str:
    return f"torchrun --standalone --nproc-per-node {config.world_size} {script}"


def to_script(config: VeloraConfig, script: str = "train_velora.py") -> str:
    """The training script's text (see the module docstring)."""
    from velora_cli.budget import format_bytes

    tuned = f"{format_bytes(config.peak_bytes)} per rank" if config.peak_bytes else "unknown"
    tuned = f"peak {tuned} ({config.backend or 'unknown backend'})"
    if config.budget_bytes:
        tuned += f", budget {format_bytes(config.budget_bytes)} per GPU"
    inline = {k: v for k, v in config.to_dict().items() if k not in ("source", "versions")}
    builtin = is_builtin(config.model)
    return _TEMPLATE.format(
        model_import="from velora_cli import build_model  # MODEL is a velora built-in"
        if builtin
        else f"from transformers import {auto_class(config)}",
        model_load="build_model(MODEL, dtype=DTYPE)  # random weights, no tokenizer"
        if builtin
        else f"{auto_class(config)}.from_pretrained(\n        MODEL, {head_kwargs(config)}"
        "dtype=DTYPE, attn_implementation=ATTN\n    )",
        dry_batch=DRY_BATCHES.get(task_of(config) or "causal-lm", DRY_BATCHES["causal-lm"]),
        task=task_of(config) or "causal-lm",
        model=config.model,
        model_literal=json.dumps(config.model),
        attn_literal=json.dumps(attn_implementation(config)),
        parallel=config.parallel,
        parallel_literal=json.dumps(config.parallel),
        world_size=config.world_size,
        launch=launch_line(config, script),
        tuned=tuned,
        dtype={"bf16": "bfloat16", "fp16": "float16"}.get(config.dtype, "float32"),
        cpu_offload=config.cpu_offload,
        micro=config.micro_batch_size,
        accum=config.grad_accum_steps,
        seq_len=config.seq_len or 2048,
        config=_python_literal(inline),
    )


def _python_literal(value: dict[str, Any]) -> str:
    """The config as a Python dict literal (JSON's true/false/null spelled as Python's)."""
    import pprint

    return pprint.pformat(json.loads(json.dumps(value)), width=96, sort_dicts=False)
