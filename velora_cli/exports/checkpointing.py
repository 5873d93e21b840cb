"""Selective checkpointing and activation offload in the exports: what the trainers can state,
and the PyTorch snippet for what they cannot.

- Offload of checkpoint inputs is transformers' own option (5.x): ``offload=True`` in the
  checkpointing kwargs, which the Trainer pops and applies as ``save_on_cpu(pin_memory=True)``
  around each layer's checkpoint (what velora measured).
- Selective checkpointing has no TrainingArguments/SFTConfig spelling for velora's policies (TRL's
  ``gradient_checkpointing_kwargs={"selective": True}`` keeps only the attention kernels' outputs,
  another policy): the model is set up by `velora_cli.apply_config` (or the PyTorch snippet below)
  and the trainer's own checkpointing is left off, since enabling it again would replace the
  policy.
- Offload of all saved activations: TRL's ``activation_offloading=True``; for the Trainer,
  ``apply_config`` installs velora's (``save_on_cpu`` semantics, what was measured).
"""

from __future__ import annotations

from velora_cli.configs import VeloraConfig

OP_SNIPPET = """\
from collections import defaultdict
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
import torch

# torchtitan's "op" policy (torchtitan/distributed/activation_checkpoint.py): keep matmul and
# attention outputs, recompute every second matmul and all the rest
SAVE = {torch.ops.aten.mm.default, torch.ops.aten.max.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default}

def op_policy():
    counts = defaultdict(int)
    def policy(ctx, func, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if func == torch.ops.aten.mm.default:
            counts[key] += 1
        save = func in SAVE and not (func == torch.ops.aten.mm.default and counts[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE
    return policy

model.activation_checkpointing_enable(
    every_n_layers={every},
    activation_checkpointing_kwargs={"use_reentrant": False,
        "context_fn": lambda: create_selective_checkpoint_contexts(op_policy())})
"""

REGION_SNIPPET = """\
from velora_cli.measure.selective import sac_context_fn  # hooks on each layer's {what}

model.activation_checkpointing_enable(
    every_n_layers={every},
    activation_checkpointing_kwargs={"use_reentrant": False,
        "context_fn": sac_context_fn(model, "{kind}")})
"""


def by_velora(config: VeloraConfig) -> bool:
    """Whether the model's checkpointing must be set up by ``apply_config`` (selective
    checkpointing), so the trainer's own must stay off."""
    return config.sac is not None


def sac_snippet(config: VeloraConfig) -> str | None:
    """PyTorch's selective-checkpoint API set up as the tune measured it (None: not selective)."""
    if config.sac is None:
        return None
    every = config.gc_every or 1
    if config.sac == "op":
        return OP_SNIPPET.replace("{every}", str(every))
    what = "attention" if config.sac == "attn" else "MLP"
    return (
        REGION_SNIPPET.replace("{every}", str(every))
        .replace("{kind}", config.sac)
        .replace("{what}", what)
    )


def notes(config: VeloraConfig, *, trl: bool = False) -> list[str]:
    """What the export says about selective checkpointing and offload, one line each."""
    out = []
    if config.sac is not None:
        out.append(
            f"selective checkpointing ({config.sac}): set up by velora_cli.apply_config(model, "
            "config, checkpointing=True), or the PyTorch snippet (sac_snippet); the trainer's "
            "own checkpointing is off, as turning it on would replace the policy"
            + ("; TRL's selective=True is another policy (attention outputs only)" if trl else "")
        )
    if config.offload == "inputs":
        out.append(
            "offload: each checkpointed layer's input is kept in pinned host memory "
            "(transformers' offload=True: save_on_cpu, copies on the compute stream)"
        )
    if config.offload == "all" and trl:
        out.append(
            "offload all: TRL's activation_offloading=True copies on a side stream (may hide "
            "behind compute), shares storages (less host memory than planned) and keeps its last "
            "5 offloaded tensors on the GPU until copied (a little more device memory than "
            "planned)"
        )
    elif config.offload == "all":
        out.append(
            "offload all: not a TrainingArguments option; velora_cli.apply_config(model, config) "
            "installs it (every saved activation >= 1 KiB to pinned host memory, as measured)"
        )
    return out
