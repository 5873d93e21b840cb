"""Dropout on meta tensors saves CUDA's bool mask: the mode itself, then whole estimates of
tiny GPT-2 / RoBERTa / BERT models against a count of what the CUDA path saves, derived from
shapes, and against the cpu backend minus exactly the masks' difference."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, GPT2Config, RobertaConfig

from velora_cli.emulation.dropout import MetaCudaDropout, fused_on_cuda
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.accounting import SavedTensorCounter
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import StepSpec, Strategy

BATCH, SEQ = 2, 32  # SEQ a multiple of 32: the efficient kernel's logsumexp has no padding
LAYERS, HIDDEN, HEADS, VOCAB = 2, 64, 4, 128
# The memory-efficient kernel's Philox seed and offset: 8 + 8 bytes per call that a GPU keeps
# on the host and the meta kernel on "meta" (emulation/attention.py documents it). The CPU flash
# kernel keeps no rng state.
EFFICIENT_PHILOX_BYTES = 16


def saved_tensors(fn):
    """(dtype, numel) of every tensor saved for backward while ``fn()`` runs."""
    out = []

    def pack(t):
        out.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


# -- the mode ------------------------------------------------------------------------------------


def test_fused_on_cuda_mirrors_is_fused_kernel_acceptable():
    x = torch.empty(4, 8, device="meta")
    assert fused_on_cuda(x, 0.1, True)
    assert not fused_on_cuda(x, 0.0, True)  # p == 0: dropout returns its input
    assert not fused_on_cuda(x, 1.0, True)  # p == 1: multiply by a zero scalar
    assert not fused_on_cuda(x, 0.1, False)  # eval
    assert not fused_on_cuda(x, 0.1, True, inplace=True)  # dropout_ is never fused
    assert not fused_on_cuda(torch.empty(0, 8, device="meta"), 0.1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_dropout_saves_a_bool_mask_instead_of_noise(dtype):
    x = torch.empty(4, 8, device="meta", dtype=dtype, requires_grad=True)
    assert saved_tensors(lambda: F.dropout(x, 0.1, True)) == [(dtype, 32)]  # meta's noise
    with MetaCudaDropout():
        assert saved_tensors(lambda: F.dropout(x, 0.1, True)) == [(torch.bool, 32)]
        assert saved_tensors(lambda: torch.dropout(x, 0.1, True)) == [(torch.bool, 32)]
        assert saved_tensors(lambda: torch.nn.Dropout(0.1)(x)) == [(torch.bool, 32)]
        y = F.dropout(x, 0.1, True)
        assert (y.shape, y.dtype, y.grad_fn.name()) == (x.shape, dtype, "NativeDropoutBackward0")
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_meta_dropout_keeps_what_cuda_does_not_fuse():
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    with MetaCudaDropout():
        assert F.dropout(x, 0.1, training=False) is x
        assert F.dropout(x, 0.0, training=True).grad_fn is None  # returned as is
        # in-place, feature and alpha dropout run _dropout_impl on CUDA too: a noise tensor
        assert saved_tensors(lambda: F.dropout(x.clone(), 0.1, True, inplace=True)) == [
            (torch.float32, 32)
        ]
        assert saved_tensors(lambda: F.alpha_dropout(x, 0.1, True))[0][0] == torch.float32
        cpu = torch.ones(4, 8, requires_grad=True)
        assert saved_tensors(lambda: F.dropout(cpu, 0.1, True)) == [(torch.float32, 32)]


def test_every_dropout_of_a_classifier_with_eager_attention_saves_bool():
    """Hidden, attention-probability (eager attention) and classifier-head dropouts."""
    from transformers import RobertaForSequenceClassification

    config = RobertaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ + 8,
        num_labels=3,
        attn_implementation="eager",
    )
    with torch.device("meta"):
        model = RobertaForSequenceClassification(config).train()
    ids = torch.empty(BATCH, SEQ, dtype=torch.long, device="meta")

    def count(mode):
        counter = SavedTensorCounter(model)
        with mode, counter:
            model(input_ids=ids)  # no mask: a meta mask cannot be read
        return counter.result.total_bytes

    tokens = BATCH * SEQ * HIDDEN
    sites = {
        "embeddings": tokens,
        "attention probabilities": LAYERS * BATCH * HEADS * SEQ * SEQ,
        "attention output": LAYERS * tokens,
        "layer output": LAYERS * tokens,
        "classifier head (2 dropouts of the <s> features)": 2 * BATCH * HIDDEN,
    }
    noise, masks = count(contextlib.nullcontext()), count(MetaCudaDropout())
    assert noise - masks == sum(sites.values()) * (4 - 1), sites


# -- whole estimates ----------------------------------------------------------------------------


def _gpt2(tmp_path, attn_p: float):
    GPT2Config(
        n_layer=LAYERS,
        n_embd=HIDDEN,
        n_head=HEADS,
        vocab_size=VOCAB,
        n_positions=64,
        attn_pdrop=attn_p,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        bos_token_id=0,
        eos_token_id=0,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def _encoder(tmp_path, kind: str, attn_p: float):
    config = {"roberta": RobertaConfig, "bert": BertConfig}[kind]
    config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ + 8,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=attn_p,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def _layer_norm(tokens: int, nbytes: int) -> int:
    # its input plus fp32 mean and rstd (layer_norm_cuda allocates them in the accumulate type)
    return tokens * nbytes + 2 * (tokens // HIDDEN) * 4


def _attention(dtype: str) -> int:
    """One GPU SDPA call with dropout: q, k, v, out, logsumexp, rng state; no mask (Philox)."""
    tokens = BATCH * SEQ * HIDDEN
    if dtype == "fp32":  # memory-efficient kernel; logsumexp rows padded to 32
        lse = BATCH * HEADS * (-(-SEQ // 32) * 32) * 4
        return 4 * tokens * 4 + lse + EFFICIENT_PHILOX_BYTES
    # flash: logsumexp (B, H, N) fp32, rng state uint64[2] + an 8-byte scalar, on the GPU
    return 4 * tokens * 2 + BATCH * HEADS * SEQ * 4 + 16 + 8


def gpt2_cuda_saved_bytes(dtype: str) -> int:
    """What GPT2LMHeadModel (transformers 5) saves for backward on a GPU, from shapes."""
    s = {"fp32": 4, "bf16": 2}[dtype]
    rows = BATCH * SEQ
    hidden, inner = rows * HIDDEN, rows * 4 * HIDDEN  # elements of (B, N, D), (B, N, 4D)
    mask = hidden  # bool: 1 byte per element
    layer = (
        _layer_norm(hidden, s)  # ln_1
        + hidden * s  # c_attn's input (ln_1's output)
        + _attention(dtype)  # q, k, v are views of c_attn's output; c_proj's input is out's
        + mask  # resid_dropout
        + _layer_norm(hidden, s)  # ln_2
        + hidden * s  # c_fc's input
        + 4 * inner * s  # gelu_new in Python ops: x, tanh(...), 0.5 * x, 1 + tanh(...)
        + inner * s  # c_proj's input
        + mask  # mlp dropout
    )
    return (
        rows * 8  # input_ids (wte)
        + SEQ * 8  # position_ids (1, N) (wpe)
        + mask  # embd dropout
        + LAYERS * layer
        + _layer_norm(hidden, s)  # ln_f
        + hidden * s  # lm_head's input
        + rows * VOCAB * 4  # fp32 log-probabilities (logits.float() before the loss)
        + rows * 8  # shifted labels (a contiguous copy)
        + 4  # nll_loss's total weight
    )


def roberta_cuda_saved_bytes() -> int:
    """What RobertaForMaskedLM (transformers 5, fp32) saves for backward on a GPU, from shapes."""
    rows = BATCH * SEQ
    hidden, inner = rows * HIDDEN, rows * 128
    mask = hidden
    layer = (
        hidden * 4  # query/key/value's shared input
        + _attention("fp32")  # separate q, k, v; attention.output.dense's input is out's
        + mask  # attention.output.dropout
        + _layer_norm(hidden, 4)
        + hidden * 4  # intermediate.dense's input
        + inner * 4  # gelu's input
        + inner * 4  # output.dense's input
        + mask  # output.dropout
        + _layer_norm(hidden, 4)
    )
    return (
        3 * rows * 8  # input_ids, position_ids, token_type_ids (embedding lookups)
        + _layer_norm(hidden, 4)
        + mask  # embeddings.dropout
        + LAYERS * layer
        + 3 * hidden * 4  # lm_head: dense's input, gelu's input, decoder's input
        + _layer_norm(hidden, 4)  # lm_head.layer_norm
        + rows * VOCAB * 4  # log-probabilities; labels are input_ids' storage
        + 4
    )


def _dropout_sites() -> int:
    """Elements dropped out per step in these models: embeddings + 2 per layer, all (B, N, D)."""
    return (1 + 2 * LAYERS) * BATCH * SEQ * HIDDEN


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpt2_estimate_counts_what_cuda_saves(tmp_path, dtype):
    spec = StepSpec(model=_gpt2(tmp_path, attn_p=0.1), batch_size=BATCH, seq_len=SEQ, dtype=dtype)
    row = EstimateBackend().measure(spec)
    assert row["status"] == "ok", row.get("error")
    assert row["activation_bytes"] == gpt2_cuda_saved_bytes(dtype)


def test_roberta_estimate_counts_what_cuda_saves(tmp_path):
    spec = StepSpec(model=_encoder(tmp_path, "roberta", 0.1), batch_size=BATCH, seq_len=SEQ)
    row = EstimateBackend().measure(spec)
    assert row["status"] == "ok", row.get("error")
    assert row["activation_bytes"] == roberta_cuda_saved_bytes()


@pytest.mark.parametrize("kind", ["gpt2", "roberta", "bert"])
def test_estimate_is_cpu_minus_the_mask_difference(tmp_path, kind):
    """Attention dropout 0 here: with dropout, CPU SDPA takes its math path (N x N), a
    difference of attention kernels, not of dropout masks (and the cpu backend warns)."""
    path = _gpt2(tmp_path, 0.0) if kind == "gpt2" else _encoder(tmp_path, kind, 0.0)
    spec = StepSpec(model=path, batch_size=BATCH, seq_len=SEQ)
    est = EstimateBackend().measure(spec)
    cpu = CpuBackend(warmup=1, steps=1).measure(spec)
    assert est["status"] == cpu["status"] == "ok"
    noise_minus_mask = _dropout_sites() * (4 - 1)  # fp32 noise vs bool mask
    assert est["activation_bytes"] == (
        cpu["activation_bytes"] - noise_minus_mask + LAYERS * EFFICIENT_PHILOX_BYTES
    )


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_checkpoint_recomputation_draws_bool_masks_too(tmp_path, amp):
    """Recomputed forwards run outside the step's modes: without the emulation restored there,
    checkpoint finds a float noise where the forward saved a bool mask and refuses."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from velora_cli.emulation.attention import register_estimate_attention
    from velora_cli.emulation.step import cuda_emulation
    from velora_cli.measure.train_step import prepare, train_step

    spec = StepSpec(
        model=_gpt2(tmp_path, 0.1),
        batch_size=BATCH,
        seq_len=SEQ,
        amp=amp,
        strategy=Strategy(gc=True),
    )
    assert EstimateBackend().measure(spec)["status"] == "ok"

    class BackwardOps(TorchDispatchMode):
        ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch._C._current_graph_task_id() != -1:  # inside backward
                self.ops.add(func.__name__)
            return func(*args, **(kwargs or {}))

    prepared = prepare(spec, "meta", attn_implementation=register_estimate_attention())
    with cuda_emulation(amp), BackwardOps() as log:
        train_step(prepared)
    assert "native_dropout.default" in log.ops  # the recomputed layers' dropouts
    assert "bernoulli_.float" not in log.ops
