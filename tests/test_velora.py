"""The VeLoRA layer against slow references: exact where the maths says exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.methods.velora import (
    SubTokenSizeError,
    VeLoRAConv1D,
    VeLoRAFunction,
    VeLoRALinear,
    reference_weight_grad,
    resolve_sub_token_size,
)


def _layer(d_in, d_out, bias=True, dtype=torch.float64, m=8, init="random"):
    torch.manual_seed(1)
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    return lin, VeLoRALinear.from_linear(lin, sub_token_size=m, init=init)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "shape,d_out,m",
    [((7, 64), 48, 8), ((2, 5, 96), 32, 12), ((2, 3, 4, 60), 20, 5), ((9, 32), 3, 32)],
)
def test_factorized_weight_grad_equals_naive_reconstruction(shape, d_out, m, bias):
    _, layer = _layer(shape[-1], d_out, bias=bias, m=m)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    naive = reference_weight_grad(x.detach(), grad_out, layer.v.double())
    rel = (layer.weight.grad - naive).abs().max() / naive.abs().max()
    assert rel < 1e-10, f"factorized vs naive weight grad: max relative difference {rel:.3e}"
    # grad_input and grad_bias are exact (they never use x)
    w = layer.weight.detach()
    torch.testing.assert_close(x.grad, (grad_out @ w), rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, grad_out.reshape(-1, d_out).sum(0))


def test_forward_is_exactly_f_linear():
    lin, layer = _layer(64, 32, dtype=torch.float32)
    x = torch.randn(4, 6, 64, requires_grad=True)
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))


def test_inputs_on_span_of_v_give_exact_gradients():
    d, m = 48, 6
    torch.manual_seed(0)
    plain = nn.Linear(d, 16).double()
    layer = VeLoRALinear.from_linear(nn.Linear(d, 16).double(), sub_token_size=m, init="random")
    layer.load_state_dict({**plain.state_dict(), "v": layer.v}, strict=True)
    # every sub-token is a multiple of v: x = c ⊗ v
    coeffs = torch.randn(5, 3, d // m, dtype=torch.float64)
    x = (coeffs.unsqueeze(-1) * layer.v.double()).reshape(5, 3, d)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(5, 3, 16, dtype=torch.float64)
    plain(x1).backward(g)
    layer(x2).backward(g)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)


def test_saves_one_value_per_sub_token_and_never_the_input():
    _, layer = _layer(64, 32, dtype=torch.float32, m=16)
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    params = {layer.weight.untyped_storage()._cdata, layer.v.untyped_storage()._cdata}
    new = [t for t in saved if t.untyped_storage()._cdata not in params]
    assert [t.numel() for t in new] == [x.numel() // 16]
    assert all(t.untyped_storage()._cdata != x.untyped_storage()._cdata for t in saved)
    assert type(out.grad_fn).__name__ == "VeLoRAFunctionBackward"


def test_non_contiguous_input():
    _, layer = _layer(64, 32, m=8)
    base = torch.randn(64, 10, dtype=torch.float64)
    x = base.t().requires_grad_()  # (10, 64), non-contiguous
    assert not x.is_contiguous()
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    naive = reference_weight_grad(x.detach().contiguous(), g, layer.v.double())
    torch.testing.assert_close(layer.weight.grad, naive, rtol=1e-10, atol=1e-12)


def test_eval_and_no_grad_are_plain_linear():
    _, layer = _layer(32, 16, dtype=torch.float32)
    x = torch.randn(3, 32, requires_grad=True)
    layer.eval()
    assert "VeLoRA" not in type(layer(x).grad_fn).__name__
    layer.train()
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_frozen_weight_gets_no_weight_grad():
    _, layer = _layer(32, 16, dtype=torch.float32)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None


def test_needs_input_grad_is_respected():
    _, layer = _layer(32, 16, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)  # no grad wanted for x
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is None


def test_batch_average_once_sets_v_from_the_first_batch_then_freezes():
    _, layer = _layer(32, 8, dtype=torch.float32, m=4, init="batch_average_once")
    assert torch.count_nonzero(layer.v) == 0
    x1 = torch.randn(5, 32) + 1.0
    layer(x1.requires_grad_()).sum().backward()
    expected = F.normalize(x1.detach().reshape(-1, 4).mean(0), dim=0)
    torch.testing.assert_close(layer.v, expected)
    layer(torch.randn(5, 32).requires_grad_()).sum().backward()
    torch.testing.assert_close(layer.v, expected)  # frozen after the first batch


def test_batch_average_recomputes_every_step():
    _, layer = _layer(32, 8, dtype=torch.float32, m=4, init="batch_average")
    x1, x2 = torch.randn(5, 32) + 1.0, torch.randn(5, 32) - 2.0
    layer(x1.requires_grad_()).sum().backward()
    v1 = layer.v.clone()
    layer(x2.requires_grad_()).sum().backward()
    torch.testing.assert_close(layer.v, F.normalize(x2.detach().reshape(-1, 4).mean(0), dim=0))
    assert not torch.allclose(v1, layer.v)


def test_random_init_is_seeded_and_unit_norm():
    a = VeLoRALinear.from_linear(nn.Linear(32, 8), sub_token_size=8, init="random", seed=3)
    b = VeLoRALinear.from_linear(nn.Linear(32, 8), sub_token_size=8, init="random", seed=3)
    c = VeLoRALinear.from_linear(nn.Linear(32, 8), sub_token_size=8, init="random", seed=4)
    assert torch.equal(a.v, b.v) and not torch.equal(a.v, c.v)
    assert torch.linalg.vector_norm(a.v).item() == pytest.approx(1.0, abs=1e-6)


def test_state_dict_round_trip_keeps_v():
    _, trained = _layer(32, 8, dtype=torch.float32, m=4, init="batch_average_once")
    trained(torch.randn(5, 32).requires_grad_()).sum().backward()
    _, fresh = _layer(32, 8, dtype=torch.float32, m=4, init="batch_average_once")
    fresh.load_state_dict(trained.state_dict())
    fresh(torch.randn(5, 32).requires_grad_()).sum().backward()  # must not re-initialize v
    torch.testing.assert_close(fresh.v, trained.v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = VeLoRALinear.from_linear(nn.Linear(64, 32), sub_token_size=8, init="random")
    layer.load_state_dict({**lin.state_dict(), "v": layer.v})
    x = torch.randn(4, 10, 64)
    with torch.autocast("cpu", dtype=dtype):
        expected = lin(x)
        out = layer(x.clone().requires_grad_())
    assert out.dtype == dtype and torch.equal(out, expected)
    g = torch.randn_like(out)
    out.backward(g)
    assert layer.weight.grad.dtype == torch.float32  # reaches the fp32 master weight
    naive = reference_weight_grad(x.to(dtype).double(), g.double(), layer.v.to(dtype).double())
    rel = (layer.weight.grad.double() - naive).abs().max() / naive.abs().max()
    assert rel < 2e-2, f"half-precision weight grad off by {rel:.3e} relative"


def test_half_precision_accumulates_in_fp32():
    """T large enough that bf16 accumulation would visibly drift; the chunked fp32 path must not."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16).bfloat16()
    layer = VeLoRALinear.from_linear(lin, sub_token_size=8, init="random")
    x = torch.randn(20000, 64).bfloat16().requires_grad_()
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    naive = reference_weight_grad(x.detach().double(), g.double(), layer.v.bfloat16().double())
    # compress() rounds z to bf16, so compare against z rounded the same way
    z = (x.detach().reshape(-1, 8, 8) @ layer.v.bfloat16()).double()
    exact = torch.einsum("to,tk->ok", g.double(), z).unsqueeze(-1) * layer.v.bfloat16().double()
    exact = exact.reshape(16, 64)
    rel = (layer.weight.grad.double() - exact).abs().max() / exact.abs().max()
    assert rel < 1e-2, f"bf16 weight grad vs fp64 accumulation: {rel:.3e}"
    assert naive.shape == exact.shape


def test_non_reentrant_checkpointing_gives_the_same_gradients():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).double()
    net[2] = VeLoRALinear.from_linear(net[2], sub_token_size=8, init="batch_average_once")
    twin = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).double()
    twin[2] = VeLoRALinear.from_linear(twin[2], sub_token_size=8, init="batch_average_once")
    twin.load_state_dict(net.state_dict())
    x = torch.randn(6, 32, dtype=torch.float64)
    net(x.clone().requires_grad_()).sum().backward()
    checkpoint(twin, x.clone().requires_grad_(), use_reentrant=False).sum().backward()
    torch.testing.assert_close(twin[2].v, net[2].v)
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_gpt2_conv1d_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 48).double()  # weight (48, 24): transposed
    layer = VeLoRAConv1D.from_conv1d(conv, sub_token_size=6, init="random")
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    assert torch.equal(layer(x), conv(x))
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    naive = reference_weight_grad(x.detach(), g, layer.v, transposed=True)
    torch.testing.assert_close(layer.weight.grad, naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, g @ conv.weight.detach().t())


def test_bad_sub_token_size_names_the_layer_and_valid_sizes():
    with pytest.raises(SubTokenSizeError) as err:
        resolve_sub_token_size(96, sub_token_size=7, layer="model.layers.0.mlp.down_proj")
    msg = str(err.value)
    assert "model.layers.0.mlp.down_proj" in msg and "in_features=96" in msg
    assert "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96" in msg
    with pytest.raises(SubTokenSizeError, match="num_groups=5"):
        resolve_sub_token_size(96, num_groups=5, layer="x")
    assert resolve_sub_token_size(96, num_groups=32) == 3


def test_function_saves_nothing_for_weight_grad_when_weight_frozen():
    x = torch.randn(4, 16, requires_grad=True)
    w, v = torch.randn(8, 16), torch.ones(4) / 2
    with SavedTensorCounter(nn.Module(), exclude=[w, v]) as counter:
        VeLoRAFunction.apply(x, w, None, v, False)
    assert counter.result.total_bytes == 0
