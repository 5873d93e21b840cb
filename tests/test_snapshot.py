"""``--memory-snapshot``: what reaches the cuda worker, what happens elsewhere, and (on a GPU) a
real snapshot that memory_viz can read."""

import json
import pickle
import subprocess

import pytest
import torch

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure import snapshot
from velora_cli.measure.cuda import CudaBackend
from velora_cli.measure.train_step import StepSpec, Strategy


def test_each_row_asks_the_worker_for_its_own_snapshot_file(tmp_path, monkeypatch):
    requests = []

    def fake_run(cmd, input, **kwargs):
        requests.append(json.loads(input))
        row = {"status": "ok", "backend": "cuda", "peak_bytes": 1}
        return subprocess.CompletedProcess(cmd, 0, stdout=f"VELORA_ROW {json.dumps(row)}\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    backend = CudaBackend()
    spec = StepSpec(model="llama-tiny")
    backend.measure(spec)
    assert "memory_snapshot" not in requests[-1]
    notice = snapshot.snapshot_notice(backend, str(tmp_path / "snaps"))
    assert "open them at https://pytorch.org/memory_viz" in notice
    backend.measure(spec.with_strategy(Strategy(placement="paper", num_groups=4, gc=True)))
    path = requests[-1]["memory_snapshot"]
    assert path == str((tmp_path / "snaps" / "velora_paper_g4_gc-adamw.pickle").resolve())


def test_other_backends_skip_with_a_notice(tmp_path):
    backend = EstimateBackend()
    notice = snapshot.snapshot_notice(backend, str(tmp_path))
    assert notice.startswith("--memory-snapshot skipped: CUDA memory snapshots need --backend")
    assert not hasattr(backend, "memory_snapshot")


def test_recording_is_turned_off_even_when_the_step_fails(tmp_path, monkeypatch):
    calls = []
    memory = torch.cuda.memory
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(
        memory, "_record_memory_history", lambda enabled="all", **kw: calls.append(enabled)
    )
    monkeypatch.setattr(memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))

    class Broken:
        def next_batch(self):
            raise RuntimeError("CUDA out of memory")

    out = snapshot.record_snapshot(Broken(), tmp_path / "s.pickle")
    assert out == {"memory_snapshot_error": "RuntimeError: CUDA out of memory"}
    assert calls == ["all", None]  # on, then off; nothing dumped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_snapshot_of_a_row_opens_as_memory_viz_data(tmp_path):
    backend = CudaBackend(warmup=1, steps=1, memory_snapshot=str(tmp_path))
    row = backend.measure(StepSpec(model="llama-tiny", batch_size=2, seq_len=64))
    assert row["status"] == "ok", row
    with open(row["memory_snapshot"], "rb") as fh:
        data = pickle.load(fh)
    assert data["segments"] and any(data["device_traces"])  # the allocator's state and history
