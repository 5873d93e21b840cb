"""VeloraCallback in real Trainer runs on CPU: the plan checked, the run recorded beside it."""

import dataclasses
import importlib.util
import json
import warnings

import pytest
import torch

from velora_cli import VeloraCallback, apply_config, load_run
from velora_cli.configs import VeloraConfig
from velora_cli.runs.callback import PlanMismatchWarning
from velora_cli.search import autotune

SEQ = 32


def tuned(mode="full", placement="paper", gc=False, micro=2, accum=2, trainer="hf",
          **fields) -> VeloraConfig:  # fmt: skip
    """A plan as a tune records it (layers built on meta), with the cpu backend's peak."""
    from velora_cli.measure.cpu import CpuBackend
    from velora_cli.measure.train_step import StepSpec, Strategy

    settings = autotune.TuneSettings("llama-tiny", budget_bytes=10**9, backend="cpu")
    rec = dict(mode=mode, placement=placement, num_groups=4 if placement else None, gc=gc,
               micro_batch_size=micro, grad_accum_steps=accum, optimizer="adamw")  # fmt: skip
    found = autotune._layers_of(settings, rec)
    spec = StepSpec("llama-tiny", batch_size=micro * accum, seq_len=SEQ, grad_accum_steps=accum,
                    mode=mode, strategy=Strategy(placement, 4 if placement else None, gc=gc),
                    trainer=trainer)  # fmt: skip
    row = CpuBackend(steps=1).measure(spec)
    config = dict(model="llama-tiny", mode=mode, placement=placement,
                  num_groups=4 if placement else None, layers=found["velora_layers"] or None,
                  lora_layers=found["lora_layers"], lora_rank=8 if mode != "full" else None,
                  lora_targets="all-linear" if mode != "full" else None, gc=gc,
                  micro_batch_size=micro, grad_accum_steps=accum, seq_len=SEQ, task="causal-lm",
                  peak_bytes=row["peak_bytes"], tokens_per_second=row["tokens_per_second"],
                  backend="cpu", trainer=trainer)  # fmt: skip
    return VeloraConfig(**{**config, **fields})


def tiny():
    from velora_cli.models import build_model, resolve_model

    return build_model(resolve_model("llama-tiny"), device="cpu", dtype=torch.float32)


def data(n=24):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 1024, (SEQ,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    return rows


def train(model, callback, tmp_path, micro=2, accum=2, steps=4, evaluate=False, **args):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=steps, logging_steps=2, report_to="none",
        save_strategy="no", use_cpu=True, optim="adamw_torch", disable_tqdm=True,
        **({"eval_strategy": "steps", "eval_steps": 2} if evaluate else {}), **args,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=[callback],
                      eval_dataset=data(4) if evaluate else None)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [w for w in caught if issubclass(w.category, PlanMismatchWarning)]


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    return tmp_path / "profiles"


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """One Trainer run of a model prepared as planned (apply_config), its record on disk."""
    tmp = tmp_path_factory.mktemp("run")
    config = tuned()
    model = tiny()
    apply_config(model, config)
    callback = VeloraCallback(config, path=tmp / "profiles" / "run-llama-tiny-test.json")
    trainer, mismatch = train(model, callback, tmp)
    return config, callback, trainer, mismatch


def test_a_prepared_run_matches_its_plan_and_is_recorded(prepared_run):
    import velora_cli

    assert velora_cli.VeloraCallback is VeloraCallback  # the public, lazily imported name
    config, callback, trainer, mismatch = prepared_run
    assert mismatch == [] and callback.mismatches == []
    record = load_run(callback.path)
    assert record["kind"] == "velora-run" and record["status"] == "finished"
    assert record["device"] == "cpu" and len(record["intervals"]) == 2
    assert record["observed"]["micro_batch_size"] == 2 and record["observed"]["gc_every"] is None
    assert len(record["observed"]["velora_layers"]) == len(config.layers)
    last = record["intervals"][-1]
    assert last["tokens"] == 2 * 2 * 2 * SEQ  # 2 steps of 2 × 2 sequences
    assert last["memory"]["rss_peak_bytes"] > 0 and last["seq_len_max"] == SEQ
    # the Trainer's own step, tracked as the cpu backend tracks its step: the plan's peak
    vs = last["versus"]["tensor_peak_bytes"]
    assert vs["predicted"] == config.peak_bytes and abs(vs["relative_error"]) < 0.02, vs
    summary = record["summary"]["versus"]
    assert abs(summary["tensor_peak_bytes"]["relative_error"]) < 0.02
    assert not summary["rss_peak_bytes"]["like_for_like"]
    assert record["summary"]["tokens_per_second"] > 0
    # logged beside the Trainer's own figures, and one line per interval on stderr
    logged = [h for h in trainer.state.log_history if "velora/tensor_peak_bytes" in h]
    assert len(logged) == 2 and "velora/tensor_peak_bytes_vs_plan" in logged[0]
    assert "velora/rss_peak_bytes_vs_plan" not in logged[0]  # RSS is not like for like
    line = callback.line(last)
    assert line.startswith("velora step 4: tracked tensors") and "peak RSS (whole process)" in line


def test_profile_compare_shows_the_run_beside_the_prediction(prepared_run, monkeypatch):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    _, callback, _, _ = prepared_run
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(callback.path.parent))
    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--compare", "latest", "--backend", "estimate",
                                 "--format", "json", "--no-save"])  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["kind"] == "velora-run-comparison" and document["backend"] == "estimate"
    assert document["spec"]["grad_accum_steps"] == 2 and document["spec"]["seq_len"] == SEQ
    rows = {r["figure"]: r for r in document["rows"]}
    tensor = rows["tensor_peak_bytes"]  # the meta estimate of the step the Trainer ran
    assert tensor["predicted"] == document["row"]["peak_bytes"]
    assert abs(tensor["relative_error"]) < 0.02 and abs(tensor["plan_error"]) < 0.02, tensor
    assert not rows["rss_peak_bytes"]["like_for_like"]
    table = runner.invoke(app, ["profile", "--compare", str(callback.path), "--backend",
                                "estimate", "--no-save"])  # fmt: skip
    assert table.exit_code == 0 and "tracked tensor peak" in table.stdout
    assert "not like for like" in table.stdout
    refused = runner.invoke(app, ["profile", "--compare", "latest", "-b", "8"])
    assert refused.exit_code == 1
    assert "--compare predicts what the run ran, so --batch-size cannot change it" in refused.stderr


def test_profile_compare_without_a_record(tmp_path):
    from typer.testing import CliRunner

    from velora_cli.cli import app

    result = CliRunner().invoke(app, ["profile", "--compare", "latest"])
    assert result.exit_code == 1 and "no run record under" in result.stderr
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"kind": "velora-tune"}))
    result = CliRunner().invoke(app, ["profile", "--compare", str(tune)])
    assert result.exit_code == 1 and "not a velora run record" in result.stderr


def test_the_mismatch_warning_fires_when_the_model_was_not_prepared(tmp_path, profiles):
    config = tuned(gc=True)
    callback = VeloraCallback(config)
    _, mismatch = train(
        tiny(), callback, tmp_path, micro=4, accum=1, evaluate=True
    )  # no apply_config
    assert len(mismatch) == 1
    message = str(mismatch[0].message)
    assert "VeLoRA: 0 of 4 planned layers are wrapped" in message
    assert "checkpointing: the plan has every layer, the model has none" in message
    assert "per_device_train_batch_size=4, the plan 2" in message
    record = load_run(next(profiles.glob("run-*.json")))
    assert len(record["mismatches"]) == 4  # VeLoRA, checkpointing, micro-batch, accumulation
    # evaluations are recorded apart from the training intervals
    assert [e["step"] for e in record["evaluations"]] == [2, 4]
    assert all(e["memory"]["rss_peak_bytes"] > 0 for e in record["evaluations"])
    assert len(record["intervals"]) == 2 and record["intervals"][-1]["step"] == 4


def test_checks_on_bare_models():
    import peft

    from velora_cli.runs.plan_check import mismatches, observe

    config = tuned("lora", "all-linear", gc=2)
    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, target_modules="all-linear"))
    found = mismatches(config, observe(model))
    assert any("LoRA rank [4], the plan 8" in m for m in found)
    assert any("checkpointing: the plan has every 2 layers, the model has none" in m for m in found)
    model.get_base_model().activation_checkpointing_enable(every_n_layers=2)
    assert observe(model)["gc_every"] == 2
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert any("optimizer: SGD, the plan measured adamw" in m
               for m in mismatches(config, observe(model, optimizer=sgd)))  # fmt: skip
    # a 4-bit base with bf16 adapters (what TRL's SFTTrainer makes of QLoRA) against a QLoRA plan
    qlora = dataclasses.replace(config, mode="qlora", placement=None, num_groups=None, layers=None)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    found = mismatches(qlora, observe(model))
    assert any("the base is not 4-bit" in m for m in found)
    assert any("trained parameters are bf16, the plan measured fp32" in m for m in found)


def test_run_records_are_checked_when_read(tmp_path):
    from velora_cli.runs.record import RunRecordError

    with pytest.raises(FileNotFoundError, match="no run record at"):
        load_run(tmp_path / "nope.json")
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"kind": "velora-tune"}))
    with pytest.raises(RunRecordError, match="not a velora run record.*a tune document"):
        load_run(tune)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL")
def test_the_trl_export_reproduces_the_plan_under_sft_trainer(tmp_path, profiles):
    import peft
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from velora_cli.exports import export

    words = [f"w{i}" for i in range(1000)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="</s>", pad_token="<pad>")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    text = [
        " ".join(words[j] for j in torch.randint(0, 1000, (40,), generator=gen)) for _ in range(8)
    ]
    for placement in ("all-linear", "paper"):  # PEFT's VeLoRA, then velora's on the peft model
        plan = tuned("lora", placement, gc=True, micro=2, accum=1, trainer="trl")
        exported = export("trl", plan).data
        model = tiny()
        peft_config = peft.LoraConfig(**exported["peft_config"])
        if exported["apply_velora"]:
            model = peft.get_peft_model(model, peft_config)
            apply_config(model, exported["velora"], checkpointing=False)
            peft_config = None
        callback = VeloraCallback(exported["velora"])
        args = SFTConfig(output_dir=str(tmp_path / placement), **exported["sft_config"],
                         max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
                         use_cpu=True, disable_tqdm=True)  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": text}),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[callback])  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert not [w for w in caught if issubclass(w.category, PlanMismatchWarning)], placement
        seen = callback.record["observed"]["velora_layers"]
        assert {e["by"] for e in seen.values()} == {
            "peft" if placement == "all-linear" else "velora"
        }
        assert callback.record["observed"]["gc_every"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_records_allocator_and_device_peaks(tmp_path):
    from transformers import Trainer, TrainingArguments

    config = tuned()  # a cpu plan: its allocated prediction is the tracked tensor peak
    model = tiny().cuda()
    apply_config(model, config)
    callback = VeloraCallback(config, path=tmp_path / "run.json")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=4, logging_steps=2,
                             report_to="none", save_strategy="no", optim="adamw_torch")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data(), callbacks=[callback]).train()
    record = load_run(callback.path)
    assert record["device"] == "cuda" and callback.mismatches == []
    memory = record["intervals"][-1]["memory"]
    assert 0 < memory["allocated_bytes"] <= memory["reserved_bytes"]
    if memory["device_used_bytes"] is not None:  # NVML: the whole device, context included
        assert memory["device_used_bytes"] >= memory["reserved_bytes"]
    assert "allocated_bytes" in record["summary"]["versus"]
    assert "tensor_peak_bytes" not in memory  # the allocator counts on CUDA


def test_velora_plot_draws_a_run_record(prepared_run, tmp_path):
    pytest.importorskip("matplotlib")
    from html.parser import HTMLParser

    from typer.testing import CliRunner

    from velora_cli.cli import app
    from velora_cli.plots.run import predictions, series

    _, callback, _, _ = prepared_run
    record = load_run(callback.path)
    # the tracked tensor peak per interval, and its plan as the like-for-like prediction
    assert [step for step, _ in series(record)["tensor_peak_bytes"]] == [2, 4]
    assert set(predictions(record)) == {"tensor_peak_bytes"}  # RSS is not like for like
    runner = CliRunner()
    for suffix in ("png", "svg", "html"):
        out = tmp_path / f"run.{suffix}"
        result = runner.invoke(app, ["plot", str(callback.path), "-o", str(out)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "run.html").read_text()
    HTMLParser().feed(page)
    assert "<svg" in page and "tracked tensor peak" in page and "vs plan" in page
    # steps are whole numbers: the step axes have integer ticks only (issue 28: 2.5)
    from velora_cli.plots.run import run_figure
    from velora_cli.plots.style import style

    with style():
        figure = run_figure(record)
    figure.canvas.draw()
    for axes in figure.axes:
        if "training step" in axes.get_xlabel():
            ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # what velora plot cannot draw says what it is and what to pass
    journal = tmp_path / "tune-x.jsonl"
    journal.write_text('{"v": 1, "stage": "header", "context": {}}\n{"v": 1}\n')
    result = runner.invoke(app, ["plot", str(journal), "-o", str(tmp_path / "j.png")])
    assert result.exit_code == 1 and "is a tune journal" in result.stderr
    assert "plot the tune document that names it" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["export-config", "--from", str(callback.path)])
    assert result.exit_code == 1
    said = " ".join(result.stderr.split())
    assert "this is a run record (VeloraCallback's), not a tune document" in said
    assert f"velora profile --compare {callback.path}" in said


def test_the_trainer_export_states_its_figures_and_its_snippet_runs_alone(tmp_path, monkeypatch):
    """Issue 28 item 6: --format trainer stated no measured figures, its LoRA snippet loaded a
    velora-config.json that the export does not write, and it left out VeloraCallback."""
    from velora_cli.exports import export

    plan = tuned("lora", "paper", gc=2, micro=2, accum=2, budget_bytes=10**9,
                 source="tune-x.json")  # fmt: skip
    result = export("trainer", plan)
    doc = result.data
    assert doc["measured"] == {
        "peak_bytes": plan.peak_bytes, "allocated_bytes": None,
        "tokens_per_second": plan.tokens_per_second, "backend": "cpu", "budget_bytes": 10**9,
        "source": "tune-x.json",
    }  # fmt: skip
    assert result.notes[0].startswith("planned: peak ") and "on the cpu backend" in result.notes[0]
    assert "budget 953.67 MiB, from tune-x.json" in result.notes[0]
    snippet = doc["snippet"]
    assert "velora-config.json" not in snippet and "VeloraCallback(export[" in snippet
    assert 'build_model("llama-tiny"' in snippet and "from_pretrained" not in snippet
    monkeypatch.chdir(tmp_path)  # nothing here but the export itself
    (tmp_path / "trainer.json").write_text(json.dumps(doc))
    code = snippet.replace('output_dir="out"', 'output_dir="out", max_steps=2, logging_steps=2, '
                           'report_to="none", use_cpu=True, disable_tqdm=True')  # fmt: skip
    namespace = {"train_dataset": data()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "snippet", "exec"), namespace)
    assert not [w for w in caught if issubclass(w.category, PlanMismatchWarning)]
    [callback] = [c for c in namespace["trainer"].callback_handler.callbacks
                  if isinstance(c, VeloraCallback)]  # fmt: skip
    assert callback.record["status"] == "finished" and callback.mismatches == []


def test_a_plan_for_another_model_is_caught_named_and_compared_with_what_trained(
    tmp_path, profiles, monkeypatch
):
    """Issue 28 item 2: a llama-60m plan applied to llama-tiny gave no warning, a record named
    llama-60m, and --compare predicted llama-60m."""
    from typer.testing import CliRunner

    from velora_cli import build_model
    from velora_cli.cli import app

    plan = VeloraConfig(model="llama-60m", micro_batch_size=2, grad_accum_steps=2, seq_len=SEQ,
                        task="causal-lm", peak_bytes=700 * 2**20, backend="cpu")  # fmt: skip
    callback = VeloraCallback(plan)
    _, caught = train(build_model("llama-tiny"), callback, tmp_path)
    [warning] = caught
    text = str(warning.message)
    assert "model: the run trains llama-tiny LlamaForCausalLM (hidden 64, 2 layers" in text
    assert "the plan llama-60m LlamaForCausalLM (hidden 512" in text
    assert "differs in hidden_size, num_hidden_layers" in text
    record = load_run(callback.path)
    assert record["model"] == "llama-tiny" and record["planned_model"] == "llama-60m"
    assert callback.path.name.startswith("run-llama-tiny-")
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(callback.path.parent))
    result = CliRunner().invoke(app, ["profile", "--compare", str(callback.path), "--backend",
                                      "estimate", "--format", "json", "--no-save"])  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["spec"]["model"] == "llama-tiny"
    tensor = {r["figure"]: r for r in document["rows"]}["tensor_peak_bytes"]
    assert abs(tensor["relative_error"]) < 0.05, tensor  # against the model that trained
    result = CliRunner().invoke(app, ["profile", "llama-60m", "--compare", str(callback.path)])
    assert result.exit_code == 1 and "is not the run's model 'llama-tiny'" in result.stderr


def test_world_size_sharding_and_step_are_checked():
    from types import SimpleNamespace

    from velora_cli.runs.plan_check import mismatches, observe

    fsdp = VeloraConfig(model="llama-tiny", micro_batch_size=2, world_size=2, parallel="fsdp")
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           world_size=1, bf16=False, fp16=False)  # fmt: skip
    found = mismatches(fsdp, observe(tiny(), args))
    assert any(m.startswith("world size: the run has 1 process, the plan 2 (fsdp)") for m in found)
    two = SimpleNamespace(**{**vars(args), "world_size": 2})  # 2 ranks, but not sharded (DDP)
    found = mismatches(fsdp, observe(tiny(), two))
    assert not any(m.startswith("world size") for m in found)
    assert any(m.startswith("sharding: the plan shards parameters with FSDP2") for m in found)
    # a plan of the hf step under TRL's fused head
    if importlib.util.find_spec("trl"):
        from trl.trainer.utils import add_fused_lm_head

        model = tiny()
        add_fused_lm_head(model, outputs=("log_probs",))
        one = VeloraConfig(model="llama-tiny", micro_batch_size=2)
        assert any("step: the run computes the trl step, the plan measured the hf step" in m
                   for m in mismatches(one, observe(model, args)))  # fmt: skip
        planned = dataclasses.replace(one, trainer="trl")
        assert mismatches(planned, observe(model, args)) == []
    assert mismatches(VeloraConfig(model="llama-tiny", micro_batch_size=2),
                      observe(tiny(), args)) == []  # fmt: skip
