"""`--attn` and masked attention: the kernel a GPU picks, what it saves, checked against real CPU
steps where the CPU stores the same thing and against counts from the kernels' source where only
a GPU kernel decides (issue 24 part 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from velora_cli.emulation.attention import (
    flash_attention_saved_bytes,
    gpu_attention_kernel,
    register_estimate_attention,
    target_gpu,
    velora_estimate_attention,
)
from velora_cli.emulation.step import cuda_emulation
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec

LAYERS, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 4, 2, 16, 16
BATCH, SEQ = 2, 64  # SEQ a multiple of 32: the efficient kernel's logsumexp rows are not padded


def mistral_config(**overrides) -> MistralConfig:
    values = dict(
        vocab_size=128,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        sliding_window=WINDOW,  # < SEQ: transformers passes a 4-D mask to SDPA
    )
    return MistralConfig(**{**values, **overrides})


def saved(model, device: str) -> list[torch.Tensor]:
    """Distinct storages autograd saves in one forward, minus the parameters."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    found: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            found.setdefault(t.untyped_storage()._cdata, t)
        return t

    ids = torch.zeros(BATCH, SEQ, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return list(found.values())


def build(attn: str, device: str, dtype, **overrides):
    torch.manual_seed(0)
    with torch.device(device):
        return MistralForCausalLM._from_config(
            mistral_config(**overrides), attn_implementation=attn, dtype=dtype
        )


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# -- which kernel -----------------------------------------------------------------------------


def qkv(dtype, heads=HEADS, kv_heads=HEADS, head_dim=64, grad=True):
    def make(h):
        return torch.empty(1, h, 8, head_dim, dtype=dtype, device="meta", requires_grad=grad)

    return make(heads), make(kv_heads), make(kv_heads)


def test_kernel_follows_the_named_gpu_and_the_mask():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # sm80, half precision, no mask: flash; with a mask: flash refuses (check_for_attn_mask)
    assert gpu_attention_kernel(*qkv(bf16), gpu="a100-80gb") == "flash"
    assert gpu_attention_kernel(*qkv(bf16), has_mask=True, gpu="a100-80gb") == "efficient"
    # sm75 (T4) and sm70 (V100): no flash kernel at all (check_sm_version<sm80, ...>)
    assert gpu_attention_kernel(*qkv(fp16), gpu="t4") == "efficient"
    assert gpu_attention_kernel(*qkv(fp16), gpu="v100-32gb") == "efficient"
    # fp32: the efficient kernel on any GPU
    assert gpu_attention_kernel(*qkv(fp32), gpu="h100") == "efficient"
    # the target set by the estimate is used when no GPU is named
    with target_gpu("t4"):
        assert gpu_attention_kernel(*qkv(fp16)) == "efficient"
    with target_gpu("a100-80gb"):
        assert gpu_attention_kernel(*qkv(fp16)) == "flash"
    # a masked GQA call is repeated to H heads first: the efficient kernel, never math
    assert gpu_attention_kernel(*qkv(fp32, kv_heads=2), has_mask=True, gpu="h100") == "efficient"


def test_one_masked_call_saves_what_the_efficient_kernel_saves():
    """Counts from the source (kernels.md A.2/A.3): transformers' `repeat_kv` copies k and v to H
    heads (no `enable_gqa` with a mask); SDPA converts the bool mask to a dense (B, 1, N, N) one in
    q's dtype (attention.cpp `convert_boolean_attn_mask`); `_scaled_dot_product_efficient_attention`
    saves q, k, v, out, an fp32 logsumexp (B, H, ceil32(N)) (attention.cu, kAlignLSE = 32), its
    two int64 philox scalars and the bias. Never the (B, H, N, N) matrix."""
    batch, heads, kv_heads, seq, head_dim = 2, 8, 2, 40, 32  # 40: lse padded to 64, mask to 40
    q = torch.empty(batch, heads, seq, head_dim, dtype=torch.bfloat16, device="meta")
    k, v = (torch.empty(batch, kv_heads, seq, head_dim, dtype=torch.bfloat16, device="meta")
            for _ in range(2))  # fmt: skip
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.empty(1, 1, seq, seq, dtype=torch.bool, device="meta").expand(batch, 1, seq, seq)
    module = type("M", (torch.nn.Module,), {})()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    found: dict[int, torch.Tensor] = {}

    def pack(t):
        found.setdefault(t.untyped_storage()._cdata, t)
        return t

    with target_gpu("a100-80gb"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        velora_estimate_attention(module, q, k, v, mask)
    per_head = batch * heads * seq * head_dim * 2
    expected = (
        4 * per_head  # q, repeated k, repeated v, out
        + batch * heads * 64 * 4  # logsumexp, rows padded to 32
        + batch * 1 * seq * seq * 2  # the converted bf16 bias (40 % 8 == 0: not padded)
        + 2 * 8  # philox seed and offset, int64 scalars
    )
    assert nbytes(found.values()) == expected
    assert all(t.untyped_storage().nbytes() < batch * heads * seq * seq * 2 for t in found.values())


# -- the estimate against real CPU steps ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sliding_window_meta_saves_what_the_cpu_saves(dtype):
    """With a sliding window shorter than the sequence, the GPU runs the efficient kernel with
    the mask; the CPU flash kernel gets the same mask and saves the same set, except the
    efficient kernel's two int64 philox scalars (8 bytes each, per layer)."""
    name = register_estimate_attention()
    with target_gpu("a100-80gb"):
        cpu = saved(build(name, "cpu", dtype), "cpu")
        with cuda_emulation(None):
            meta = saved(build(name, "meta", dtype), "meta")
    assert nbytes(meta) - nbytes(cpu) == LAYERS * 2 * 8
    # the bias is kept, once per layer; the N x N probabilities of the math path are not
    square = [t for t in meta if t.dim() == 4 and t.shape[-2:] == (SEQ, SEQ)]
    assert len(square) == LAYERS and all(t.shape[1] == HEADS for t in square)  # expanded views
    assert all(t.untyped_storage().nbytes() == BATCH * SEQ * SEQ * dtype.itemsize for t in square)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [WINDOW, None], ids=["window", "causal"])
def test_eager_meta_saves_exactly_what_the_cpu_saves(dtype, window):
    """transformers' eager path runs the same ops on CPU and meta (fp32 softmax of the scores,
    its cast back, a dense mask), so the estimate is checked against the CPU exactly."""
    cpu = saved(build("eager", "cpu", dtype, sliding_window=window), "cpu")
    with cuda_emulation(None):
        meta = saved(build("eager", "meta", dtype, sliding_window=window), "meta")
    assert nbytes(meta) == nbytes(cpu)
    # modeling_mistral.eager_attention_forward: softmax(dtype=fp32) is saved (B, H, N, N) fp32,
    # and its cast to the model dtype is saved by the next matmul (as a (B*H, N, N) view; in
    # fp32 the cast is the softmax output itself)
    squares = [t for t in meta if t.numel() == BATCH * HEADS * SEQ * SEQ]
    fp32_probs = [t for t in squares if t.dtype == torch.float32]
    assert len(fp32_probs) == LAYERS
    assert len(squares) == LAYERS * (1 if dtype == torch.float32 else 2)


def _local_model(tmp_path, **overrides) -> str:
    mistral_config(**overrides).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("attn", ["auto", "eager"])
def test_estimate_row_matches_cpu_tracker(tmp_path, attn):
    """The whole step through both backends: saved activations agree (the efficient kernel's
    philox scalars are the only difference on the SDPA path)."""
    spec = StepSpec(model=_local_model(tmp_path), batch_size=BATCH, seq_len=SEQ, attn=attn)
    cpu = CpuBackend(warmup=0, steps=1).measure(spec)
    estimate = EstimateBackend(gpu="a100-80gb").measure(spec)
    extra = LAYERS * 2 * 8 if attn == "auto" else 0
    assert estimate["activation_bytes"] - cpu["activation_bytes"] == extra


def test_flash_attention_2_needs_no_mask_and_no_repeat(tmp_path):
    """FA2 handles the window and GQA in the kernel (flash_attn_interface.py): per layer it saves
    q, k, v with Hkv heads, out and an fp32 (B, H, N) logsumexp, like torch's flash op."""
    from velora_cli.emulation.implementations import attention_implementation

    name = attention_implementation("flash_attention_2", "meta")
    with cuda_emulation(None):
        fa2 = saved(build(name, "meta", torch.bfloat16), "meta")
        sdpa = saved(build(register_estimate_attention(), "meta", torch.bfloat16), "meta")
    assert not [t for t in fa2 if t.dim() == 4 and t.shape[-2:] == (SEQ, SEQ)]  # no mask, no N x N
    per_call = flash_attention_saved_bytes(BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM, 2, round_to=1)
    q_or_out = BATCH * HEADS * SEQ * HEAD_DIM * 2
    kv = BATCH * KV_HEADS * SEQ * HEAD_DIM * 2
    # the masked SDPA call instead keeps repeated k, v, the bias, a padded-free lse, philox
    masked_call = 4 * q_or_out + BATCH * HEADS * SEQ * 4 + BATCH * SEQ * SEQ * 2 + 16
    assert nbytes(sdpa) - nbytes(fa2) == LAYERS * (masked_call - per_call)
    assert per_call == 2 * q_or_out + 2 * kv + BATCH * HEADS * SEQ * 4 + 16 + 8


def test_flash_attention_2_refusals(tmp_path):
    model = _local_model(tmp_path)
    with pytest.raises(SpecError, match="fp16/bf16"):
        StepSpec(model=model, attn="flash_attention_2")
    with pytest.raises(SpecError, match="choose"):
        StepSpec(model=model, attn="flash")
    spec = StepSpec(model=model, dtype="bf16", batch_size=1, seq_len=8, attn="flash_attention_2")
    with pytest.raises(SpecError, match="CUDA GPU"):
        CpuBackend(warmup=0, steps=1).measure(spec)
    with pytest.raises(SpecError, match="sm80"):
        EstimateBackend(gpu="t4").measure(spec)


def test_attn_is_left_out_of_documents_at_its_default():
    spec = StepSpec(model="llama-tiny")
    assert "attn" not in spec.to_json()
    eager = dataclasses.replace(spec, attn="eager")
    assert eager.to_json()["attn"] == "eager"
    assert StepSpec.from_json(eager.to_json()) == eager
    assert StepSpec.from_json(spec.to_json()) == spec


def test_cli_rejects_an_unknown_attention():
    from typer.testing import CliRunner

    from velora_cli.cli import app

    result = CliRunner().invoke(app, ["profile", "llama-tiny", "--attn", "flash", "--backend",
                                      "estimate"])  # fmt: skip
    assert result.exit_code == 1
    assert "--attn 'flash': choose auto|sdpa|eager|flash_attention_2" in result.output
    assert "Traceback" not in result.output


# -- padding (--padding): the worst padded batch, one pad token -------------------------------------


@pytest.mark.parametrize("attn", ["auto", "eager"])
def test_padded_batches_estimate_matches_cpu_tracker(tmp_path, attn):
    """A padded batch makes transformers build a (B, 1, N, N) mask even without a window; the CPU
    step reads the real padding, the estimate is told (`padded_batches`): the same tensors are
    kept, except the efficient kernel's two int64 philox scalars per layer."""
    model = _local_model(tmp_path, sliding_window=None)
    spec = StepSpec(model=model, batch_size=BATCH, seq_len=SEQ, attn=attn, padding=True)
    cpu = CpuBackend(warmup=0, steps=1).measure(spec)
    estimate = EstimateBackend(gpu="a100-80gb").measure(spec)
    extra = LAYERS * 2 * 8 if attn == "auto" else 0
    assert estimate["activation_bytes"] - cpu["activation_bytes"] == extra
    if attn == "auto":  # without padding no mask: flash (bf16 would) or, in fp32, no bias kept
        unpadded = EstimateBackend(gpu="a100-80gb").measure(
            dataclasses.replace(spec, padding=False)
        )
        assert unpadded["activation_bytes"] != estimate["activation_bytes"]


def test_padded_flash_attention_2_runs_varlen_on_the_real_tokens():
    """transformers' `_upad_input` + `flash_attn_varlen_func` (modeling_flash_attention_utils.py):
    q, k, v gathered to the T = B*N - 1 real tokens, an fp32 logsumexp over T, int64 indices;
    no mask of N x N and no repeated k/v."""
    from velora_cli.emulation.attention import padded_batches
    from velora_cli.emulation.implementations import attention_implementation

    name = attention_implementation("flash_attention_2", "meta")
    tokens = BATCH * SEQ - 1
    with padded_batches(True), cuda_emulation(None):
        kept = saved(build(name, "meta", torch.bfloat16, sliding_window=None), "meta")
    shapes = [(tuple(t.shape), t.dtype) for t in kept]
    assert shapes.count(((1, HEADS, tokens), torch.float32)) == LAYERS  # varlen logsumexp
    assert shapes.count(((tokens,), torch.int64)) == LAYERS  # the unpadding indices
    assert shapes.count(((1, KV_HEADS, tokens, HEAD_DIM), torch.bfloat16)) == 2 * LAYERS  # k, v
    assert not [t for t in kept if t.dim() == 4 and t.shape[-2:] == (SEQ, SEQ)]


def test_padding_is_refused_for_images(tmp_path):
    from transformers import ViTConfig

    ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)  # fmt: skip
    spec = StepSpec(model=str(tmp_path), batch_size=1, seq_len=17, padding=True)
    with pytest.raises(SpecError, match="images are neither padded nor packed"):
        EstimateBackend().measure(spec)


def test_the_table_title_names_the_attention_and_padding():
    from velora_cli.report.profile import profile_table

    document = {
        "model": "m", "task": "causal-lm", "mode": "full", "batch_size": 1, "seq_len": 8,
        "precision": "fp32", "backend": "estimate", "rows": [],
        "settings": StepSpec(model="m", attn="eager", padding=True).to_json(),
    }  # fmt: skip
    title = profile_table(document).title
    assert "seq 8 (padded) · eager attention ·" in title
    document["settings"] = StepSpec(model="m").to_json()
    assert "attention" not in profile_table(document).title
