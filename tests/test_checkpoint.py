"""`--weights` end to end: a tiny Llama saved with save_pretrained, profiled and tuned on the cpu
backend with its own weights; pickles only through weights_only=True; safetensors first."""

import json

import pytest
import torch
from typer.testing import CliRunner

from velora_cli import models
from velora_cli.cli import app
from velora_cli.models import ModelError, build_model, resolve_model
from velora_cli.models import weights as checkpoint

runner = CliRunner()
# few rows and candidates: baseline, gc, VeLoRA paper (and + gc); 2 x 32 tokens
SMALL = ["--batch-size", "2", "--seq-len", "32", "--placements", "paper", "--num-groups", "32",
         "--gc-every", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))


@pytest.fixture
def saved(tmp_path):
    """(directory, state dict) of a tiny Llama written by save_pretrained (safetensors)."""
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=256, max_position_embeddings=256)
    with torch.no_grad():
        model.lm_head.weight.fill_(0.125)  # far from any seeded random init
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def built(monkeypatch):
    """Every model velora builds during a command: (device, weights, its parameters as built,
    before any step trains them)."""
    seen = []
    real = models.build_model

    def spy(spec, *, device="cpu", **kwargs):
        model = real(spec, device=device, **kwargs)
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen.append((str(device), kwargs.get("weights"), snapshot))
        return model

    monkeypatch.setattr(models, "build_model", spy)
    return seen


def assert_holds(model_or_state, state):
    built = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    for name, tensor in built.items():
        assert torch.equal(tensor, state[name]), f"{name} is not the checkpoint's"


def test_profile_with_weights_on_cpu_uses_the_checkpoint(saved, built):
    path, state = saved
    result = runner.invoke(
        app,
        [
            "profile",
            str(path),
            "--weights",
            "--backend",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--no-velora-gc",
            *SMALL,
            "--format",
            "json",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert f"--weights: {path / 'model.safetensors'} (safetensors), loaded" in result.stderr
    loaded = [m for device, weights, m in built if weights]
    assert len(loaded) == 3 and all(device == "cpu" for device, weights, _ in built if weights)
    for snapshot in loaded:  # every row's model started from the checkpoint
        assert_holds(snapshot, state)
    assert "Loading weights" not in result.stderr  # transformers' bar would interleave
    # meta builds (validation, defaults) took shapes from the config, without weights
    assert any(device == "meta" and not weights for device, weights, _ in built)


def test_tune_with_weights_on_cpu_probes_the_checkpoint(saved, built):
    path, state = saved
    result = runner.invoke(
        app,
        [
            "tune",
            str(path),
            "--weights",
            "--backend",
            "cpu",
            "--budget",
            "1GB",
            "--mode",
            "full",
            "--optimizer",
            "adamw",
            "--micro-batches",
            "2",
            "--probe-steps",
            "2",
            "--max-measured",
            "2",
            *SMALL,
            "--format",
            "json",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["recommendation"] is not None
    assert any(n.startswith(f"--weights: {path / 'model.safetensors'}") for n in doc["notices"])
    assert doc["probe"]["baselines"] and doc["probe"]["note"] is None  # not from scratch
    loaded = [m for device, weights, m in built if weights]
    assert len(loaded) >= 3  # measured candidates, probes, verification: each from the checkpoint
    assert all(device == "cpu" for device, weights, _ in built if weights)
    for snapshot in loaded:
        assert_holds(snapshot, state)


def test_estimate_with_weights_says_nothing_is_loaded(saved):
    path, _ = saved
    result = runner.invoke(
        app, ["profile", str(path), "--weights", "--backend", "estimate", *SMALL]
    )
    assert result.exit_code == 0, result.output
    assert "is not loaded: the estimate holds shapes only" in result.stderr


def test_tune_with_weights_of_a_built_in_is_one_error():
    result = runner.invoke(
        app, ["tune", "llama-tiny", "--weights", "--backend", "cpu", "--budget", "1GB", *SMALL]
    )
    assert result.exit_code == 1
    assert "error: built-in architectures have no weights (llama-tiny)" in result.stderr
    assert "] measure" not in result.stderr  # refused before any candidate


def test_a_directory_without_a_checkpoint_fails_before_any_row(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "cfg"
    )
    result = runner.invoke(
        app, ["profile", str(tmp_path / "cfg"), "--weights", "--backend", "cpu", *SMALL]
    )
    assert result.exit_code == 1
    assert "holds no checkpoint (model.safetensors" in result.stderr
    assert "measuring" not in result.stderr


def _bin_only(path, state, tmp_path, name, extra=None):
    import shutil

    target = tmp_path / name
    shutil.copytree(path, target)
    (target / "model.safetensors").unlink()
    torch.save({**state, **(extra or {})}, target / "pytorch_model.bin")
    return target


class _RunsCode:
    """A pickle that would run code on load (what weights_only=True refuses)."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_loads_only_with_weights_only(saved, tmp_path, capsys):
    path, state = saved
    plain = _bin_only(path, state, tmp_path, "plain")
    assert checkpoint.weight_file(plain)[0] == "pickle"
    assert_holds(build_model(resolve_model(str(plain)), weights=True), state)

    unsafe = _bin_only(path, state, tmp_path, "unsafe", extra={"x": _RunsCode()})
    with pytest.raises(ModelError) as info:
        build_model(resolve_model(str(unsafe)), weights=True)
    message = str(info.value)
    assert "torch.load(weights_only=True) refuses" in message and "\n" not in message
    assert "this ran" not in capsys.readouterr().out  # its code never ran
    result = runner.invoke(app, ["profile", str(unsafe), "--weights", "--backend", "cpu", *SMALL])
    assert result.exit_code == 1 and "torch.load(weights_only=True) refuses" in result.stderr


def test_safetensors_are_preferred_over_a_pickle(saved):
    path, state = saved
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save(other, path / "pytorch_model.bin")  # both files: different values
    assert checkpoint.weight_file(path) == ("safetensors", path / "model.safetensors")
    assert_holds(build_model(resolve_model(str(path)), weights=True), state)
