"""Where velora writes: names no other run takes, directories checked before any work, atomic
writes with ordinary permissions."""

import json
import os
import stat
import threading

import pytest
from typer.testing import CliRunner

from velora_cli import files
from velora_cli.cli import app
from velora_cli.files import OutputError

runner = CliRunner()
# llama-tiny, 3 rows on the estimate backend: a second or two
PROFILE = ["profile", "llama-tiny", "--backend", "estimate", "--seq-len", "32",
           "--placements", "paper", "--num-groups", "32", "--gc-every", "1",
           "--no-velora-gc"]  # fmt: skip


@pytest.fixture
def frozen_stamp(monkeypatch):
    """Every name stamped in the same second, as two runs started together are."""

    monkeypatch.setattr(files, "_stamp", lambda: "20261201-144215")


def test_names_taken_in_the_same_second_never_collide(tmp_path, frozen_stamp):
    first = files.reserve(tmp_path, "profile-m-cpu", ".json")
    second = files.reserve(tmp_path, "profile-m-cpu", ".json")
    assert first.name == "profile-m-cpu-20261201-144215.json"
    assert second.name == "profile-m-cpu-20261201-144215-2.json"
    # a name whose sibling exists is skipped: a tune's document beside its journal
    (tmp_path / "tune-m-20261201-144215.json").write_text("{}")
    journal = files.reserve(tmp_path, "tune-m", ".jsonl", also=(".json",))
    assert journal.name == "tune-m-20261201-144215-2.jsonl"


def test_racing_threads_each_get_their_own_name(tmp_path, frozen_stamp):
    names, start = [], threading.Barrier(8)

    def take():
        start.wait()
        names.append(files.reserve(tmp_path, "tune-m", ".jsonl"))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8 and all(p.is_file() for p in names)


def test_two_profiles_in_the_same_second_keep_both_documents(tmp_path, monkeypatch, frozen_stamp):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path))
    for batch in ("2", "3"):
        result = runner.invoke(app, [*PROFILE, "--batch-size", batch, "--format", "json"])
        assert result.exit_code == 0, result.output
    saved = sorted(tmp_path.glob("profile-*.json"))
    assert [p.name for p in saved] == [
        "profile-llama-tiny-estimate-20261201-144215-2.json",
        "profile-llama-tiny-estimate-20261201-144215.json",
    ]
    assert sorted(json.loads(p.read_text())["batch_size"] for p in saved) == [2, 3]


def test_documents_get_the_permissions_open_would_give(tmp_path):
    umask = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "doc.json", {"a": 1})
        files.write_text_atomic(tmp_path / "t.txt", "x\n")
        reserved = files.reserve(tmp_path, "p", ".json")
        files.write_atomic(reserved, {"b": 2})
    finally:
        os.umask(umask)
    for name in ("doc.json", "t.txt", reserved.name):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name  # not mkstemp's 0600
    assert json.loads(reserved.read_text()) == {"b": 2}
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("meta-llama/Llama-2-7b", "meta-llama_Llama-2-7b"),
        ("llama-60m", "llama-60m"),
        ("./remote2", "remote2"),  # was "._remote2"
        ("../x/remote2/", "remote2"),
        ("__weird name__", "weird_name"),
    ],
)
def test_slug(model, expected):
    assert files.slug(model) == expected


def test_profiles_dir_that_is_a_file_fails_before_measuring(tmp_path, monkeypatch):
    target = tmp_path / "profiles"
    target.write_text("")
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(target))
    result = runner.invoke(app, PROFILE)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: VELORA_PROFILES_DIR={target} is a file, not a directory; point it at a "
        "directory (or remove the file)"
    ]  # one line, nothing measured before it


def test_unwritable_profiles_dir_fails_before_the_first_row(tmp_path, monkeypatch):
    from velora_cli.estimate.backend import EstimateBackend

    measured = []
    monkeypatch.setattr(EstimateBackend, "measure", lambda self, spec, **kw: measured.append(spec))
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)  # as a read-only directory answers
    result = runner.invoke(app, PROFILE)
    assert result.exit_code == 1 and measured == []
    assert f"error: cannot write to VELORA_PROFILES_DIR={tmp_path}: Permission denied" in (
        result.stderr
    )
    result = runner.invoke(app, ["tune", "llama-tiny", "--budget", "1GB", "--backend", "estimate"])
    assert result.exit_code == 1 and measured == []
    assert "cannot write to VELORA_PROFILES_DIR" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_profiles_dir_for_real(tmp_path, monkeypatch):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write to"):
            files.writable_dir(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_output_file_checks(tmp_path):
    with pytest.raises(OutputError, match=r"is a directory; give a file name"):
        files.check_output_file(tmp_path, "-o")
    with pytest.raises(OutputError, match=r"directory .*missing does not exist"):
        files.check_output_file(tmp_path / "missing" / "x.json", "-o")
    assert files.check_output_file(tmp_path / "x.json") == tmp_path / "x.json"
    assert not (tmp_path / "x.json").exists()  # checked, not created
