"""The tune glue on llama-tiny: candidate → step, backends, probes, journal and resume."""

import dataclasses
import json

import pytest

from velora_cli import report
from velora_cli.report.progress import TuneProgress
from velora_cli.search import autotune
from velora_cli.search.estimator import measurement_of
from velora_cli.search.tuner import Candidate, Journal

TINY = dict(model="llama-tiny", batch_size=4, seq_len=128)
# baseline, gc, VeLoRA paper, VeLoRA paper + gc: the micro-batch is the whole batch, so only
# checkpointing or VeLoRA can lower the peak (AdamW only, the default of TuneSettings)
SMALL_SPACE = dict(placements=("paper",), gc_every=(), micro_batches=(4,))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Real steps of a tiny model on one thread: with two threads on a 2-core machine that
    something else is also using, each of the step's many small parallel regions waits for a
    descheduled thread, and a 20 ms step becomes 1.3 s (measured here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**overrides) -> autotune.TuneSettings:
    # estimates are device-level (CUDA context included): 2 GB fits llama-tiny
    fields = dict(TINY, budget_bytes=2 * 10**9, backend="estimate", probe_steps=0, **SMALL_SPACE)
    fields.update(overrides)
    return autotune.TuneSettings(**fields)


def test_candidate_maps_to_the_step_it_describes():
    from velora_cli.measure.train_step import Strategy

    base = settings().base_spec()
    c = Candidate("lora", "paper", 16, gc=2, micro_batch_size=2, grad_accum_steps=2)
    spec = autotune.candidate_spec(base, c)
    assert (spec.batch_size, spec.grad_accum_steps, spec.mode) == (4, 2, "lora")
    assert spec.strategy == Strategy(placement="paper", num_groups=16, gc=2)
    assert spec.seq_len == 128 and spec.model == "llama-tiny"


def test_low_rank_settings_reach_every_candidate_step():
    s = settings(optimizers=autotune.DEFAULT_OPTIMIZERS, rank=8, update_gap=50, eta=0.8)
    spec = autotune.candidate_spec(s.base_spec(), Candidate(optimizer="adarankgrad"))
    assert (spec.optimizer, spec.rank, spec.update_gap, spec.eta) == ("adarankgrad", 8, 50, 0.8)
    assert spec.optimizer_label == "adarankgrad r≤8 η=0.8 T=50"
    # the defaults are those of the optimizers and of a profile's step
    from velora_cli.measure.train_step import StepSpec
    from velora_cli.methods import lowrank

    assert (settings().update_gap, settings().eta) == (StepSpec("m").update_gap, StepSpec("m").eta)
    assert (settings().update_gap, settings().eta) == (
        lowrank.DEFAULT_UPDATE_GAP,
        lowrank.DEFAULT_ETA,
    )


def test_space_tries_low_rank_optimizers_in_full_mode_only():
    from velora_cli.measure.train_step import SpecError

    s = settings(modes=("full", "lora"), optimizers=autotune.DEFAULT_OPTIMIZERS, placements=())
    space, notices = autotune.build_space(s)
    assert {(c.mode, c.optimizer) for c in space} == {
        ("full", "adamw_torch_fused"), ("full", "adamw"), ("full", "galore"),
        ("full", "adarankgrad"), ("lora", "adamw_torch_fused"), ("lora", "adamw"),
    }  # fmt: skip
    assert notices == []
    space, notices = autotune.build_space(dataclasses.replace(s, optimizers=("galore",)))
    assert {c.mode for c in space} == {"full"}
    assert notices == ["lora: not tried, --optimizer galore needs --mode full"]
    with pytest.raises(SpecError, match="add full to --mode, or adamw to --optimizer"):
        dataclasses.replace(s, modes=("lora",), optimizers=("galore",)).base_spec()


def test_static_floor_of_each_optimizer_bounds_its_estimates():
    """The Estimator's lower bound per (mode, optimizer): params + grads + optimizer state of the
    first estimate is below every estimated peak of that optimizer (adarankgrad: at its cap)."""
    s = settings(optimizers=autotune.DEFAULT_OPTIMIZERS, placements=(), rank=8)
    space, _ = autotune.build_space(s)
    estimator = autotune.Estimator(s)
    peaks = {c.key: estimator(c).peak_bytes for c in space}
    floors = estimator.floors
    assert set(floors) == {("full", o) for o in autotune.DEFAULT_OPTIMIZERS}
    for c in space:
        assert floors[(c.mode, c.optimizer)] <= peaks[c.key], c.key
    # at the rank cap AdaRankGrad holds what GaLore holds (moments, basis, masses)
    assert floors[("full", "galore")] == floors[("full", "adarankgrad")] < floors[("full", "adamw")]


def test_probe_of_a_low_rank_candidate_is_compared_with_adamw():
    from velora_cli.search.probes import DEFAULT_LR, compare

    s = settings(optimizers=autotune.DEFAULT_OPTIMIZERS, probe_steps=2)
    prober = autotune.Prober(s, journal=None)
    probe = prober(Candidate(optimizer="galore"))
    (key, baseline), *others = prober.baselines.items()
    assert key == "full adamw" and others == []
    assert (baseline["optimizer"], baseline["strategy"]) == ("adamw", "baseline")
    detail = prober.detail(Candidate(optimizer="galore"))
    trained = detail["training"]
    assert trained["optimizer"] == "galore" and trained["lr"] == DEFAULT_LR["galore"]
    assert baseline["lr"] == DEFAULT_LR["adamw"]
    assert probe.loss_increase == compare(trained, baseline)
    assert probe.grad_cosine_min is None and detail["fidelity"] is None  # exact gradients
    # with VeLoRA: the same AdamW baseline (not run again), and the gradient fidelity
    with_velora = prober(Candidate("full", "paper", 32, optimizer="adarankgrad"))
    assert list(prober.baselines) == ["full adamw"] and prober.calls == 3
    assert with_velora.grad_cosine_min is not None


def test_space_drops_sub_token_choices_that_fit_only_some_layers():
    # 3 groups divide down_proj's 192 inputs but not v_proj's 64
    space, notices = autotune.build_space(settings(num_groups=(32, 3)))
    assert {c.num_groups for c in space if c.placement} == {32}
    assert len(notices) == 1 and "g3: not tried" in notices[0] and "v_proj" in notices[0]


def test_cuda_rows_are_judged_by_the_device_level_peak():
    from velora_cli.measure.train_step import StepSpec

    row = {"status": "ok", "peak_bytes": 100, "device_used_bytes": 180, "step_seconds": 0.1,
           "tokens_per_second": 10.0, "backend": "cuda", "wrapped_layers": 4}  # fmt: skip
    m = measurement_of(row, StepSpec("llama-tiny"), use_device_peak=True)
    assert m.peak_bytes == 180 and m.detail["allocator_peak_bytes"] == 100
    # where NVML lists the worker, its own usage counts (not another process's context)
    m = measurement_of({**row, "process_used_bytes": 150}, StepSpec("llama-tiny"), True)
    assert m.peak_bytes == 150 and m.detail["peak_source"].startswith("process_used_bytes")
    assert m.detail["velora_layers"] == 4 and m.detail["strategy"] == "baseline"
    m = measurement_of({**row, "status": "error", "error": "x"}, StepSpec("m"), False)
    assert m.status == "error" and m.peak_bytes is None


def test_progress_says_what_runs_how_many_and_eta():
    lines = []
    progress = TuneProgress(lines.append)
    progress("measure a", 0, 3)
    progress("measure b", 1, 3)
    progress("verify a", 2, 2)
    assert lines[0].startswith("[1/3] measure a (") and "elapsed" in lines[0]
    assert lines[1].startswith("[2/3] measure b") and "eta" in lines[1]


@pytest.fixture(scope="module")
def cpu_peaks():
    """Measured peaks of baseline and full checkpointing of the tiny step on the cpu backend."""
    from velora_cli.measure.cpu import CpuBackend
    from velora_cli.measure.train_step import StepSpec, Strategy

    spec = StepSpec(**TINY)
    backend = CpuBackend(steps=1)
    base = backend.measure(spec)["peak_bytes"]
    gc = backend.measure(spec.with_strategy(Strategy(gc=True)))["peak_bytes"]
    assert gc < base
    return gc, base


def test_end_to_end_cpu_tune_recommends_a_measured_configuration_under_budget(tmp_path, cpu_peaks):
    gc_peak, base_peak = cpu_peaks
    budget = (gc_peak + base_peak) // 2
    s = settings(backend="cpu", budget_bytes=budget, probe_steps=2)
    path, journal_path = autotune.new_paths(s.model, tmp_path)
    journal = Journal(journal_path, context=s.context())
    doc = autotune.run(s, save_path=path, journal=journal)

    rec = doc["recommendation"]
    assert rec is not None, doc["reason"]
    assert rec["placement"] or rec["gc"], "the budget forces VeLoRA or checkpointing"
    assert rec["status"] == "ok" and rec["verify_status"] == "ok" and rec["backend"] == "cpu"
    assert rec["peak_bytes"] <= doc["limit_bytes"] < budget < base_peak
    assert rec["budget_bytes"] == budget and "verification run peaked" in rec["reason"]
    # the document: saved, with the journal beside it, and each candidate a profile-like row
    assert json.loads(path.read_text())["recommendation"]["key"] == rec["key"]
    assert journal_path == path.with_suffix(".jsonl") and journal_path.is_file()
    chosen = next(r for r in doc["candidates"] if r["status"] == "chosen")
    for field in ("label", "strategy", "activation_bytes", "micro_batch_size",
                  "grad_accum_steps", "mode", "loss_increase"):  # fmt: skip
        assert field in chosen
    probed = [r for r in doc["candidates"] if r.get("loss") is not None]
    for row in probed:  # VeLoRA candidates that fit were probed against the baseline
        assert row["placement"] and row["grad_cosine_min"] is not None
    assert doc["probe"]["baselines"]["full adamw"]["loss"] > 0 if probed else True


class CountingBackend:
    """The estimate backend, counting calls; raises KeyboardInterrupt at call ``stop_at``."""

    name = "cpu"

    def __init__(self, stop_at=None):
        from velora_cli.estimate.backend import EstimateBackend

        self.inner, self.stop_at, self.keys = EstimateBackend(), stop_at, []

    def measure(self, spec, breakdown=False):
        if self.stop_at is not None and len(self.keys) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.keys.append((spec.strategy, spec.grad_accum_steps, spec.optimizer))
        row = self.inner.measure(spec)
        return {**row, "backend": "cpu", "step_seconds": 1.0, "tokens_per_second": 512.0}


def test_interrupted_tune_resumes_without_redoing_finished_candidates(tmp_path):
    s = settings(backend="cpu", budget_bytes=10**9, micro_batches=(4, 2), probe_steps=1)
    path, journal_path = autotune.new_paths(s.model, tmp_path)
    first = CountingBackend(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        autotune.run(s, save_path=path, journal=Journal(journal_path, context=s.context()),
                     backend=first)  # fmt: skip
    assert len(first.keys) == 2 and not path.exists()

    second = CountingBackend()
    journal = autotune.resume_journal(journal_path, s)
    doc = autotune.run(s, save_path=path, journal=journal, backend=second)
    measured = [r for r in doc["candidates"] if r["measure_status"]]
    assert len(measured) > 2 and doc["recommendation"] is not None and path.is_file()
    *search, verify = second.keys
    assert len(search) == len(measured) - 2  # the two finished before Ctrl-C are not redone
    assert not set(first.keys) & set(search)
    assert doc["calls"]["probe"] > 0  # the probes had not run before the interrupt

    third = CountingBackend()  # everything finished: a resume measures and probes nothing
    again = autotune.run(s, save_path=None, journal=Journal.load(journal_path), backend=third)
    assert third.keys == [] and again["calls"]["probe"] == 0
    assert again["recommendation"]["key"] == doc["recommendation"]["key"]


def test_resume_refuses_a_journal_of_other_settings(tmp_path):
    s = settings()
    journal = Journal(tmp_path / "t.jsonl", context=s.context())
    del journal
    with pytest.raises(autotune.TuneError, match="batch_size=4.*batch_size=8"):
        autotune.resume_journal(tmp_path / "t.jsonl", dataclasses.replace(s, batch_size=8))
    with pytest.raises(autotune.TuneError, match="rank=None.*rank=8"):
        autotune.resume_journal(tmp_path / "t.jsonl", dataclasses.replace(s, rank=8))
    with pytest.raises(autotune.TuneError, match=r"optimizers=\['adamw'\]"):
        autotune.resume_journal(tmp_path / "t.jsonl", dataclasses.replace(s, optimizers=("sgd",)))
    assert autotune.resume_journal(tmp_path / "t.jsonl", s).context == s.context()  # tuples
    with pytest.raises(FileNotFoundError):
        autotune.resume_journal(tmp_path / "none.jsonl", s)


def test_estimate_backend_never_claims_a_real_run(tmp_path):
    doc = autotune.run(settings(), save_path=None, journal=None)
    rec = doc["recommendation"]
    assert "no step was measured" in rec["reason"] and "verification run" not in rec["reason"]
    notice = next(n for n in doc["notices"] if n.startswith("--backend estimate"))
    assert "no step is measured" in notice and "probes" not in notice  # --probe-steps 0
    # without measured times, speed goes to the estimate's proxy: no recompute first
    assert rec["gc"] is False
    lines = report.summary_lines(doc)
    assert any("estimated, not run)" in line for line in lines)
    # and which figure met the budget: the device-level prediction, not allocated bytes
    assert any("(predicted device memory: allocator-reserved + CUDA context" in x for x in lines)
    assert "the budget was compared with predicted device memory" in rec["reason"]


def test_estimate_backend_says_that_the_probes_train(tmp_path):
    doc = autotune.run(settings(probe_steps=2), save_path=None, journal=None)
    notice = next(n for n in doc["notices"] if n.startswith("--backend estimate"))
    assert doc["calls"]["probe"] > 0  # they ran: the notice and the reason say so, and where
    assert "the accuracy probes do train, 2 steps each on cpu" in notice
    assert (
        "no step was measured (the accuracy probes trained on cpu)"
        in (doc["recommendation"]["reason"])
    )


def test_nothing_fits_reports_the_smallest_configuration():
    doc = autotune.run(settings(budget_bytes=10**6), save_path=None, journal=None)
    assert doc["recommendation"] is None and "no configuration fits" in doc["reason"]
    lines = report.nothing_fits_lines(doc)
    assert "smallest configuration" in lines[1] and "gc" in lines[1]


def test_summary_says_when_the_recommendation_leaves_full_training():
    doc = {
        "backend": "cpu",
        "settings": {"modes": ["full", "lora"]},
        "candidates": [],
        "recommendation": {
            "mode": "lora",
            "placement": None,
            "num_groups": None,
            "gc": False,
            "micro_batch_size": 8,
            "grad_accum_steps": 1,
            "optimizer": "adamw",
            "peak_bytes": 10,
            "limit_bytes": 20,
            "budget_bytes": 21,
            "margin": 0.05,
            "tokens_per_second": 1.0,
            "reason": "fastest",
        },
    }
    lines = report.summary_lines(doc)
    first = next(line for line in lines if line.startswith("recommended:"))
    assert first.startswith("recommended: LoRA instead of full-parameter training")  # first
    assert "--mode full" in first and "LORA" not in "\n".join(lines)
    doc["recommendation"]["mode"] = "full"
    assert "--mode full" not in "\n".join(report.summary_lines(doc))


class NoisyBackend(CountingBackend):
    """Search steps at 512 tokens/s, the verification run (the last call) at 1024: noise."""

    def __init__(self, verify_at):
        super().__init__()
        self.verify_at = verify_at

    def measure(self, spec, breakdown=False):
        row = super().measure(spec, breakdown)
        if len(self.keys) == self.verify_at:
            row.update(step_seconds=0.5, tokens_per_second=1024.0)
        return row


def test_a_verification_flagged_as_timing_noise_gives_the_export_no_throughput():
    # issue 28: the export kept the noisy verification's speed; the callback then said +29%
    from velora_cli.configs import from_tune_document

    s = settings(backend="cpu", budget_bytes=10**9, micro_batches=(4,), probe_steps=0,
                 max_measured=1)  # fmt: skip
    doc = autotune.run(s, save_path=None, journal=None, backend=NoisyBackend(verify_at=2))
    rec = doc["recommendation"]
    assert rec["timing_noise"] is True and any("timing noise" in w for w in doc["warnings"])
    config = from_tune_document(doc)
    assert config.tokens_per_second is None and config.step_seconds is None
    steady = autotune.run(s, save_path=None, journal=None, backend=NoisyBackend(verify_at=0))
    assert steady["recommendation"]["timing_noise"] is False
    assert from_tune_document(steady).tokens_per_second == 512.0
