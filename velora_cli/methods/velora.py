"""The VeLoRA linear layer: exact forward, rank-1 sub-token compression of the saved input.

VeLoRA (NeurIPS 2024, §3.1, Algorithm 1) keeps a linear layer's forward exactly as it is and
changes only what is saved for backward. The input x (..., D) is grouped into sub-tokens of size M,
each projected onto one fixed unit vector v (M,), and only those projections are kept:

    group:       x  -> X  (T, K, M)       T = numel(x) / D tokens, K = D / M sub-tokens per token
    compress:    z  = X @ v   (T, K)      one number per sub-token: numel(x) / M values
    reconstruct: x̂ = z ⊗ v    (T, K, M)   only implied: never built

The backward pass is exact for the input and bias gradients (they do not use x). The weight
gradient uses x̂ in a factorized form: with g (T, O) the output gradient,

    grad_W[o, k*M + m] = v[m] * (gᵀ z)[o, k]

which equals gᵀ x̂ to the last bit of float64, costs T·O·K multiply-adds instead of T·O·D (M times
fewer) and allocates no (T, D) tensor.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STRATEGIES = ("batch_average_once", "batch_average", "random")

# Rows of g processed at once when fp32 accumulation must be done by upcasting (CPU has no
# mm(out_dtype=float32) for half inputs): bounds the fp32 temporary to _CHUNK_ROWS × O values.
_CHUNK_ROWS = 4096


class SubTokenSizeError(ValueError):
    """M (or the number of groups) does not divide a layer's in_features."""


def divisors(n: int) -> list[int]:
    """Every positive divisor of n, ascending: the valid sub-token sizes of an n-wide layer."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def resolve_sub_token_size(
    in_features: int,
    *,
    sub_token_size: int | None = None,
    num_groups: int | None = None,
    layer: str = "layer",
) -> int:
    """The sub-token size M for a layer of width ``in_features``.

    Args:
        in_features: the layer's input width D.
        sub_token_size: M itself, or None.
        num_groups: K = D / M, or None. Exactly one of the two must be given.
        layer: the layer's qualified name, for the error message.

    Returns:
        M, a divisor of in_features.

    Raises:
        SubTokenSizeError: M or K does not divide in_features (the message names the layer, its
            in_features and the valid sizes), or both/neither were given.
    """
    if (sub_token_size is None) == (num_groups is None):
        raise SubTokenSizeError(f"{layer}: give exactly one of sub_token_size and num_groups")
    valid = divisors(in_features)
    if num_groups is not None:
        if num_groups < 1 or in_features % num_groups:
            raise SubTokenSizeError(
                f"{layer}: num_groups={num_groups} does not divide in_features={in_features}; "
                f"valid numbers of groups: {_short_list(valid)}"
            )
        return in_features // num_groups
    if sub_token_size < 1 or in_features % sub_token_size:
        raise SubTokenSizeError(
            f"{layer}: sub-token size {sub_token_size} does not divide in_features="
            f"{in_features}; valid sub-token sizes: {_short_list(valid)}"
        )
    return sub_token_size


def _short_list(values: list[int], limit: int = 16) -> str:
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit - 3]))
    return f"{head}, ..., {', '.join(map(str, values[-3:]))}"


# --------------------------------------------------------------------------------------------
# The maths: compress, the autograd Function, and the naive reference it is tested against.
# --------------------------------------------------------------------------------------------


def compress(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z = group(x) · v: one value per sub-token, shape (T, D/M), in x's dtype."""
    m = v.numel()
    groups = x.reshape(-1, x.shape[-1] // m, m)  # (T, K, M); copies only if x is not viewable
    return torch.matmul(groups, v.to(x.dtype))  # (T, K)


def _weight_grad_factors(g2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """G = gᵀ z, shape (O, K), accumulated and returned in float32 (float64 stays float64)."""
    if g2.dtype in (torch.float32, torch.float64):
        return g2.t().mm(z.to(g2.dtype))
    if g2.device.type in ("cuda", "meta"):
        # Half inputs, fp32 accumulation and fp32 output in one GEMM, no upcast copy of g.
        return torch.mm(g2.t(), z.to(g2.dtype), out_dtype=torch.float32)
    out = torch.zeros(g2.shape[1], z.shape[1], dtype=torch.float32, device=g2.device)
    for start in range(0, g2.shape[0], _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        out.addmm_(g2[rows].t().float(), z[rows].float())
    return out


class VeLoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b for a transposed weight), saving z = group(x)·v instead of x.

    Inputs: x (..., D); weight (O, D), or (D, O) when ``transposed`` (GPT-2's Conv1D); bias (O,)
    or None; v (M,) a unit vector. Saved for backward: z (numel(x)/M values), and references to
    weight and v (parameters and buffers, no new memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, v, transposed):
        if transposed:
            # Conv1D's own formula, so the output is bit-identical to the module it replaces.
            out2 = (
                torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
                if bias is not None
                else (x.reshape(-1, x.shape[-1]).mm(weight))
            )
            out = out2.view(*x.shape[:-1], weight.shape[1])
        else:
            out = F.linear(x, weight, bias)
        z = compress(x, v) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(z, weight, v)
        ctx.transposed = transposed
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, v = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (T, O)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_in = weight.t() if ctx.transposed else weight  # (O, D)
            grad_x = g2.mm(w_in.to(g2.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            factors = _weight_grad_factors(g2, z)  # (O, K) fp32
            o, k = factors.shape
            m = v.numel()
            if ctx.transposed:
                # weight is (D, O): grad[k*M + m, o] = v[m] * G[o, k]
                grad_w = torch.empty(k, m, o, dtype=weight.dtype, device=weight.device)
                torch.mul(factors.t().unsqueeze(1), v.to(factors.dtype).view(1, m, 1), out=grad_w)
                grad_w = grad_w.view(k * m, o)
            else:
                grad_w = torch.empty(o, k, m, dtype=weight.dtype, device=weight.device)
                torch.mul(factors.unsqueeze(-1), v.to(factors.dtype).view(1, 1, m), out=grad_w)
                grad_w = grad_w.view(o, k * m)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(
                0, dtype=torch.float32 if g2.dtype in (torch.float16, torch.bfloat16) else g2.dtype
            ).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None


def reference_weight_grad(
    x: torch.Tensor, grad_out: torch.Tensor, v: torch.Tensor, transposed: bool = False
) -> torch.Tensor:
    """The slow path: build x̂ = z ⊗ v explicitly, then grad_W = gᵀ x̂. For tests and benchmarks."""
    m = v.numel()
    z = compress(x, v)  # (T, K)
    x_hat = (z.unsqueeze(-1) * v.to(z.dtype)).reshape(z.shape[0], -1)  # (T, D)
    grad = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x_hat)  # (O, D)
    assert x_hat.shape[1] == x.shape[-1] and m * z.shape[1] == x.shape[-1]
    return grad.t() if transposed else grad


# Autocast ignores meta tensors; the estimate backend emulates it (emulation/amp.py) and pushes its
# dtype here so VeLoRA layers cast exactly as they would under real autocast on a GPU.
_emulated_autocast: list[torch.dtype] = []


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a linear in on ``device_type``, or None when it is off."""
    if device_type == "meta":  # no autocast backend for meta: only the emulation applies
        return _emulated_autocast[-1] if _emulated_autocast else None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class _VeLoRAMixin:
    """State and behaviour shared by the Linear and Conv1D variants: v, its init, the dispatch.

    ``v`` is a buffer (so a trained model's state_dict records it). With ``batch_average_once``
    it starts at zero and is set from the first training batch: v = normalize(mean of all
    sub-tokens), then frozen (paper §5.3, "fixed average"). ``batch_average`` recomputes it at
    every training forward; ``random`` draws it once, seeded, at construction.
    """

    sub_token_size: int
    init: str
    transposed: bool

    def _setup_velora(self, in_features: int, sub_token_size: int, init: str, seed: int) -> None:
        if init not in INIT_STRATEGIES:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        if in_features % sub_token_size:
            raise SubTokenSizeError(
                f"sub-token size {sub_token_size} does not divide in_features={in_features}"
            )
        self.sub_token_size = sub_token_size
        self.init = init
        self.seed = seed
        device = self.weight.device
        # v is kept in fp32 for half-precision models (it is M numbers), in fp64 for fp64 ones.
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        if init == "random":
            gen = torch.Generator().manual_seed(seed)
            v = F.normalize(torch.randn(sub_token_size, generator=gen, dtype=torch.float64), dim=0)
            self.register_buffer("v", v.to(device=device, dtype=dtype))
            self._v_ready = True
        else:
            self.register_buffer("v", torch.zeros(sub_token_size, dtype=dtype, device=device))
            self._v_ready = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "v")
        # A trained model's v is kept, not re-initialized; a zero v (saved before the first
        # training batch) is no unit vector and still waits for its batch.
        if loaded is not None and (loaded.device.type == "meta" or bool(loaded.any())):
            self._v_ready = True

    @torch.no_grad()
    def _batch_average(self, x: torch.Tensor) -> torch.Tensor:
        """normalize(mean of every sub-token of x), in v's dtype (fp32 or fp64); uniform if the
        mean vanishes."""
        from torch._subclasses.fake_tensor import is_fake

        mean = x.detach().reshape(-1, self.sub_token_size).to(self.v.dtype).mean(0)  # (M,)
        # Meta and fake tensors (the per-rank estimate, velora_cli.parallel) have no values.
        has_values = mean.device.type != "meta" and not is_fake(mean)
        if has_values and not bool(torch.linalg.vector_norm(mean) > 1e-12):
            mean = torch.ones_like(mean)
        return F.normalize(mean, dim=0)

    def _broadcast_v(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.v, src=0)  # every rank projects onto rank 0's v

    def _current_v(self, x: torch.Tensor) -> torch.Tensor:
        if self.init == "batch_average":
            # A new tensor each step: a v saved by an earlier, not yet back-propagated forward
            # stays valid (no in-place write under its version counter).
            self.v = self._batch_average(x).to(self.v.dtype)
            self._broadcast_v()
        elif not self._v_ready:
            self.v.copy_(self._batch_average(x))
            self._broadcast_v()
            self._v_ready = True
        return self.v

    def _compressing(self, x: torch.Tensor) -> bool:
        """Compress only when a weight gradient will be formed from this forward."""
        return self.training and torch.is_grad_enabled() and self.weight.requires_grad

    def _velora_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        dtype = autocast_dtype(device_type)
        if dtype is None:
            return VeLoRAFunction.apply(x, weight, bias, self._current_v(x), self.transposed)
        # Cast as autocast would for a linear, then run the Function with autocast off so the
        # saved z and the backward see one dtype. The casts are differentiable: gradients reach
        # the fp32 master weights. Like a plain autocast linear, the half weight copy is saved.
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        real = device_type != "meta"
        with torch.autocast(device_type, enabled=False) if real else contextlib.nullcontext():
            return VeLoRAFunction.apply(x, weight, bias, self._current_v(x), self.transposed)

    def _velora_repr(self) -> str:
        return f"sub_token_size={self.sub_token_size}, init={self.init}"


class VeLoRALinear(_VeLoRAMixin, nn.Linear):
    """An ``nn.Linear`` whose saved input is compressed to one value per sub-token.

    Built from an existing layer, reusing its parameters (no copy, same state_dict keys + ``v``):

        >>> layer = nn.Linear(4096, 11008)
        >>> velora = VeLoRALinear.from_linear(layer, sub_token_size=128)
        >>> velora.weight is layer.weight
        True

    In eval mode, under no_grad, or with a frozen weight it is a plain linear.
    """

    transposed = False

    def __init__(self, *args, **kwargs):
        raise TypeError("build a VeLoRALinear with VeLoRALinear.from_linear(layer, ...)")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        sub_token_size: int,
        init: str = "batch_average_once",
        seed: int = 0,
    ) -> VeLoRALinear:
        """Wrap ``linear`` (its parameters are shared, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.training = linear.training
        self._setup_velora(linear.in_features, sub_token_size, init, seed)
        return self

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the same parameters."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        linear.training = self.training
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._compressing(x):
            return F.linear(x, self.weight, self.bias)
        return self._velora_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._velora_repr()}"


class VeLoRAConv1D(_VeLoRAMixin, nn.Module):
    """GPT-2's ``Conv1D`` (weight stored transposed, (in, out)) with VeLoRA compression."""

    transposed = True

    @classmethod
    def from_conv1d(
        cls, conv, *, sub_token_size: int, init: str = "batch_average_once", seed: int = 0
    ) -> VeLoRAConv1D:
        """Wrap a transformers ``Conv1D`` (its parameters are shared, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.nf = conv.nf
        self.nx = conv.weight.shape[0]
        self.weight = conv.weight
        self.bias = conv.bias
        self.training = conv.training
        self._setup_velora(self.nx, sub_token_size, init, seed)
        return self

    @property
    def in_features(self) -> int:
        return self.nx

    def to_conv1d(self):
        """A plain transformers Conv1D holding the same parameters."""
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            conv = Conv1D(self.nf, self.nx)
        conv.weight = self.weight
        conv.bias = self.bias
        conv.training = self.training
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._compressing(x):
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.nf)
        return self._velora_forward(x)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._velora_repr()}"


def is_velora(module: nn.Module) -> bool:
    """True for a module this package wrapped."""
    return isinstance(module, _VeLoRAMixin)
