"""Grouped-query attention through SDPA as torch 2.13 runs it, K/V repeated before SDPA
(`--repeat-kv`, what fitcheck's harness and older transformers do), and cuDNN attention where
torch prefers it (issues 23 and 24).

Sources of the counts (quoted in velora_cli/gpus.py beside `EFFICIENT_SUPPORTS_GQA`):
- torch 2.13's memory-efficient kernel has no GQA: its dense check is
  `check_batch_size_and_num_heads_dense<false /*supports_grouped_query_attention=*/>`, so with
  `enable_gqa` and Hkv < Hq it refuses ("both fused kernels require query, key and value to have
  the same num_heads"); flash (`backend_supports_grouped_query_attention = true`) and cuDNN take
  it. pytorch#191085 adds GQA to the efficient kernel after the 2.13 branch cut.
- transformers 5.25 `use_gqa_in_sdpa`: enable_gqa on CUDA only when `attention_mask is None`.
- check_prefer_cudnn_attention: cuDNN > 9.15.0 on major 9/10 (CUDA < 13 builds: minor 0 or 3);
  torch 2.13's wheels: CUDA 12.6 with cuDNN 9.10.2.21, CUDA 13.0/13.2 with 9.20.0.48
  (RELEASE.md, pytorch#187075).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import LlamaConfig

from velora_cli.emulation.attention import (
    gpu_attention_kernel,
    sdpa_note,
    target_gpu,
    velora_estimate_attention,
)
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.gpus import GPUS, sdpa_backends, torch_cudnn_version
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.train_step import SpecError, StepSpec

FLASH, EFFICIENT, MATH, CUDNN = (
    "flash_attention",
    "efficient_attention",
    "math",
    "cudnn_attention",
)
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BATCH, SEQ = 2, 4, 2, 16, 2, 64
CUDNN_920 = torch_cudnn_version("13.0")


# -- which kernel, per GPU class ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "dtype", "kwargs", "expected"),
    [
        # sm75 (T4) and sm70 (V100): no flash (check_sm_version<sm80, sm121>), and the efficient
        # kernel refuses enable_gqa in torch 2.13: math. Repeated K/V (gqa False): efficient.
        ("t4", "fp16", {"gqa": True}, [MATH]),
        ("t4", "fp16", {"gqa": False}, [EFFICIENT, MATH]),
        ("v100-16gb", "fp16", {"gqa": True}, [MATH]),
        ("v100-16gb", "fp32", {"gqa": True}, [MATH]),
        ("v100-16gb", "fp16", {"gqa": False}, [EFFICIENT, MATH]),
        # sm80 / sm89 / sm120, fp16/bf16: flash takes GQA, then math (efficient refuses it)
        ("a100-80gb", "bf16", {"gqa": True}, [FLASH, MATH]),
        ("rtx4090", "bf16", {"gqa": True}, [FLASH, MATH]),
        ("rtx5090", "bf16", {"gqa": True}, [FLASH, MATH]),
        # fp32 on any GPU: flash is fp16/bf16 only, cuDNN too: math with GQA
        ("a100-80gb", "fp32", {"gqa": True}, [MATH]),
        ("h100", "fp32", {"gqa": True, "cudnn_version": CUDNN_920}, [MATH]),
        # sm90 / sm100 with torch 2.13's CUDA 13 wheel (cuDNN 9.20 > 9.15): cuDNN first, GQA native
        ("h100", "bf16", {"gqa": True, "cudnn_version": CUDNN_920}, [CUDNN, FLASH, MATH]),
        ("h200", "bf16", {"gqa": True, "cudnn_version": CUDNN_920}, [CUDNN, FLASH, MATH]),
        ("b200", "bf16", {"gqa": True, "cudnn_version": CUDNN_920}, [CUDNN, FLASH, MATH]),
        # its CUDA 12.6 wheel (cuDNN 9.10.2, not > 9.15): the default order, flash first
        (
            "h100",
            "bf16",
            {"gqa": True, "cudnn_version": torch_cudnn_version("12.6")},
            [FLASH, MATH],
        ),
        # with a mask transformers repeats K/V itself (no enable_gqa): cuDNN, or efficient
        ("h100", "bf16", {"has_mask": True, "cudnn_version": CUDNN_920}, [CUDNN, EFFICIENT, MATH]),
        ("t4", "fp16", {"has_mask": True}, [EFFICIENT, MATH]),
    ],
)
def test_sdpa_backends_with_grouped_query_attention(key, dtype, kwargs, expected):
    assert sdpa_backends(GPUS[key], dtype, **kwargs) == expected


def test_cudnn_version_of_torch_2_13_wheels():
    # RELEASE.md's 2.13 row: CUDA 12.6 (CUDNN 9.10.2.21), CUDA 13.0 and 13.2 (CUDNN 9.20.0.48)
    assert torch_cudnn_version("12.6") == 91002
    assert torch_cudnn_version("12.8") == 91002  # no 12.8 wheel: the CUDA 12 one
    assert torch_cudnn_version("13.0") == torch_cudnn_version("13.2") == 92000
    assert torch_cudnn_version(None) == 92000  # the CUDA 13.0 wheel is assumed
    assert torch_cudnn_version("11.8") is None
    with pytest.raises(ValueError, match="expected MAJOR.MINOR"):
        torch_cudnn_version("twelve")


def _qkv(dtype, kv_heads=KV_HEADS, head_dim=64):
    def make(heads):
        return torch.empty(1, heads, 8, head_dim, dtype=dtype, device="meta", requires_grad=True)

    return make(HEADS), make(kv_heads), make(kv_heads)


def test_gpu_attention_kernel_names_the_math_path_gqa_takes():
    fp16, bf16 = torch.float16, torch.bfloat16
    assert gpu_attention_kernel(*_qkv(fp16), gpu="t4") == "math"
    assert gpu_attention_kernel(*_qkv(fp16), gpu="t4", reason=True) == "math (gqa)"
    assert gpu_attention_kernel(*_qkv(fp16, kv_heads=HEADS), gpu="t4") == "efficient"
    assert gpu_attention_kernel(*_qkv(fp16), has_mask=True, gpu="v100-32gb") == "efficient"
    # bf16 below sm80 is math for another reason (no bf16 kernel), not GQA
    assert gpu_attention_kernel(*_qkv(bf16), gpu="t4", reason=True) == "math"
    assert gpu_attention_kernel(*_qkv(bf16), gpu="a100-80gb") == "flash"
    assert gpu_attention_kernel(*_qkv(bf16), gpu="h100") == "cudnn"  # default: CUDA 13.0 wheel
    assert gpu_attention_kernel(*_qkv(bf16), gpu="h100", cudnn_version=91002) == "flash"
    with target_gpu("h100", "12.6"):
        assert gpu_attention_kernel(*_qkv(bf16)) == "flash"
    with target_gpu("b200"):
        assert gpu_attention_kernel(*_qkv(bf16)) == "cudnn"


# -- cuDNN attention: what one call keeps --------------------------------------------------------


def _saved_by_one_call(q, k, v, mask=None, **kwargs) -> list[torch.Tensor]:
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = q.shape[1] // k.shape[1], True
    found: dict[int, torch.Tensor] = {}

    def pack(t):
        found.setdefault(t.untyped_storage()._cdata, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        velora_estimate_attention(module, q, k, v, mask, **kwargs)
    return list(found.values())


def _meta(*shape, dtype=torch.bfloat16, grad=True):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def test_one_cudnn_call_saves_q_k_v_out_lse_seed_offset():
    """Counts from the source: `_scaled_dot_product_cudnn_attention` (attention.cu
    `_cudnn_attention_forward`, derivatives.yaml) keeps q, k and v (GQA native: Hkv heads), the
    output allocated like q, an fp32 logsumexp (B, H, N, 1) and the philox seed and offset
    (int64, one element each). No (B, H, N, N) matrix; no padding of the logsumexp rows."""
    batch, heads, kv_heads, seq, head_dim = 2, 8, 2, 40, 32
    q = _meta(batch, heads, seq, head_dim)
    k, v = _meta(batch, kv_heads, seq, head_dim), _meta(batch, kv_heads, seq, head_dim)
    with target_gpu("h100") as kernels:
        found = _saved_by_one_call(q, k, v)
    assert kernels == {"cudnn"}
    per_q = batch * heads * seq * head_dim * 2
    per_kv = batch * kv_heads * seq * head_dim * 2
    expected = 2 * per_q + 2 * per_kv + batch * heads * seq * 1 * 4 + 2 * 8
    assert sum(t.untyped_storage().nbytes() for t in found) == expected
    assert any(t.shape == (batch, heads, seq, 1) and t.dtype == torch.float32 for t in found)


def test_one_masked_cudnn_call_keeps_the_bias_as_passed():
    """With a mask transformers repeats K/V (no enable_gqa) and SDPA converts the bool mask to a
    dense (B, 1, N, N) one in q's dtype (convert_boolean_attn_mask_cudnn); cuDNN keeps it as
    passed: no padding to 8 keys (that is the efficient kernel's `preprocess_mask`), no heads."""
    batch, heads, kv_heads, seq, head_dim = 2, 8, 2, 36, 32  # 36 % 8 != 0
    q = _meta(batch, heads, seq, head_dim)
    k, v = _meta(batch, kv_heads, seq, head_dim), _meta(batch, kv_heads, seq, head_dim)
    mask = _meta(1, 1, seq, seq, dtype=torch.bool, grad=False).expand(batch, 1, seq, seq)
    with target_gpu("h100") as kernels:
        found = _saved_by_one_call(q, k, v, mask)
    assert kernels == {"cudnn"}
    per_head = batch * heads * seq * head_dim * 2
    expected = (
        4 * per_head  # q, repeated k, repeated v, out
        + batch * heads * seq * 4  # logsumexp (B, H, N, 1)
        + batch * 1 * seq * seq * 2  # the bf16 bias, (B, 1, N, N), unpadded
        + 2 * 8  # seed, offset
    )
    assert sum(t.untyped_storage().nbytes() for t in found) == expected


def test_the_document_note_says_cudnn_and_its_workspace():
    note = sdpa_note({"cudnn", "flash"}, "h100")
    assert "cuDNN attention on h100" in note and "9.20 > 9.15" in note
    assert "13.0 (assumed)" in note and "dQ accumulator" in note and "is not" in note
    assert sdpa_note({"flash", "efficient"}, "a100-80gb") is None
    assert "math path on t4" in sdpa_note({"math (gqa)"}, "t4")
    assert "--repeat-kv" in sdpa_note({"math (gqa)"}, "t4")


# -- K/V repeated before SDPA: the estimate against a real CPU step ---------------------------------


@pytest.fixture
def gqa_dir(tmp_path):
    LlamaConfig(
        vocab_size=128,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def _measure(backend, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backend.measure(spec)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_repeated_kv_estimate_matches_the_cpu_tracker(gqa_dir, dtype):
    """--repeat-kv keeps transformers' repeat_kv copies, (B, H, N, d) each for k and v, which
    the kernel saves. The CPU runs its flash kernel on them and keeps the same set, so the
    estimate for a T4 (memory-efficient kernel) and the real CPU step agree to the byte, but for
    the efficient kernel's two int64 philox scalars per layer."""
    native = StepSpec(model=gqa_dir, batch_size=BATCH, seq_len=SEQ, dtype=dtype)
    repeated = dataclasses.replace(native, repeat_kv=True)
    cpu = {s.repeat_kv: _measure(CpuBackend(warmup=0, steps=1), s) for s in (native, repeated)}
    estimate = _measure(EstimateBackend(gpu="t4"), repeated)
    assert estimate["activation_bytes"] - cpu[True]["activation_bytes"] == LAYERS * 2 * 8
    # what the repeat adds on the CPU: per layer, k and v with H instead of Hkv heads
    size = {"fp32": 4, "fp16": 2}[dtype]
    extra = LAYERS * 2 * BATCH * (HEADS - KV_HEADS) * SEQ * HEAD_DIM * size
    assert cpu[True]["activation_bytes"] - cpu[False]["activation_bytes"] == extra
    assert "sdpa_note" not in estimate  # the efficient kernel: nothing to say


def test_without_repeat_a_t4_runs_the_math_path_and_says_so(gqa_dir):
    """transformers 5 passes enable_gqa (no mask): torch 2.13 runs math on a T4, keeping the
    (B, H, N, N) probabilities; the repeated K/V run the efficient kernel, which keeps less."""
    native = StepSpec(model=gqa_dir, batch_size=BATCH, seq_len=SEQ, dtype="fp16")
    math = _measure(EstimateBackend(gpu="t4"), native)
    efficient = _measure(EstimateBackend(gpu="t4"), dataclasses.replace(native, repeat_kv=True))
    assert math["activation_bytes"] > efficient["activation_bytes"]
    assert "math path on t4" in math["sdpa_note"]
    cudnn = _measure(EstimateBackend(gpu="h100"), native)
    assert "cuDNN attention on h100" in cudnn["sdpa_note"]


def test_repeat_kv_is_a_later_field_and_is_checked():
    spec = StepSpec(model="llama-tiny")
    assert "repeat_kv" not in spec.to_json()  # existing documents stay identical
    repeated = dataclasses.replace(spec, repeat_kv=True)
    assert repeated.to_json()["repeat_kv"] is True
    assert StepSpec.from_json(repeated.to_json()) == repeated
    with pytest.raises(SpecError, match="--repeat-kv repeats K/V before SDPA: use it with"):
        StepSpec(model="llama-tiny", attn="eager", repeat_kv=True)


def test_cli_repeat_kv_reaches_the_step_and_refuses_eager():
    from typer.testing import CliRunner

    from velora_cli.cli import app

    result = CliRunner().invoke(
        app, ["profile", "llama-tiny", "--attn", "eager", "--repeat-kv", "--backend", "estimate"]
    )
    assert result.exit_code == 1
    assert "--repeat-kv repeats K/V before SDPA" in result.output
    assert "Traceback" not in result.output


def test_fitcheck_sdpa_rows_map_to_repeated_kv():
    from velora_cli.validation import mapping
    from velora_cli.validation.corpus import default_corpus, load_cases

    cases = [c for c in load_cases(default_corpus()) if c.source.startswith("fitcheck")]
    sdpa_gqa = [
        c
        for c in cases
        if c.setup.get("attn_implementation") == "sdpa"
        and c.setup["model_config"]["num_key_value_heads"]
        != c.setup["model_config"]["num_attention_heads"]
    ]
    assert sdpa_gqa
    for case in sdpa_gqa:
        mapped = mapping.map_setup(case.setup)
        assert mapped.expressible and mapped.spec.get("repeat_kv") is True, case.id
    for case in cases:
        if case.setup.get("attn_implementation") == "eager":
            assert "repeat_kv" not in mapping.map_setup(case.setup).spec


def test_cudnn_backward_scratch_is_its_fp32_dq_accumulator():
    """cudnn-frontend's SDPABackwardNode: from cuDNN 9.0 the "workspace optimization" is off
    (no dBias, not deterministic), so dQ_accum is non-virtual, {b, h_q, s_q, d_qk} fp32, and
    get_fe_workspace_size_node adds dQ_accum_size = b * h_q * s_q * d_qk * sizeof(float)."""
    from velora_cli.allocator.kernel_scratch import (
        CUDNN_BACKWARD,
        cudnn_attention_backward_scratch,
        scratch_for_model,
    )
    from velora_cli.models import resolve_model

    assert cudnn_attention_backward_scratch(1, 32, 2048, 128) == (32 * 2**20,)  # Llama-2-7B
    config = resolve_model("llama-tiny").config  # 4 heads of 16
    table = scratch_for_model(config, micro_batch=2, seq_len=64, dtype_bytes=2)
    assert table[CUDNN_BACKWARD] == (2 * 4 * 64 * 16 * 4,)
    spec = StepSpec("llama-tiny", batch_size=2, seq_len=64, dtype="bf16")
    cudnn = _measure(EstimateBackend(gpu="h100"), spec)
    flash = _measure(EstimateBackend(gpu="h100", cuda_version="12.6"), spec)
    assert "cuDNN attention on h100" in cudnn["sdpa_note"] and "sdpa_note" not in flash
    assert cudnn["kernel_scratch_bytes"] == 2 * 4 * 64 * 16 * 4
    assert flash["kernel_scratch_bytes"] == sum(
        table["aten::_scaled_dot_product_flash_attention_backward"]
    )


def test_a_tune_carries_repeat_kv_into_its_steps_and_journal():
    from velora_cli.search.settings import TuneSettings

    plain = TuneSettings("llama-tiny", budget_bytes=10**9, backend="estimate")
    repeated = dataclasses.replace(plain, repeat_kv=True)
    assert repeated.base_spec().repeat_kv and not plain.base_spec().repeat_kv
    assert repeated.context()["repeat_kv"] is True
    assert "repeat_kv" not in plain.context()  # journals from before still resume


def test_an_export_of_a_repeat_kv_plan_says_the_run_must_repeat_them():
    from velora_cli.configs import from_tune_document
    from velora_cli.exports.recipe import recipe_notes

    document = {"model": "llama-tiny", "recommendation": {"mode": "full"}, "settings": {}}
    plain = from_tune_document(document)
    assert not plain.repeat_kv and not any("--repeat-kv" in n for n in recipe_notes(plain))
    document["settings"]["repeat_kv"] = True  # the tune's --repeat-kv (TuneSettings.repeat_kv)
    planned = from_tune_document(document)
    assert planned.repeat_kv and any("--repeat-kv" in n for n in recipe_notes(planned))
