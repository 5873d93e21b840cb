"""The examples of the README and the docs/ pages, run as written: their Python blocks on a tiny
model, and every `velora ...` command line parsed by the real command (options and values it
accepts)."""

import re
import shlex
from pathlib import Path

import pytest
import typer
from click.exceptions import UsageError

from velora_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> list[str]:
    """The fenced ``language`` blocks of README.md and docs/*.md, in order."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found += re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return found


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README links no {page.name}"


def block_with(language: str, needle: str) -> str:
    (found,) = [b for b in blocks(language) if needle in b]
    return found


@pytest.fixture
def model():
    """A tiny Llama whose down projection is as wide as llama-60m's (1376 = 32 · 43), so the
    README's sizes (num_groups=32, M=344 on down_proj) fit it as they fit the models it names."""
    from conftest import tiny_llama

    return tiny_llama(intermediate_size=1376)


def test_python_api_block_runs_in_order(model):
    code = block_with("python", "apply_velora")
    namespace = {"model": model}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    # its last statement wrapped the down projections with M = 344
    assert namespace["names"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert model.model.layers[0].mlp.down_proj.sub_token_size == 344
    assert type(model.model.layers[0].self_attn.v_proj).__name__ == "Linear"  # removed before


def test_python_api_says_when_a_layer_is_wrapped_already(model):
    from velora_cli import apply_velora, remove_velora
    from velora_cli.methods.placement import PlacementError

    apply_velora(model, layers="paper", num_groups=32)
    with pytest.raises(PlacementError, match=r"VeLoRA layers already .*remove_velora\(model\)"):
        apply_velora(model, layers=["*.mlp.down_proj"], sub_token_size={"*.down_proj": 344})
    assert model.model.layers[0].mlp.down_proj.sub_token_size == 43  # left as it was
    assert len(remove_velora(model)) == 4


def test_apply_config_block_runs(model, tmp_path, monkeypatch):
    from velora_cli.configs import VeloraConfig

    monkeypatch.chdir(tmp_path)
    config = VeloraConfig(model="llama-tiny", placement="paper", num_groups=32, gc=True)
    Path("velora-config.json").write_text(__import__("json").dumps(config.to_dict()))
    namespace = {"model": model}
    block = block_with("python", "# wraps the recommended layers")
    exec(compile(block, "README.md (export)", "exec"), namespace)
    assert model.model.layers[1].mlp.down_proj.sub_token_size == 43


def test_callback_block_runs_with_a_tiny_model_in_place_of_the_hub_one(tmp_path, monkeypatch):
    """The Trainer example as written; only the hub download and the dataset are stand-ins."""
    import torch
    import transformers
    from conftest import tiny_llama

    from velora_cli.configs import VeloraConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    config = VeloraConfig(model="llama-tiny", mode="lora", lora_rank=32,
                          lora_targets="q_proj,v_proj", placement="qkv", num_groups=4,
                          micro_batch_size=4, grad_accum_steps=2)  # fmt: skip
    Path("velora-config.json").write_text(__import__("json").dumps(config.to_dict()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: tiny_llama())  # fmt: skip
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    train_dataset = [{"input_ids": row, "labels": row} for row in ids]
    namespace = {"train_dataset": train_dataset}
    exec(compile(block_with("python", "VeloraCallback"), "README.md (callback)", "exec"), namespace)
    (record,) = (tmp_path / "profiles").glob("run-*.json")
    assert "velora-run" in record.read_text()


def command_lines() -> list[str]:
    """Every `velora ...` command in the README's bash blocks (continuations joined, comments
    and what follows `&&` dropped)."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("velora"):
                    found.append(part)
    return found


def test_readme_has_commands_to_check():
    assert len(command_lines()) >= 12


@pytest.mark.parametrize("line", command_lines())
def test_readme_command_parses(line):
    group = typer.main.get_command(app)
    name, *args = shlex.split(line)[1:]
    try:
        with group.make_context("velora", [], resilient_parsing=False) as ctx:
            command = group.get_command(ctx, name)
            assert command is not None, f"the docs name no such command: {line}"
            command.make_context(name, args, parent=ctx)  # parses options and values, runs nothing
    except UsageError as exc:
        pytest.fail(f"a documented command does not parse: {line}: {exc.format_message()}")


def test_the_7b_optimizer_example_has_the_shapes_its_text_describes():
    (line,) = [c for c in command_lines() if "adarankgrad --rank 1024" in c]
    assert "--batch-size 1 --seq-len 2048" in line and "--dtype bf16" in line
