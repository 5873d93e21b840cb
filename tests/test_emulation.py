"""The estimate's emulation of CUDA as one context: every mode active, autocast casting first."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velora_cli.emulation.step import cuda_emulation


def test_autocast_casts_before_the_kernel_choices_see_the_call():
    q = torch.empty(2, 4, 16, 8, device="meta", requires_grad=True)  # fp32 under bf16 autocast
    w = torch.empty(8, 8, device="meta", requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with cuda_emulation("bf16"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = F.linear(q, w)
        assert h.dtype == torch.bfloat16  # autocast's lower-precision list
        assert F.dropout(h, 0.1, True).grad_fn.name() == "NativeDropoutBackward0"
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True)
        # SDPA got bf16 inputs from autocast; the math replay upcast them and cast back
        assert out.dtype == torch.bfloat16
        assert F.rms_norm(h, (8,)).grad_fn.name() == "FusedRmsNormMetaBackward"
    assert torch.bool in saved  # the dropout masks
    assert torch.float32 not in saved[:2]  # linear saved its bf16 casts


def test_without_amp_nothing_is_cast():
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    with cuda_emulation():
        assert F.linear(x, torch.empty(8, 8, device="meta")).dtype == torch.float32
        assert F.dropout(x, 0.1, True).grad_fn.name() == "NativeDropoutBackward0"
