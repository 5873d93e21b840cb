"""The memory-saving methods velora applies to a model, as layers and optimizers.

    velora.py      the VeLoRA linear layer: rank-1 sub-token compression of the saved input
    placement.py   which layers VeLoRA wraps (architecture-aware presets, globs), apply/remove
    lowrank.py     GaLore and AdaRankGrad (low-rank optimizer state)
    quant.py       QLoRA: the 4-bit NF4 base (bitsandbytes) with LoRA adapters (peft)
    precision.py   what each part of the step is stored in, in words

May import: the leaves (models, gpus, files, budget) only; the step and everything that
measures it sit above.
"""
