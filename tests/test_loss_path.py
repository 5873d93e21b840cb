"""The causal-LM loss as the run's transformers release computed it (velora_cli.measure.loss_path).

Checked against a real CPU step: a one-layer GPT-BigCode with a 4096-entry vocabulary in bf16,
whose loss is the step's peak, runs through the cpu backend's tracker with the installed loss
(transformers 5: fp32 logits, labels padded) and with 4.48's (GPTBigCode's inline loss: a bf16
shifted copy, bf16 log-softmax); the difference is the count written below from the two releases'
code, and the estimate predicts the same difference on meta.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from velora_cli.measure.loss_path import (
    VersionError,
    apply_loss_path,
    loss_path,
    release,
    shifted_bytes,
)
from velora_cli.measure.train_step import SpecError, StepSpec
from velora_cli.validation import mapping

B, L, V = 2, 64, 4096
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": V,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}  # fmt: skip
BIGCODE = {
    "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode", "n_embd": 32,
    "n_inner": 64, "n_layer": 1, "n_head": 2, "multi_query": True, "n_positions": 64,
    "vocab_size": V, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    "tie_word_embeddings": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def bigcode_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bigcode")
    (folder / "config.json").write_text(json.dumps(BIGCODE))
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    (folder / "config.json").write_text(json.dumps(LLAMA))
    return str(folder)


def peaks(specs) -> tuple[list[int], list[int]]:
    """Peak bytes of each spec: a real CPU step (the cpu backend's tracker), and the estimate."""
    from velora_cli.estimate.backend import EstimateBackend
    from velora_cli.measure.cpu import CpuBackend

    cpu = [CpuBackend(warmup=1, steps=1).measure(s)["peak_bytes"] for s in specs]
    est = [EstimateBackend().measure(s)["peak_bytes"] for s in specs]
    return cpu, est


# the int64 label copies differ between the paths too (B x L x 8 = 1 KiB each, 512-rounded)
LABELS = 4096


def test_the_releases_read():
    # GPTBigCode computed its loss inline, in the logits' dtype, through 4.48 (read: 4.44.2,
    # 4.45.2, 4.46.3, 4.47.1, 4.48.1); 4.49.0 calls self.loss_function
    assert loss_path("gpt_bigcode", "4.48.1") == "shifted_native"
    assert loss_path("gpt_bigcode", "4.44.2") == "shifted_native"
    assert loss_path("gpt_bigcode", "4.49.0") is None
    # ForCausalLMLoss copied the shifted fp32 logits in 4.46-4.48 and pads the labels from 4.49;
    # Llama and Mixtral called it from 4.46, Mistral and Granite from 4.48; before, their inline
    # loss replaced the half logits by fp32 ones, then made the same copy
    assert loss_path("mistral", "4.48.1") == "shifted_fp32"
    assert loss_path("llama", "4.46.3") == "shifted_fp32"
    assert loss_path("mistral", "4.47.1") == "inline_fp32"
    assert loss_path("granite", "4.45.2") == "inline_fp32"
    assert loss_path("llama", "4.39.3") == "inline_fp32"
    assert loss_path("mistral", "4.52.4") is None
    assert loss_path("mistral", "5.0.0") is None
    # not read: the installed model's loss
    assert loss_path("gpt2", "4.48.1") is None
    assert loss_path("llama", "4.30.0") is None
    assert loss_path("llama", None) is None
    assert release("4.49.0.dev0") == (4, 49)
    with pytest.raises(VersionError, match="MAJOR.MINOR"):
        release("four")


def test_a_bad_version_is_a_spec_error():
    with pytest.raises(SpecError, match="transformers version 'x'"):
        StepSpec(model="m", transformers_version="x")


def test_profile_documents_of_todays_setups_do_not_change():
    assert "transformers_version" not in StepSpec(model="m").to_json()
    old = StepSpec(model="m", transformers_version="4.48.1")
    assert StepSpec.from_json(old.to_json()) == old


def test_validate_passes_the_records_transformers_version():
    setup = {"task": "causal_lm"}
    assert mapping.map_setup(setup, versions={"transformers": "4.48.1"}).spec == {
        "transformers_version": "4.48.1"
    }
    assert "transformers_version" not in mapping.map_setup(setup).spec
    assert "transformers_version" not in mapping.map_setup(setup, versions={"torch": "2.4"}).spec


@pytest.mark.parametrize("version", ["4.48.1", "4.45.2"])
def test_the_releases_loss_is_the_models_own_loss(llama_dir, version):
    # same value as the installed model's loss on real weights: only the tensors differ
    import torch

    from velora_cli.measure.train_step import prepare

    spec = StepSpec(model=llama_dir, batch_size=B, seq_len=16, dtype="fp32")
    prepared = prepare(spec, "cpu")
    batch = prepared.micro_batches[0]
    with torch.no_grad():
        own = prepared.model(**batch).loss
        path = apply_loss_path(prepared.model, "causal-lm", version)
        assert path == {"4.48.1": "shifted_fp32", "4.45.2": "inline_fp32"}[version]
        torch.testing.assert_close(prepared.model(**batch).loss, own)
    assert apply_loss_path(prepared.model, "sequence-classification", version) is None


def test_gpt_bigcode_4_48_holds_less_at_the_loss_cpu_and_estimate(bigcode_dir):
    today = StepSpec(model=bigcode_dir, batch_size=B, seq_len=L, dtype="bf16")
    old = dataclasses.replace(today, transformers_version="4.48.1")
    # Installed (5.x ForCausalLMLoss): at log_softmax's backward the fp32 log-softmax it saved,
    # its incoming gradient (nll_loss's backward) and its result: 3 x (B, L, V) x 4 bytes.
    # 4.48's GPTBigCode: its forward holds the bf16 logits (B, L, V), their shifted copy and the
    # bf16 log-softmax (B, L-1, V) each, which is more than its backward's 3 x (B, L-1, V) x 2.
    installed = 3 * B * L * V * 4
    recorded = B * L * V * 2 + 2 * shifted_bytes(B, L, V, 2)
    expected = installed - recorded  # 6,291,456 - 3,112,960
    cpu, est = peaks((today, old))
    assert abs((cpu[0] - cpu[1]) - expected) <= LABELS, (cpu, expected)
    assert est[0] - est[1] == cpu[0] - cpu[1], (est, cpu)


def test_llama_before_4_49_copies_the_shifted_fp32_logits_cpu_and_estimate(llama_dir):
    today = StepSpec(model=llama_dir, batch_size=B, seq_len=L, dtype="bf16")
    held = dataclasses.replace(today, transformers_version="4.48.1")  # ForCausalLMLoss 4.48
    inline = dataclasses.replace(today, transformers_version="4.45.2")  # LlamaForCausalLM 4.45
    installed = 3 * B * L * V * 4  # at the backward: fp32 log-softmax, its gradient, its result
    # 4.48's forward at the log-softmax: the model's bf16 logits, ForCausalLMLoss's fp32 copy,
    # the shifted fp32 copy and the fp32 log-softmax
    held_bytes = B * L * V * (2 + 4) + 2 * shifted_bytes(B, L, V, 4)
    # 4.45's: logits = logits.float() let the bf16 logits go, then the same shifted copy
    inline_bytes = B * L * V * 4 + 2 * shifted_bytes(B, L, V, 4)
    cpu, est = peaks((today, held, inline))
    assert abs((cpu[1] - cpu[0]) - (held_bytes - installed)) <= LABELS, cpu
    assert abs((cpu[2] - cpu[0]) - (inline_bytes - installed)) <= LABELS, cpu
    assert [e - est[0] for e in est] == [c - cpu[0] for c in cpu], (est, cpu)


def test_cli_profile_plans_the_releases_loss(llama_dir, tmp_path):
    # `velora profile --transformers-version`: the step's spec carries it, and the estimate's
    # peak moves by the count of test_llama_before_4_49_... (here B=2, L=64: 4.48 holds more)
    from typer.testing import CliRunner

    from velora_cli.cli import app

    runner = CliRunner()
    base = ["profile", llama_dir, "--backend", "estimate", "--dtype", "bf16"]
    base += ["--batch-size", str(B), "--seq-len", str(L), "--format", "json"]
    rows = {}
    for version in (None, "4.48.1"):
        out = tmp_path / f"{version}.json"
        args = base + ["-o", str(out)] + (["--transformers-version", version] if version else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        document = json.loads(out.read_text())
        assert document["settings"].get("transformers_version") == version
        rows[version] = document["rows"][0]["peak_bytes"]
    assert rows["4.48.1"] > rows[None]
    result = runner.invoke(app, [*base, "--transformers-version", "four"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: transformers version 'four': give MAJOR.MINOR[.PATCH], e.g. 4.48.1"
    ]


def test_gpt_bigcode_before_4_53_holds_each_blocks_kv_projection(tmp_path):
    # GPTBigCode 4.39-4.52 kept every block's `present` (a view of its c_attn output) while
    # use_cache was on, checkpointing or not, until the output was dropped: under reentrant
    # checkpointing, where the blocks save nothing, that is n_layer x (B, L, E + 2 kv) bf16 more
    # at the loss. 2 blocks, E 32, one K/V head of 16: 2 x 2 x 64 x 64 x 2 = 32,768 bytes.
    from velora_cli.measure.loss_path import holds_presents
    from velora_cli.measure.train_step import Strategy

    assert holds_presents("gpt_bigcode", "4.48.1") and holds_presents("gpt_bigcode", "4.52.4")
    assert not holds_presents("gpt_bigcode", "4.53.0") and not holds_presents("llama", "4.48.1")
    specs = []
    for use_cache in (True, False):
        folder = tmp_path / f"cache-{use_cache}"
        folder.mkdir()
        config = {**BIGCODE, "n_layer": 2, "use_cache": use_cache}
        (folder / "config.json").write_text(json.dumps(config))
        specs.append(
            StepSpec(
                model=str(folder), batch_size=B, seq_len=L, dtype="bf16",
                transformers_version="4.48.1", strategy=Strategy(gc=True), gc_reentrant=True,
            )
        )  # fmt: skip
    presents = 2 * B * L * (32 + 2 * 16) * 2
    cpu, est = peaks(specs)
    assert cpu[0] - cpu[1] == presents, cpu
    assert est[0] - est[1] == presents, est


def test_a_release_whose_loss_was_not_read_is_said():
    from velora_cli.measure.loss_path import unread

    assert unread("llama", "4.48.1") is None  # read: the step takes that release's loss
    assert unread("llama", "4.50.0") is None and unread("llama", None) is None  # today's loss
    for model_type, version in (("llama", "4.30.0"), ("qwen2", "4.45.2"), (None, "4.40")):
        note = unread(model_type, version)
        assert note and f"--transformers-version {version}" in note and "not read" in note


def test_cli_profile_says_when_it_keeps_the_installed_loss(tmp_path):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    out = tmp_path / "profile.json"
    args = ["profile", "llama-tiny", "--backend", "estimate", "--placements", "paper",
            "--transformers-version", "4.30", "--format", "json", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    notices = json.loads(out.read_text())["notices"]
    assert any("--transformers-version 4.30" in n and "not read" in n for n in notices)


def test_cli_tune_says_when_it_keeps_the_installed_loss(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    args = ["tune", "llama-tiny", "--backend", "estimate", "--seq-len", "32", "--mode", "full",
            "--optimizer", "adamw", "--placements", "paper", "--micro-batches", "4",
            "--gc-every", "1", "--probe-steps", "0", "--budget", "2GB",
            "--transformers-version", "4.30", "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    notices = json.loads(result.stdout[result.stdout.index("{") :])["notices"]
    assert any("--transformers-version 4.30" in n and "not read" in n for n in notices)


def test_a_head_other_than_a_causal_lm_gets_no_loss_notice():
    from velora_cli.measure.loss_path import unread

    assert unread("llama", "4.30", "causal-lm") is not None
    assert unread("roberta", "4.30", "sequence-classification") is None
