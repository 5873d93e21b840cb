"""Length distributions, the longest batch (`--lengths`, `--data`) and packed batches
(`--packing`), checked against real CPU steps where the CPU runs them (SDPA, eager) and against
counts from the kernels' source where only a GPU does (FlashAttention-2)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_attention_kernels import BATCH, HEAD_DIM, HEADS, KV_HEADS, LAYERS, SEQ, mistral_config
from typer.testing import CliRunner

from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.cpu import CpuBackend
from velora_cli.measure.lengths import (
    LengthsError,
    for_lengths,
    from_values,
    parse_lengths,
    worst_batch,
)
from velora_cli.measure.train_step import SpecError, StepSpec

runner = CliRunner()


def _model(tmp_path, **overrides) -> str:
    mistral_config(sliding_window=None, **overrides).save_pretrained(tmp_path)
    return str(tmp_path)


# -- distributions and the worst batch ----------------------------------------------------------


def test_distributions_parse_with_their_longest_length(tmp_path):
    assert parse_lengths("uniform:128-2048").maximum == 2048
    assert parse_lengths("uniform:128-2048").quantile(0.5) == 1088
    normal = parse_lengths("normal:512,128,1024")
    assert normal.maximum == 1024 and 500 <= normal.quantile(0.5) <= 524
    pct = parse_lengths("percentiles:p50=300,p90=900,max=2048")
    assert (pct.quantile(0.5), pct.quantile(0.9), pct.maximum) == (300, 900, 2048)
    assert pct.quantile(0.95) == round(900 + (2048 - 900) * 0.5)  # linear between knots
    listed = tmp_path / "lengths.txt"
    listed.write_text("12\n40\n7\n")
    assert parse_lengths(str(listed)).values == (12, 40, 7)
    listed.write_text("[5, 9]")
    assert parse_lengths(str(listed)).values == (5, 9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gamma:1,2", "unknown distribution 'gamma'"),
        ("uniform:10", "give uniform:MIN-MAX"),
        ("uniform:900-100", "MIN <= MAX"),
        ("normal:512,0,1024", "STD must be > 0"),
        ("percentiles:p50=10", "give the longest length (max=N)"),
        ("percentiles:p50=900,p90=100,max=2000", "must not fall"),
        ("/no/such/lengths.txt", "no such file and not a distribution"),
    ],
)
def test_bad_specs_say_what_to_give(text, message):
    with pytest.raises(LengthsError, match=re.escape(message)):
        parse_lengths(text)


def test_a_lengths_file_that_is_not_lengths(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("twelve\n")
    with pytest.raises(LengthsError, match="one whole number per line"):
        parse_lengths(str(bad))
    bad.write_text("")
    with pytest.raises(LengthsError, match="no lengths"):
        parse_lengths(str(bad))


def test_the_worst_padded_batch_of_listed_lengths():
    # the micro longest, in any order a shuffle can give them
    plan = worst_batch(from_values([5, 90, 30, 64, 90, 12], "--data d"), 3)
    assert (plan.seq_len, plan.lengths, plan.padding) == (90, (90, 90, 64), True)
    # the longest three are equal (no pad token): the worst batch that pads has one shorter
    plan = worst_batch(from_values([90, 90, 90, 64, 5], "--data d"), 3)
    assert (plan.lengths, plan.padding) == ((90, 90, 64), True)
    # all equal: no batch pads, no mask; one sequence per batch never pads
    assert worst_batch(from_values([50] * 8, "--data d"), 4).padding is False
    assert worst_batch(from_values([5, 90], "--data d"), 1).padding is False
    # packing: the most tokens in one row
    plan = worst_batch(from_values([5, 90, 30, 64], "--data d"), 2, packing=True)
    assert (plan.lengths, plan.padding, plan.seq_len) == ((90, 64), False, 90)


def test_a_distribution_plans_every_sequence_at_its_longest():
    """Continuous: B draws can all be near the maximum, so the worst padded batch is N tokens
    with one pad token (lengths None); the padding share is what random batches waste."""
    plan = worst_batch(parse_lengths("uniform:100-200"), 4)
    assert (plan.seq_len, plan.lengths, plan.padding) == (200, None, True)
    # E[max of 4 uniform draws on [100, 200]] = 100 + 100 * 4/5 = 180; E[length] = 150
    assert abs(plan.typical - 184) <= 6
    assert abs(plan.pad_share - (1 - 150 / 180)) < 0.02
    assert "padding" in plan.note and "4 × 200" in plan.note


def test_lengths_above_the_position_table_are_refused():
    with pytest.raises(LengthsError, match="exceed the model's max_position_embeddings"):
        worst_batch(parse_lengths("uniform:10-5000"), 2, max_positions=4096)


def test_for_lengths_sets_the_step(tmp_path):
    from velora_cli.models import resolve_model

    model = _model(tmp_path)
    spec = StepSpec(model=model, batch_size=4, grad_accum_steps=2, seq_len=256)
    planned, note = for_lengths(spec, resolve_model(model), from_values([3, 40, 17, 9], "--data d"))
    assert (planned.seq_len, planned.lengths, planned.padding) == (40, (40, 17), True)
    assert note.startswith("--data d: planned for the longest batch, 2 × 40")


def test_step_settings_that_contradict_each_other():
    with pytest.raises(SpecError, match="leave --padding out"):
        StepSpec(model="m", padding=True, packing=True)
    with pytest.raises(SpecError, match="2 lengths for a micro-batch of 4"):
        StepSpec(model="m", batch_size=4, seq_len=8, padding=True, lengths=(8, 3))
    with pytest.raises(SpecError, match="from 1 to the sequence length 8"):
        StepSpec(model="m", batch_size=2, seq_len=8, padding=True, lengths=(7, 3))


# -- real CPU steps against the estimate --------------------------------------------------------


@pytest.mark.parametrize("attn", ["auto", "eager"])
@pytest.mark.parametrize(
    "batches",
    [
        {"padding": True, "lengths": (SEQ, 40)},  # the planned lengths, right-padded
        {"packing": True},  # TRL bins: 1 × (B·N), position_ids restarting
        {"packing": True, "lengths": (SEQ, 40)},  # DataCollatorWithFlattening of two sequences
    ],
)
def test_padded_and_packed_batches_estimate_matches_cpu_tracker(tmp_path, attn, batches):
    """The CPU step reads real masks and position_ids (transformers finds the packed sequences
    itself: `find_packed_sequence_indices`), the estimate is told (`padded_batches`): the same
    tensors are kept. Differences, SDPA only: the efficient kernel's two int64 philox scalars
    per layer, and its logsumexp rows padded to 32 (a packed row of 104 tokens: 24 rows of 4
    heads × 4 bytes per layer)."""
    spec = StepSpec(model=_model(tmp_path), batch_size=BATCH, seq_len=SEQ, attn=attn, **batches)
    cpu = CpuBackend(warmup=0, steps=1).measure(spec)
    estimate = EstimateBackend(gpu="a100-80gb").measure(spec)
    assert cpu["status"] == estimate["status"] == "ok", (cpu, estimate)
    tokens = spec.real_tokens() if spec.packing else SEQ
    lse_rows = -(-tokens // 32) * 32 - tokens
    extra = LAYERS * (2 * 8 + lse_rows * HEADS * 4) if attn == "auto" else 0
    assert estimate["activation_bytes"] - cpu["activation_bytes"] == extra


def test_a_packed_row_keeps_its_block_diagonal_mask_on_the_cpu(tmp_path):
    """transformers 5.25 (masking_utils.create_causal_mask): packed position_ids give a dense
    (1, 1, T, T) bool mask, so SDPA converts it to an additive (1, 1, T, T) bias in q's dtype
    that the kernel saves per layer, and `repeat_kv` copies k, v to all heads (no enable_gqa
    with a mask). A row of T tokens that does not pack keeps neither: here fp32, T = 128."""
    model = _model(tmp_path)
    packed = StepSpec(model=model, batch_size=2, seq_len=SEQ, packing=True)
    plain = StepSpec(model=model, batch_size=1, seq_len=2 * SEQ)
    kept = CpuBackend(warmup=0, steps=1).measure(packed)["activation_bytes"]
    base = CpuBackend(warmup=0, steps=1).measure(plain)["activation_bytes"]
    tokens = 2 * SEQ
    bias = tokens * tokens * 4
    repeated = 2 * (HEADS - KV_HEADS) * tokens * HEAD_DIM * 4  # k and v: H instead of Hkv heads
    assert kept - base == LAYERS * (bias + repeated)


def test_packed_flash_attention_2_keeps_what_the_dense_kernel_keeps(tmp_path):
    """FlashAttention-2 has no CPU kernel: counts from the source. transformers 5.25
    `_flash_attention_forward` with packed position_ids (`_prepare_from_posids`:
    ``x.contiguous().view(-1, H, d)``, then `flash_attn_varlen_func`): q and k are RoPE outputs
    laid out (B, H, T, d), so their (B, T, H, d) views are copied to (T, H, d); v is a view of
    v_proj's output and is not copied. The varlen kernel (flash_attn_interface.py
    `FlashAttnVarlenFunc.forward`: ctx.save_for_backward(q, k, v, out_padded, softmax_lse,
    rng_state)) keeps those, its output and an fp32 (H, T) logsumexp: no mask, no unpadding
    indices, the bytes of the dense kernel on one T-token sequence."""
    from test_attention_kernels import build

    from velora_cli.emulation.attention import padded_batches
    from velora_cli.emulation.implementations import attention_implementation
    from velora_cli.emulation.step import cuda_emulation

    name = attention_implementation("flash_attention_2", "meta")
    model = build(name, "meta", torch.bfloat16, sliding_window=None)
    tokens = BATCH * SEQ
    ids = torch.empty(1, tokens, dtype=torch.long, device="meta")

    def kept_by(packed: bool) -> list[torch.Tensor]:
        kept = []

        def pack(t):
            kept.append(t)
            return t

        positions = {"position_ids": torch.empty_like(ids)} if packed else {}
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with padded_batches(False, None, packed), cuda_emulation(None), hooks:
            model(input_ids=ids, labels=ids, **positions)
        return kept

    kept = kept_by(packed=True)
    shapes = [(tuple(t.shape), t.dtype) for t in kept]
    assert shapes.count(((1, HEADS, tokens), torch.float32)) == LAYERS  # logsumexp over T
    assert shapes.count(((1, KV_HEADS, tokens, HEAD_DIM), torch.bfloat16)) == 2 * LAYERS  # k, v
    assert not [t for t in kept if t.dim() == 4 and t.shape[-2:] == (tokens, tokens)]  # no mask
    # the same shapes as the dense kernel on one T-token sequence (no unpadding indices)
    dense = [(tuple(t.shape), t.dtype) for t in kept_by(packed=False)]
    assert sorted(map(str, shapes)) == sorted(map(str, dense))

    model_dir = _model(tmp_path)
    packed = StepSpec(model=model_dir, batch_size=BATCH, seq_len=SEQ, packing=True,
                      dtype="bf16", attn="flash_attention_2")  # fmt: skip
    dense = StepSpec(model=model_dir, batch_size=1, seq_len=tokens, dtype="bf16",
                     attn="flash_attention_2")  # fmt: skip
    a = EstimateBackend(gpu="a100-80gb").measure(packed)["activation_bytes"]
    b = EstimateBackend(gpu="a100-80gb").measure(dense)["activation_bytes"]
    assert a == b


def test_padded_flash_attention_2_unpads_the_planned_real_tokens(tmp_path):
    """`_upad_input` gathers the real tokens: the planned lengths (64 + 40), not B·N − 1."""
    model_dir = _model(tmp_path)
    spec = StepSpec(model=model_dir, batch_size=BATCH, seq_len=SEQ, padding=True, dtype="bf16",
                    attn="flash_attention_2")  # fmt: skip
    one_pad = EstimateBackend(gpu="a100-80gb").measure(spec)["activation_bytes"]
    import dataclasses

    planned = dataclasses.replace(spec, lengths=(SEQ, 40))
    fewer = EstimateBackend(gpu="a100-80gb").measure(planned)["activation_bytes"]
    # q, k, v copies and the kernel's output (T, H, d) bf16, logsumexp (H, T) fp32, and the
    # int64 indices (one tensor, kept by the unpad and the pad): per real token and layer
    per_token = (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM * 2 + HEADS * 4 + 8
    assert one_pad - fewer == LAYERS * per_token * (BATCH * SEQ - 1 - (SEQ + 40))


# -- the command line ---------------------------------------------------------------------------


def test_profile_plans_the_longest_batch_of_the_data(tmp_path):
    """--data: one sequence per JSONL text, its tokenizer's lengths (a local WordLevel one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = _model(tmp_path / "model")
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(model)
    data = tmp_path / "train.jsonl"
    texts = ["the cat sat on a mat " * 5, "a dog ran", "the cat " * 3, "on a mat"]  # 30, 3, 6, 3
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = runner.invoke(app, ["profile", model, "-b", "2", "-s", "64", "--data", str(data),
                              "--backend", "estimate", "--no-save", "--format", "json",
                              "--num-groups", "2"])  # fmt: skip
    assert out.exit_code == 0, out.output
    document = json.loads(out.stdout)
    assert document["settings"]["seq_len"] == 30 and document["settings"]["lengths"] == [30, 6]
    assert f"from {model}" in out.stderr and "2 × 30" in out.stderr  # the tokenizer named


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "zipf:3"], "unknown distribution 'zipf'"),
        (["--lengths", "uniform:8-999"], "exceed the model's max_position_embeddings (256)"),
        (["--data", "./missing.jsonl"], "--data ./missing.jsonl: no such file"),
        (["--lengths", "uniform:8-64", "--data", "x.txt"], "give --lengths or --data, not both"),
        (["--packing", "--padding"], "leave --padding out"),
    ],
)
def test_bad_lengths_are_one_line_and_exit_1(tmp_path, args, message):
    model = _model(tmp_path)
    out = runner.invoke(app, ["profile", model, "-b", "2", "-s", "64", "--backend", "estimate",
                              "--no-save", *args])  # fmt: skip
    assert out.exit_code == 1, out.output
    assert message in out.stderr and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1


def test_an_unreadable_data_file_is_one_line(tmp_path):
    model = _model(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    out = runner.invoke(app, ["profile", model, "--data", str(bad), "--backend", "estimate",
                              "--no-save"])  # fmt: skip
    assert out.exit_code == 1 and "not valid JSON" in out.stderr


def test_the_table_title_says_packed(tmp_path):
    model = _model(tmp_path)
    out = runner.invoke(app, ["profile", model, "-b", "2", "-s", "64", "--packing", "--backend",
                              "estimate", "--no-save", "--num-groups", "2"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "(packed in one row)" in " ".join(out.stdout.split())


def test_packing_is_refused_for_a_head_that_is_not_a_causal_lm():
    out = runner.invoke(app, ["profile", "roberta-base", "--packing", "--backend", "estimate",
                              "--no-save"])  # fmt: skip
    assert out.exit_code == 1
    assert "packed rows train causal language models" in out.stderr and "masked-lm" in out.stderr


def test_a_tune_plans_every_candidate_at_the_longest_length():
    from velora_cli.measure.lengths import tune_lengths

    assert tune_lengths(None, 256, False, False) == (256, False, None)
    seq_len, padding, note = tune_lengths("uniform:16-100", 256, False, False)
    assert (seq_len, padding) == (100, True) and "--seq-len does not apply" in note
    assert tune_lengths("uniform:16-100", 256, False, True)[:2] == (100, False)  # packed rows
    with pytest.raises(LengthsError, match="unknown distribution"):
        tune_lengths("zipf:1", 256, False, False)


def test_trl_packed_rows_estimate_matches_cpu_tracker():
    """TRL's step (--trainer trl) on a padding-free packed row: its token count is the row's
    length (sft_trainer.py compute_loss: position_ids.size(1) without an attention mask)."""
    spec = StepSpec(model="llama-tiny", batch_size=2, seq_len=32, packing=True, trainer="trl")
    cpu = CpuBackend(warmup=0, steps=1).measure(spec)
    estimate = EstimateBackend(gpu="a100-80gb").measure(spec)
    assert cpu["status"] == estimate["status"] == "ok", (cpu, estimate)
    layers = 2  # llama-tiny: the efficient kernel's two int64 philox scalars per layer
    assert estimate["activation_bytes"] - cpu["activation_bytes"] == layers * 2 * 8
