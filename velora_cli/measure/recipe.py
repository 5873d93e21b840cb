"""The training recipe's settings beside the step's shapes: checkpointing kind, QLoRA's
BitsAndBytesConfig and peft preparation, and the precisions the GPU can run.

``recipe_fields`` turns the command line's values into `StepSpec` fields (defaults: what the
PEFT/TRL QLoRA recipe does: NF4, double quantization, bf16 compute where the GPU has bf16, uint8
storage, ``prepare_model_for_kbit_training``); ``check_precision`` refuses a precision the GPU
has no hardware for, before anything is built (`gpus.check_dtype`), for the GPU named by
``--gpu`` or, on the cuda backend, the one torch sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velora_cli.gpus import GpuSpec
    from velora_cli.measure.train_step import StepSpec


def recipe_fields(
    *,
    gc_reentrant: bool = False,
    double_quant: bool = True,
    compute_dtype: str | None = None,
    quant_storage: str = "uint8",
    kbit_prepare: bool = True,
    modes: tuple[str, ...] | list[str] = ("full",),
    gpu: GpuSpec | None = None,
) -> dict[str, Any]:
    """`StepSpec` fields from the recipe options.

    Args:
        compute_dtype: bnb_4bit_compute_dtype; None: bf16, or fp16 on a GPU without bf16 (the
            T4 recipes' choice).
        kbit_prepare: prepare_model_for_kbit_training, in qlora mode only (the other modes have
            no k-bit base; the spec refuses it there).
        modes: the modes the step (or the tune) runs in.
        gpu: the GPU planned for, if named.
    """
    if compute_dtype is None:
        compute_dtype = "fp16" if gpu is not None and not gpu.supports("bf16") else "bf16"
    qlora = "qlora" in modes
    return {
        "gc_reentrant": gc_reentrant,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "quant_storage": quant_storage,
        "kbit_prepare": kbit_prepare and qlora,
    }


def check_precision(gpu: GpuSpec, spec: StepSpec, modes: tuple[str, ...] | list[str] = ()) -> None:
    """Refuse ``--dtype``, ``--amp`` or the QLoRA compute dtype where ``gpu`` lacks it.

    Raises:
        gpus.UnsupportedPrecisionError: one line naming what to use instead.
    """
    from velora_cli.gpus import check_dtype

    check_dtype(gpu, spec.dtype, flag="--dtype")
    check_dtype(gpu, spec.amp, flag="--amp")
    if spec.mode == "qlora" or "qlora" in modes:
        check_dtype(gpu, spec.compute_dtype, flag="--compute-dtype")


def detected_gpu() -> GpuSpec | None:
    """The GPU torch sees (device 0) as a `GpuSpec`, None when none is visible or it is not in
    velora's table."""
    import torch

    from velora_cli.gpus import gpu_from_device_name

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return gpu_from_device_name(props.name, props.total_memory)


def check_cuda_precision(spec: StepSpec) -> None:
    """`check_precision` for the GPU the cuda backend will run on (nothing without one).

    A GPU missing from velora's table is checked by its compute capability alone.

    Raises:
        gpus.UnsupportedPrecisionError: e.g. bf16 on a T4 or V100.
    """
    import torch

    from velora_cli.gpus import PRECISION_MIN_CC, UnsupportedPrecisionError

    if not torch.cuda.is_available():
        return
    gpu = detected_gpu()
    if gpu is not None:
        check_precision(gpu, spec)
        return
    cc = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    asked = [("--dtype", spec.dtype), ("--amp", spec.amp)]
    if spec.mode == "qlora":
        asked.append(("--compute-dtype", spec.compute_dtype))
    for flag, dtype in asked:
        if dtype is not None and cc < PRECISION_MIN_CC[dtype]:
            need = ".".join(map(str, PRECISION_MIN_CC[dtype]))
            raise UnsupportedPrecisionError(
                f"{flag} {dtype}: {name} (compute capability {cc[0]}.{cc[1]}) has no {dtype} "
                f"support (it needs {need} or newer); use fp16 or fp32"
            )
