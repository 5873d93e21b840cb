"""What each part of the measured step is stored in, in words for the profile and tune headers.

The parts differ by mode, and what velora allocates for them is (tests/test_precision.py checks
every rule against the dtypes and byte counts of a prepared model after a real CPU step):

* full: the trained weights in ``--dtype`` (fp32 master weights under ``--amp``); gradients take
  their parameter's dtype (torch autograd), and AdamW/SGD/GaLore/AdaRankGrad state too
  (``torch.zeros_like(p)``; the low-rank moments are created in ``p.dtype``).
* lora: the frozen base in ``--dtype``; the adapters in fp32, because peft's ``get_peft_model``
  upcasts bf16/fp16 adapters to fp32 (``autocast_adapter_dtype=True``, its default), so their
  gradients and optimizer state are fp32 as well.
* qlora: as lora, with the base linears (all but ``lm_head``) in 4-bit NF4 computing in bf16
  (`velora_cli.methods.quant`); embeddings, norms and ``lm_head`` stay in ``--dtype``.

Plain data, no torch import: the CLI renders it before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """Storage dtype of each part of a training step (dtype names: fp32, bf16, fp16).

    Example:
        >>> describe("lora", "bf16").text
        'frozen base bf16; LoRA adapters fp32, their gradients and optimizer state fp32'
    """

    mode: str
    trained: str  # the trained parameters (all weights in full mode, the adapters otherwise)
    grads: str
    optimizer_state: str
    frozen: str | None = None  # the frozen base (lora/qlora), what is not 4-bit in qlora
    quantized: str | None = None  # qlora: the base linears
    autocast: str | None = None  # --amp: autocast to this dtype

    @property
    def text(self) -> str:
        """One line, e.g. ``frozen base bf16; LoRA adapters fp32, ...``."""
        amp = f", {self.autocast} autocast" if self.autocast else ""
        if self.mode == "full":
            if self.autocast:
                return (
                    f"mixed precision: {self.trained} master weights, gradients and optimizer "
                    f"state{amp}"
                )
            return f"pure {self.trained}: {self.trained} weights, gradients and optimizer state"
        if self.quantized:
            base = f"frozen base linears {self.quantized}, embeddings/norms/lm_head {self.frozen}"
        else:
            base = f"frozen base {self.frozen}"
        same = self.trained == self.grads == self.optimizer_state
        adapters = (
            f"LoRA adapters {self.trained}, their gradients and optimizer state {self.grads}"
            if same
            else f"LoRA adapters {self.trained}, gradients {self.grads}, optimizer state "
            f"{self.optimizer_state}"
        )
        return f"{base}{amp}; {adapters}"


# bitsandbytes' 4-bit layers as velora_cli.methods.quant.QuantConfig builds them (QLoRA's recipe)
QUANTIZED = "4-bit NF4 (bf16 compute)"


def describe(
    mode: str,
    dtype: str,
    amp: str | None = None,
    *,
    quantized: str | None = None,
    frozen: str | None = None,
) -> Precision:
    """The storage of each part of a step in ``mode`` with weights ``dtype`` and ``--amp``.

    Args:
        mode: full, lora or qlora.
        dtype: ``--dtype`` (fp32 with ``--amp``: the master weights).
        amp: ``--amp`` (bf16, fp16) or None.
        quantized: how the 4-bit base is set up (qlora), if not QLoRA's defaults (`QUANTIZED`).
        frozen: what the frozen non-4-bit parameters are stored in, if not the weights' dtype
            (qlora after prepare_model_for_kbit_training: fp32).

    Returns:
        The `Precision`; its ``text`` is the profile/tune header's precision line.
    """
    weights = "fp32" if amp else dtype
    if mode == "full":
        return Precision(mode, weights, weights, weights, autocast=amp)
    # peft upcasts half-precision adapters to fp32 (autocast_adapter_dtype=True)
    return Precision(
        mode,
        trained="fp32",
        grads="fp32",
        optimizer_state="fp32",
        frozen=frozen or weights,
        quantized=(quantized or QUANTIZED) if mode == "qlora" else None,
        autocast=amp,
    )


def describe_modes(
    modes: list[str] | tuple[str, ...],
    dtype: str,
    amp: str | None = None,
    *,
    quantized: str | None = None,
    frozen: str | None = None,
) -> str:
    """The precision line of a tune over several modes: each mode's `describe` text, ``|``
    between modes (``full: pure bf16: ... | lora: frozen base bf16; ...``); one mode alone
    reads as `describe` does."""
    modes = list(dict.fromkeys(modes))

    def text(mode: str) -> str:  # quantized/frozen: qlora's settings (`describe`)
        qlora = {"quantized": quantized, "frozen": frozen} if mode == "qlora" else {}
        return describe(mode, dtype, amp, **qlora).text

    if len(modes) == 1:
        return text(modes[0])
    return " | ".join(f"{mode}: {text(mode)}" for mode in modes)
