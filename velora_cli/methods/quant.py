"""QLoRA: the frozen base quantized to 4-bit NF4 (bitsandbytes), LoRA adapters on top (peft).

Two ways to get the same model, chosen by the device:

- cpu/cuda: every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the base except the output embeddings
  (``lm_head``, as transformers' ``BitsAndBytesConfig`` skips it) becomes a
  ``bitsandbytes.nn.Linear4bit`` holding its weight in NF4 (double quantization, blocksize 64,
  compute dtype bf16: QLoRA's recipe, arXiv:2305.14314 §3). bitsandbytes >= 0.45 runs these
  layers on the CPU too (slowly). transformers' ``replace_with_bnb_linear`` only builds empty
  layers for a checkpoint loader to fill, so the swap is done here, from the built weights.
- meta (the estimate backend): ``MetaLinear4bit`` stands in for ``Linear4bit`` without
  bitsandbytes. Its parameter and buffers have exactly the sizes of a quantized weight and its
  forward/backward allocate what bitsandbytes allocates, so the storage tracker sees the same bytes.

What a 4-bit weight of n = out_features × in_features values stores (bitsandbytes 0.50
``functional.quantize_4bit`` / ``QuantState``; blocksize B = 64, nested blocksize 256)::

    packed weight   uint8 (ceil(n/2), 1)          two 4-bit codes per byte    ceil(n/2) B
    absmax          one scale per block of B values, nblocks = ceil(n/B):
      double quant  uint8 (nblocks,)               8-bit codes of the scales   nblocks B
                    + nested absmax fp32 (ceil(nblocks/256),)                  4·ceil(nblocks/256) B
                    + nested code table fp32 (256,) (a copy per weight)        1024 B
                    + offset fp32 () (mean of the scales)                      4 B
      otherwise     fp32 (nblocks,)                                            4·nblocks B
    code table      NF4's 16 values, fp32 (16,) (a new tensor per weight)      64 B

so a double-quantized weight costs n·(1/2 + 1/64 + 4/16384) + 1092 bytes (n a multiple of 16384):
4.127 bits per value.
The quantization state is kept by bitsandbytes outside ``parameters()``; here it is also
registered as non-persistent buffers (``weight_absmax``, ...) so that trackers count it.

What a step allocates per 4-bit matmul (bitsandbytes 0.50 ``MatMul4Bit``; CUDA's
``_dequant_linear_fallback``, used past 1536 tokens per micro-batch, and the CPU default kernel):
forward, the fp32 scales (2 × nblocks × 4 B with double quantization) and the whole weight
dequantized to the compute dtype, (O, D), freed once the linear returns; nothing is saved for
backward (no weight gradient). Backward, the scales again (nblocks × 4 B), the weight dequantized
to the dtype it was quantized from, cast to the gradient's dtype when that differs, then
grad_input = grad_output @ W. The estimate charges the forward dequantization at every size
(CUDA's fused kernel for <= 1536 tokens skips it): an upper bound that can only matter when a
peak falls inside a forward matmul.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.methods.velora import autocast_dtype

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the scales in blocks of 256 (fixed)
INSTALL_HINT = "needs bitsandbytes: pip install 'velora-cli[qlora]'"
QUANT_STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def packed_elements(numel: int, storage: torch.dtype) -> int:
    """Elements of the packed weight: two 4-bit codes per byte, in ``storage`` elements
    (bitsandbytes 0.50 ``quantize_4bit``: ``((n + 1) // (itemsize * 2), 1)``)."""
    return (numel + 1) // (storage.itemsize * 2)


class QuantizationUnavailable(RuntimeError):
    """bitsandbytes is missing: real 4-bit layers cannot be built (the estimate needs none)."""


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base is quantized: QLoRA's defaults (NF4, double quantization, bf16).

    Example:
        >>> QuantConfig().bits_per_value(4096 * 4096)
        4.1274...
    """

    quant_type: str = "nf4"
    blocksize: int = 64  # bitsandbytes' default (Params4bit, quantize_4bit)
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    # bnb_4bit_quant_storage: the dtype the packed codes are stored in (FSDP needs it to match
    # the other parameters); the bytes are the same, the parameter's dtype and numel are not
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self):
        errors = []
        if self.quant_type not in QUANT_TYPES:
            errors.append(f"quant_type {self.quant_type!r}: choose {'|'.join(QUANT_TYPES)}")
        if self.blocksize not in BLOCKSIZES:
            errors.append(f"blocksize {self.blocksize}: choose one of {BLOCKSIZES}")
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            errors.append(f"compute_dtype {self.compute_dtype}: choose float32|bfloat16|float16")
        if self.quant_storage not in QUANT_STORAGES:
            errors.append(
                f"quant_storage {self.quant_storage}: choose uint8|bfloat16|float16|float32"
            )
        if errors:
            raise ValueError("; ".join(errors))

    def storage(self, numel: int) -> dict[str, int]:
        """Bytes of each tensor a 4-bit weight of ``numel`` values stores (the formula above)."""
        nblocks = math.ceil(numel / self.blocksize)
        out = {"weight": packed_elements(numel, self.quant_storage) * self.quant_storage.itemsize}
        out["weight_quant_map"] = 16 * 4
        if self.double_quant:
            out["weight_absmax"] = nblocks  # uint8
            out["weight_nested_absmax"] = 4 * math.ceil(nblocks / NESTED_BLOCKSIZE)
            out["weight_nested_quant_map"] = 256 * 4
            out["weight_offset"] = 4
        else:
            out["weight_absmax"] = 4 * nblocks  # fp32
        return out

    def bits_per_value(self, numel: int) -> float:
        return 8 * sum(self.storage(numel).values()) / numel


# -- which layers ---------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(module: nn.Module) -> bool:
    """True for a 4-bit layer (bitsandbytes ``Linear4bit`` or ``MetaLinear4bit``)."""
    cls = type(module)
    if isinstance(module, MetaLinear4bit) or (
        cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
    ):  # (peft's LoRA wrapper of it is also called Linear4bit)
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and not weight.is_floating_point()


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The base layers QLoRA quantizes: exact ``nn.Linear`` and ``Conv1D`` layers, except the
    output embeddings (transformers' ``get_keys_to_not_convert`` keeps ``lm_head`` in 16 bits)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if (type(module) is nn.Linear or _is_conv1d(module)) and module is not output
    }


def _linear_weight(layer: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight; Conv1D stores it transposed."""
    return layer.weight.t() if _is_conv1d(layer) else layer.weight


# -- meta stand-in --------------------------------------------------------------------------------


@torch.library.custom_op("velora::dequantize", mutates_args=())
def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' dequantization as one op, for the meta stand-in: reads the packed codes and
    their scales, writes ``shape`` values of ``dtype`` (meta tensors hold no values). One op, so
    that the step-time roofline (timing/opcount.py) counts the bytes the real kernel moves."""
    return torch.empty(shape, dtype=dtype, device=codes.device)


@dequantize.register_fake
def _(codes, scales, shape, dtype):  # the meta (and fake-tensor) kernel
    return codes.new_empty(shape, dtype=dtype)


class _MetaMatMul4bit(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit`` on meta: allocates what it allocates, saves nothing."""

    @staticmethod
    def forward(ctx, x, packed, bias, layer):
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        scales = layer._scales(inplace=False)  # alive until the linear returns
        weight = layer._dequantize(scales, x.dtype)
        return F.linear(x, weight, bias)  # (..., O)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(0, dtype=ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            scales = layer._scales(inplace=True)
            # dequantize_4bit returns the quantized-from dtype
            weight = layer._dequantize(scales, layer.weight_dtype).to(grad_out.dtype)
            grad_x = torch.matmul(grad_out, weight)  # (..., D)
        return grad_x, None, grad_bias, None


class MetaLinear4bit(nn.Linear):
    """A bitsandbytes ``Linear4bit`` on the meta device: exact storage, same temporaries.

    Built from a layer (its bias is reused, its weight replaced by the packed stand-in)::

        >>> with torch.device("meta"):
        ...     layer = nn.Linear(4096, 11008, bias=False)
        >>> q = MetaLinear4bit.from_linear(layer)
        >>> q.weight.shape, q.weight.dtype, q.weight_absmax.shape
        (torch.Size([22544384, 1]), torch.uint8, torch.Size([704512]))
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("build a MetaLinear4bit with MetaLinear4bit.from_linear(layer, config)")

    @classmethod
    def from_linear(cls, layer: nn.Module, config: QuantConfig | None = None) -> MetaLinear4bit:
        """Replace ``layer`` (an ``nn.Linear`` or ``Conv1D``) by its 4-bit stand-in."""
        config = config or QuantConfig()
        weight = _linear_weight(layer)  # (O, D)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.config = config
        self.compute_dtype = config.compute_dtype  # read by peft to place the adapters
        self.weight_dtype = weight.dtype  # what dequantization returns (QuantState.dtype)
        numel = weight.numel()
        nblocks = math.ceil(numel / config.blocksize)
        meta = torch.device("meta")
        rows = packed_elements(numel, config.quant_storage)
        packed = torch.empty(rows, 1, dtype=config.quant_storage, device=meta)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = layer.bias
        buffers = {"weight_quant_map": torch.empty(16, dtype=torch.float32, device=meta)}
        if config.double_quant:
            nested = math.ceil(nblocks / NESTED_BLOCKSIZE)
            buffers["weight_absmax"] = torch.empty(nblocks, dtype=torch.uint8, device=meta)
            buffers["weight_nested_absmax"] = torch.empty(nested, dtype=torch.float32, device=meta)
            buffers["weight_nested_quant_map"] = torch.empty(256, dtype=torch.float32, device=meta)
            buffers["weight_offset"] = torch.empty((), dtype=torch.float32, device=meta)
        else:
            buffers["weight_absmax"] = torch.empty(nblocks, dtype=torch.float32, device=meta)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)
        self.train(layer.training)
        return self

    def _scales(self, *, inplace: bool) -> list[torch.Tensor]:
        """The fp32 block scales a dequantization builds: with double quantization, the 8-bit
        codes decoded (nblocks × 4 B) plus the offset, in place (backward,
        ``F.dequantize_4bit``) or into a second buffer (forward, CUDA's fallback)."""
        if not self.config.double_quant:
            return []
        n = self.weight_absmax.numel()
        decoded = dequantize(self.weight_absmax, self.weight_nested_absmax, [n], torch.float32)
        if inplace:
            return [decoded.add_(self.weight_offset)]
        return [decoded, decoded + self.weight_offset]

    def _dequantize(self, scales: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The whole (O, D) weight in ``dtype``, from the packed codes and the fp32 block scales
        (the last of ``scales``; the stored fp32 absmax without double quantization)."""
        absmax = scales[-1] if scales else self.weight_absmax
        shape = [self.out_features, self.in_features]
        return dequantize(self.weight, absmax, shape, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes' Linear4bit.forward: inputs and bias in the compute dtype, output back.
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(self.compute_dtype)
        return _MetaMatMul4bit.apply(x, self.weight, bias, self).to(inp_dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={c.quant_type}, blocksize={c.blocksize}, "
            f"double_quant={c.double_quant}, compute_dtype={c.compute_dtype}"
        )


@functools.cache
def meta_lora_layer() -> type[nn.Module]:
    """peft's LoRA layer for ``MetaLinear4bit``: the forward of peft's ``lora.bnb.Linear4bit``.

    peft wraps bitsandbytes layers in a class of its own whose forward differs from the plain
    ``lora.Linear``: it clones the base output ("defensively", peft/tuners/lora/bnb.py) and casts
    each adapter's output back to the base output's dtype before adding it. Built lazily: peft
    is imported only when LoRA is used.
    """
    from peft.tuners.lora.layer import Linear

    class MetaLoraLinear4bit(Linear):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs).clone()  # (..., O)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                if name in self.lora_variant:
                    raise NotImplementedError("LoRA variants (DoRA, ...) are not modelled in qlora")
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                # peft converts unless autocast is on; on meta only the emulation can be on.
                convert = autocast_dtype(x.device.type) is None
                expected = result.dtype
                if convert:
                    x = self._cast_input_dtype(x, lora_a.weight.dtype)
                output = lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]
                if convert:
                    output = output.to(expected)
                result = result + output
            return result

    return MetaLoraLinear4bit


# -- real layers ----------------------------------------------------------------------------------


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationUnavailable(INSTALL_HINT) from exc
    return bitsandbytes


def bnb_linear4bit(layer: nn.Module, config: QuantConfig, device: str | torch.device) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``layer``'s weight quantized on ``device``.

    The quantization state is also registered as non-persistent buffers (see the module doc).

    Raises:
        QuantizationUnavailable: bitsandbytes is not installed.
    """
    bnb = _bitsandbytes()
    weight = _linear_weight(layer).detach()  # (O, D)
    out_features, in_features = weight.shape
    with torch.device("meta"):
        module = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.quant_storage,
        )
    params = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        blocksize=config.blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=config.quant_storage,
        module=module,
    )
    module.weight = params.to(device)  # quantizes (Params4bit.to -> _quantize)
    module.bias = layer.bias
    # On a CPU with AVX512-BF16, bitsandbytes repacks weights for inference at the first eval
    # forward without grad; the repacked path has no backward. Keep the training layout.
    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    buffers = {"weight_absmax": state.absmax, "weight_quant_map": state.code}
    if state.nested:
        buffers["weight_nested_absmax"] = state.state2.absmax
        buffers["weight_nested_quant_map"] = state.state2.code
        buffers["weight_offset"] = state.offset
    for name, tensor in buffers.items():
        module.register_buffer(name, tensor, persistent=False)
    module.train(layer.training)
    return module


# -- the model ------------------------------------------------------------------------------------


def swap_layers(
    model: nn.Module, make: Callable[[nn.Module], nn.Module], names: list[str]
) -> list[str]:
    """Replace each named submodule of ``model`` by ``make(layer)``, one at a time (so a real
    model holds one layer's old weight beside the new ones, not all of them)."""
    for name in names:
        model.set_submodule(name, make(model.get_submodule(name)))
    return names


def quantize_base(
    model: nn.Module, device: str | torch.device, config: QuantConfig | None = None
) -> list[str]:
    """Quantize the frozen base of ``model`` in place: meta stand-ins on the meta device,
    bitsandbytes layers elsewhere.

    Args:
        model: a transformers model (before LoRA is applied).
        device: where the model lives (``meta``, ``cpu``, ``cuda``).
        config: quantization settings (default: NF4, double quantization, bf16 compute).

    Returns:
        The qualified names of the layers quantized.

    Raises:
        QuantizationUnavailable: a real device and no bitsandbytes.
    """
    config = config or QuantConfig()
    names = list(quantizable_layers(model))
    if torch.device(device).type == "meta":
        return swap_layers(model, lambda layer: MetaLinear4bit.from_linear(layer, config), names)
    _bitsandbytes()  # fail before touching the model
    swap_layers(model, lambda layer: bnb_linear4bit(layer, config, device), names)
    model.is_loaded_in_4bit = True  # what transformers sets: peft then wraps with lora.bnb
    return names


def quant_config(spec) -> QuantConfig:
    """The `QuantConfig` of a `StepSpec` (its BitsAndBytesConfig settings)."""
    dtypes = {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "uint8": torch.uint8,
    }
    return QuantConfig(
        double_quant=spec.double_quant,
        compute_dtype=dtypes[spec.compute_dtype],
        quant_storage=dtypes[spec.quant_storage],
    )


def prepare_for_kbit_training(model: nn.Module) -> None:
    """peft's ``prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)``.

    Freezes every parameter and casts each fp16/bf16 one that is not a 4-bit weight to fp32
    (embeddings, norms, ``lm_head``, biases: +2 B per value), which makes the residual stream fp32
    too. Its default ``use_gradient_checkpointing=True`` also turns on checkpointing (reentrant
    in transformers 5.25 + torch 2.13: its ``{}`` kwargs reach ``torch.utils.checkpoint`` without
    ``use_reentrant``); here checkpointing is the row's strategy, and the exports pass
    ``use_gradient_checkpointing`` to match it. On real layers peft's own function runs; on meta
    this follows peft 0.21.2 ``utils/other.py`` line by line (the 4-bit stand-ins' packed weights
    are excluded as peft excludes ``Params4bit``).
    """
    meta = next(model.parameters()).device.type == "meta"
    if not meta:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    packed = {id(m.weight) for m in model.modules() if isinstance(m, MetaLinear4bit)}
    for param in model.parameters():
        param.requires_grad = False
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in packed:
            param.data = param.data.to(torch.float32)


def register_lora_layers(lora_config) -> None:
    """Let peft wrap ``MetaLinear4bit`` like it wraps bitsandbytes' ``Linear4bit``."""
    lora_config._register_custom_module({MetaLinear4bit: meta_lora_layer()})


def quantized_storage(model: nn.Module) -> dict[str, int]:
    """``quantized_params`` (values stored in 4 bits) and ``quantized_bytes`` (their packed
    weights + quantization state, exact bytes); empty when nothing is quantized."""
    params = nbytes = 0
    for module in model.modules():
        if not is_quantized(module):
            continue
        params += module.in_features * module.out_features
        nbytes += module.weight.untyped_storage().nbytes()
        nbytes += sum(
            b.untyped_storage().nbytes()
            for name, b in module.named_buffers(recurse=False)
            if name.startswith("weight_")
        )
    return {"quantized_params": params, "quantized_bytes": nbytes} if params else {}


def load_transients(
    model: nn.Module,
) -> tuple[dict[int, tuple[int, tuple[int, ...]]], dict[int, int]]:
    """What loading a QLoRA model with transformers puts on the device besides its storages.

    Returns ``(staged, upcast)`` (allocator.device_memory.LoadPlan): for each 4-bit weight, its
    packed bytes -> (bytes of the full-precision tensor the quantizer reads, ``O × D`` in the
    dtype it was quantized from; the sizes of its quantization state, in registration order),
    as bitsandbytes 0.50 ``Params4bit._quantize`` makes them on the device the tensor was
    materialized on; and for each frozen fp32 parameter that was fp16/bf16 when loaded (peft's
    ``prepare_model_for_kbit_training`` cast, `prepare_for_kbit_training`), fp32 bytes -> bytes
    as loaded. Both keyed by size: the caller matches them against a trace's storages.
    """
    staged: dict[int, tuple[int, tuple[int, ...]]] = {}
    load_dtype = None
    for module in model.modules():
        if not isinstance(module, MetaLinear4bit):
            continue
        load_dtype = load_dtype or module.weight_dtype
        full = module.out_features * module.in_features * module.weight_dtype.itemsize
        state = tuple(b.untyped_storage().nbytes() for b in module.buffers(recurse=False))
        staged[module.weight.untyped_storage().nbytes()] = (full, state)
    upcast: dict[int, int] = {}
    if load_dtype in (torch.float16, torch.bfloat16):
        packed = {id(m.weight) for m in model.modules() if isinstance(m, MetaLinear4bit)}
        for param in model.parameters():
            if id(param) in packed or param.requires_grad or param.dtype != torch.float32:
                continue
            upcast[param.untyped_storage().nbytes()] = param.numel() * load_dtype.itemsize
    return staged, upcast
