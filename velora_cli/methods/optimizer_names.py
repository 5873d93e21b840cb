"""The optimizer names velora knows, and what each is (no torch import: the CLI reads these).

velora's own names (adamw, sgd, galore, adarankgrad) and the HF Trainer's
(``TrainingArguments.optim``: adamw_torch_fused, paged_adamw_8bit, adafactor, ...). What each
allocates and how it is built: `velora_cli.methods.optimizers`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer name: what builds it and what the Trainer calls it."""

    name: str
    family: str  # adamw | bnb | adafactor | sgd | lowrank
    trainer_optim: str | None  # TrainingArguments.optim that builds the same, None: none does
    impl: str | None = None  # adamw: foreach | fused | forloop
    bits: int | None = None  # bnb: 8 | 32
    paged: bool = False
    description: str = ""


_INFOS = (
    OptimizerInfo("adamw", "adamw", "adamw_torch", "foreach",
                  description="torch AdamW, foreach (CUDA's default implementation)"),
    OptimizerInfo("sgd", "sgd", None, "foreach",
                  description="torch SGD, momentum 0.9, foreach"),
    OptimizerInfo("galore", "lowrank", None, description="GaLore AdamW (velora's)"),
    OptimizerInfo("adarankgrad", "lowrank", None, description="AdaRankGrad (velora's)"),
    OptimizerInfo("adamw_torch", "adamw", "adamw_torch", "foreach",
                  description="torch AdamW, foreach (Trainer adamw_torch on CUDA)"),
    OptimizerInfo("adamw_torch_fused", "adamw", "adamw_torch_fused", "fused",
                  description="torch AdamW, fused (HF Trainer default, transformers 5)"),
    OptimizerInfo("adamw_torch_forloop", "adamw", None, "forloop",
                  description="torch AdamW, for-loop (foreach=False)"),
    OptimizerInfo("adamw_bnb_8bit", "bnb", "adamw_bnb_8bit", bits=8,
                  description="bitsandbytes AdamW 8-bit"),
    OptimizerInfo("adamw_8bit", "bnb", "adamw_8bit", bits=8,
                  description="bitsandbytes AdamW 8-bit"),
    OptimizerInfo("paged_adamw_8bit", "bnb", "paged_adamw_8bit", bits=8, paged=True,
                  description="bitsandbytes paged AdamW 8-bit"),
    OptimizerInfo("paged_adamw_32bit", "bnb", "paged_adamw_32bit", bits=32, paged=True,
                  description="bitsandbytes paged AdamW 32-bit"),
    OptimizerInfo("adafactor", "adafactor", "adafactor",
                  description="transformers Adafactor (factored second moments)"),
)  # fmt: skip
OPTIMIZER_INFO = {info.name: info for info in _INFOS}
OPTIMIZER_NAMES = tuple(OPTIMIZER_INFO)
LOWRANK = tuple(i.name for i in _INFOS if i.family == "lowrank")
PAGED = tuple(i.name for i in _INFOS if i.paged)
NEEDS_BITSANDBYTES = tuple(i.name for i in _INFOS if i.family == "bnb")
TRAINER_DEFAULT = "adamw_torch_fused"  # transformers 5.25 training_args.py, torch >= 2.8


class OptimizerError(ValueError):
    """An optimizer name or setting velora cannot build (the message says what to use)."""


def optimizer_info(name: str) -> OptimizerInfo:
    """The `OptimizerInfo` of ``name``.

    Raises:
        OptimizerError: an unknown name, with the nearest known one when there is one.
    """
    if name in OPTIMIZER_INFO:
        return OPTIMIZER_INFO[name]
    close = difflib.get_close_matches(name, OPTIMIZER_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise OptimizerError(f"--optimizer {name!r}: choose {'|'.join(OPTIMIZER_NAMES)}{hint}")
