"""What a step is built with for `--attn`, on each device (HF's `attn_implementation` names).

On a GPU, transformers' own implementations run; on CPU and meta, the estimate's stand-ins
(`attention.py` for SDPA, `flash_attention_2.py`), or transformers' eager path, which runs the
same ops everywhere (its mask function made meta-safe).
"""

from __future__ import annotations

from velora_cli.emulation.attention import _register_meta_eager_mask, register_estimate_attention
from velora_cli.emulation.flash_attention_2 import register_fa2_attention
from velora_cli.models.spec import ATTENTIONS


def attention_implementation(attn: str, device: str) -> str:
    """The `attn_implementation` a step on ``device`` is built with for ``--attn attn``.

    Args:
        attn: one of `ATTENTIONS` ("auto" is transformers' default, sdpa).
        device: "cuda" (the real kernels), "cpu" or "meta" (the estimate's stand-ins).

    Returns:
        "sdpa", "eager" or "flash_attention_2" on a GPU; on CPU and meta, the estimate's SDPA
        (`ESTIMATE_ATTENTION`), transformers' "eager" (which runs the same on every device), or
        the FA2 stand-in (`FA2_ATTENTION`, meta only).

    Raises:
        ValueError: an unknown name, or flash_attention_2 on the CPU.
    """
    if attn not in ATTENTIONS:
        raise ValueError(f"--attn {attn!r}: choose {'|'.join(ATTENTIONS)}")
    if device not in ("cpu", "meta"):
        return "sdpa" if attn == "auto" else attn
    if attn == "eager":
        if device == "meta":
            _register_meta_eager_mask()
        return "eager"
    if attn == "flash_attention_2":
        if device != "meta":
            raise ValueError(
                "--attn flash_attention_2 needs a CUDA GPU (the flash-attn package): use "
                "--backend estimate to predict it, or --attn sdpa/eager on the cpu backend"
            )
        return register_fa2_attention()
    return register_estimate_attention()
