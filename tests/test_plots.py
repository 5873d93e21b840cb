"""Pictures of profile and tune documents: every format is written and valid, the same document
gives the same file, and the commands fail with one line where they must."""

import json
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from velora_cli import plots
from velora_cli.cli import app
from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.profiling.profiler import run_profile

pytest.importorskip("matplotlib")
runner = CliRunner()
ROWS = [
    Strategy(),
    Strategy(gc=True),
    Strategy(placement="paper", num_groups=4),
    Strategy(placement="all-linear", num_groups=4),
    Strategy(placement="paper", num_groups=4, gc=True),
]
# llama-tiny, 4 candidates, estimated only, 2 probe steps (loss changes to colour)
TUNE = ["tune", "llama-tiny", "--batch-size", "4", "--seq-len", "64", "--backend", "estimate",
        "--micro-batches", "4", "--placements", "paper", "--gc-every", "1", "--mode", "full",
        "--optimizer", "adamw", "--probe-steps", "2"]  # fmt: skip


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path / "profiles"))
    return tmp_path / "profiles"


@pytest.fixture(scope="module")
def profile_doc(tmp_path_factory):
    """A saved estimate profile of a tiny Llama (5 rows), read back from its file."""
    from transformers import LlamaConfig

    where = tmp_path_factory.mktemp("plots")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                max_position_embeddings=256).save_pretrained(where / "mha")  # fmt: skip
    spec = StepSpec(model=str(where / "mha"), batch_size=2, seq_len=32)
    path = where / "profile.json"
    run_profile(spec, ROWS, EstimateBackend(), save_path=path)
    return path


def _load(path):
    return json.loads(path.read_text())


class _Tags(HTMLParser):
    """Tags, attributes and text of a page (the standard library's HTML parser)."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- formats -------------------------------------------------------------------------------------


def test_profile_png_and_svg_are_valid_and_deterministic(profile_doc, tmp_path):
    doc = _load(profile_doc)
    png = plots.render(doc, tmp_path / "a.png").read_bytes()
    width, height = _png_size(png)
    assert width > 1000 and height > 800  # four timeline panels above five bars
    svg = plots.render(doc, tmp_path / "a.svg").read_bytes()
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    text = svg.decode()
    for row in doc["rows"]:
        assert row["label"] in text  # every row has its bar; the timelines name theirs
    assert "peak" in text and "allocation events" in text
    # the same document (read again from its file) gives the same bytes
    again = _load(profile_doc)
    assert plots.render(again, tmp_path / "b.png").read_bytes() == png
    assert plots.render(again, tmp_path / "b.svg").read_bytes() == svg


def test_profile_html_page_has_the_pictures_tables_settings_and_nothing_online(
    profile_doc, tmp_path
):
    doc = _load(profile_doc)
    page = plots.render(doc, tmp_path / "p.html").read_text()
    parsed = _Tags()
    parsed.feed(page)
    assert parsed.tags.count("svg") == 3  # timelines, categories, every other row's timeline
    assert parsed.tags.count("table") >= 4  # profile, categories, settings, environment
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert not [v for k, v in parsed.attrs if k in ("src", "href") and v and "//" in v]
    text = " ".join(parsed.text)
    from velora_cli.report.units import format_bytes

    for row in doc["rows"]:  # the terminal's figures
        assert format_bytes(row["peak_bytes"]) in text
    assert "the run's settings" in text and doc["environment"]["torch"] in text
    end = 0
    for _ in range(3):  # each inline SVG is well-formed XML on its own
        start = page.index("<svg", end)
        end = page.index("</svg>", start) + len("</svg>")
        ET.fromstring(page[start:end])
    assert plots.render(_load(profile_doc), tmp_path / "q.html").read_text() == page


def test_tune_pictures_and_page(tmp_path):
    result = runner.invoke(app, [*TUNE, "--budget", "2GB", "--plot", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 't.png'}" in result.stderr
    png = (tmp_path / "t.png").read_bytes()
    assert _png_size(png)[0] > 800
    doc_path = next((tmp_path / "profiles").glob("tune-*.json"))
    out = runner.invoke(app, ["plot", str(doc_path), "-o", str(tmp_path / "u.png")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "u.png").read_bytes() == png  # re-plotting the saved document
    out = runner.invoke(app, ["plot", str(doc_path), "-o", str(tmp_path / "t.html")])
    assert out.exit_code == 0, out.output
    parsed = _Tags()
    parsed.feed((tmp_path / "t.html").read_text())
    text = " ".join(parsed.text)
    assert parsed.tags.count("svg") == 1 and parsed.tags.count("table") >= 3
    assert "recommended:" in text and "budget" in text
    svg = (tmp_path / "t.html").read_text()
    assert "Pareto front" in svg and "probe: held-out loss change" in svg


def test_a_tune_where_nothing_fits_is_still_drawn(tmp_path):
    result = runner.invoke(app, [*TUNE, "--budget", "1MB", "--probe-steps", "0",
                                 "--plot", str(tmp_path / "t.svg")])  # fmt: skip
    assert result.exit_code == 1 and "no configuration fits" in result.stderr
    ET.fromstring((tmp_path / "t.svg").read_bytes())


# -- the speed axis of a tune --------------------------------------------------------------------


def _candidate(key, status, peak, *, measured=True, tps=None, est_tps=None, loss=None, rank=0,
               lower=False):  # fmt: skip
    return {"key": key, "mode": "full", "optimizer": "adamw", "placement": None,
            "num_groups": None, "gc": False, "micro_batch_size": 4, "grad_accum_steps": 1,
            "status": status, "peak_bytes": peak if measured else None,
            "measure_status": "ok" if measured else None, "estimate_peak_bytes": peak,
            "estimate_lower_bound": lower, "tokens_per_second": tps,
            "estimate_tokens_per_second": est_tps, "loss_increase": loss, "loss": loss,
            "cost_rank": [rank, 0, -4, 0, 0]}  # fmt: skip


def _tune_doc(backend, candidates):
    return {"kind": "velora-tune", "model": "m", "batch_size": 4, "seq_len": 64,
            "precision": "fp32", "backend": backend, "budget_bytes": 1000 * 2**20,
            "limit_bytes": 950 * 2**20, "margin": 0.05, "max_loss_increase": 0.01,
            "candidates": candidates, "recommendation": None, "settings": {}}  # fmt: skip


def test_speed_is_measured_or_predicted_else_an_ordinal_rank():
    from velora_cli.plots.pareto import front, points

    mib = 2**20
    rows = [
        _candidate("a", "feasible", 500 * mib, tps=900.0),
        _candidate("b", "over-budget", 1200 * mib, tps=1500.0),
        _candidate("c", "rejected-accuracy", 400 * mib, tps=800.0, loss=0.05),
        _candidate("d", "not-measured-dominated", 600 * mib, measured=False, est_tps=700.0),
        _candidate(
            "e", "infeasible-estimate", 3000 * mib, measured=False, lower=True, est_tps=1000.0
        ),
        _candidate("f", "feasible", 450 * mib, tps=600.0),  # c would dominate it, but c is rejected
    ]
    on_cpu = {p.row["key"]: p for p in points(_tune_doc("cpu", rows))}
    assert on_cpu["d"].speed is None  # a GPU prediction is not a CPU time
    assert on_cpu["e"].lower_bound and on_cpu["e"].speed is None
    on_cuda = {p.row["key"]: p for p in points(_tune_doc("cuda", rows))}
    assert on_cuda["d"].speed == 700.0 and on_cuda["d"].predicted
    line = front([p for p in on_cuda.values() if p.speed], lambda p: p.speed)
    # c was rejected for accuracy: on no front (issue 28), so f, which c dominated, is on it
    assert [p.row["key"] for p in line] == ["f", "a", "b"]
    from velora_cli.report.tune import pareto_keys

    assert pareto_keys(rows) == {"f", "a", "b"}  # the table's ★
    for backend in ("cpu", "cuda", "estimate"):
        fig = plots.kinds.KINDS["velora-tune"][0](_tune_doc(backend, rows), None)
        labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
        assert any("tokens/s" in t for t in labels)
        assert any("ordinal" in t for t in labels) == (backend == "cpu")  # d, e: no speed


def test_no_speed_at_all_gives_one_ordinal_axis():
    rows = [_candidate(k, "feasible", (k + 1) * 2**20, rank=k) for k in range(3)]
    from velora_cli.plots.style import style

    with style():
        fig = plots.kinds.KINDS["velora-tune"][0](_tune_doc("estimate", rows), None)
    labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
    assert len(labels) == 1 and "expected speed rank, 1 = fastest" in labels[0]


# -- the commands --------------------------------------------------------------------------------


def test_plot_command_defaults_and_rows(profile_doc, tmp_path, profiles):
    target = tmp_path / "doc.json"
    shutil.copy(profile_doc, target)
    out = runner.invoke(app, ["plot", str(target)])  # default: FILE with .html
    assert out.exit_code == 0, out.output
    assert (tmp_path / "doc.html").is_file()
    profiles.mkdir()
    shutil.copy(profile_doc, profiles / "profile-x.json")
    out = runner.invoke(app, ["plot", "-o", str(tmp_path / "latest.svg"), "--rows", "all"])
    assert out.exit_code == 0, out.output
    assert ET.fromstring((tmp_path / "latest.svg").read_bytes()).tag.endswith("svg")
    out = runner.invoke(app, ["plot", str(target), "-o", str(tmp_path / "r.png"),
                              "--rows", "gc,velora paper g4"])  # fmt: skip
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "x.pdf"], "the suffix picks the format, choose .png, .svg, .html"),
        (["--rows", "nope"], "--rows: no row 'nope'; rows: 'baseline', 'gc'"),
    ],
)
def test_plot_command_errors(profile_doc, args, message):
    result = runner.invoke(app, ["plot", str(profile_doc), *args])
    assert result.exit_code == 1 and message in result.stderr
    assert "Traceback" not in result.output


def test_plot_refuses_what_it_cannot_draw(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "velora-notes"}))
    result = runner.invoke(app, ["plot", str(other), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 1
    assert "cannot draw a 'velora-notes' document yet; velora plot draws velora-profile" in (
        result.stderr
    )
    run = tmp_path / "run.json"  # a run record that has logged nothing yet
    run.write_text(json.dumps({"kind": "velora-run", "intervals": []}))
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 1 and "no logged interval yet" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["plot", str(bad)])
    assert result.exit_code == 1 and "is not a JSON document" in result.stderr
    result = runner.invoke(app, ["plot"])
    assert result.exit_code == 1 and "no profile or tune document under" in result.stderr


def test_without_matplotlib_one_line_says_how_to_install_it(profile_doc, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = runner.invoke(app, ["plot", str(profile_doc), "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {plots.INSTALL_HINT}"
    result = runner.invoke(app, ["profile", "llama-tiny", "--backend", "estimate", "--plot",
                                 str(tmp_path / "a.png")])  # fmt: skip
    assert result.exit_code == 1 and plots.INSTALL_HINT in result.stderr
    assert not (tmp_path / "profiles").exists()  # refused before anything ran


def test_profile_plot_and_memory_snapshot_elsewhere_than_cuda(tmp_path, profiles):
    snapshots = tmp_path / "snapshots"
    result = runner.invoke(app, ["profile", "llama-tiny", "--backend", "estimate",
                                 "--placements", "paper", "--num-groups", "4", "--no-velora-gc",
                                 "--gc-every", "1", "--plot", str(tmp_path / "p.html"),
                                 "--memory-snapshot", str(snapshots)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--memory-snapshot skipped: CUDA memory snapshots need --backend cuda" in result.stderr
    assert not snapshots.exists()
    page = (tmp_path / "p.html").read_text()
    assert page.count("<svg") == 2 and "velora paper g4" in page
    saved = _load(next(profiles.glob("profile-*.json")))
    assert saved["kind"] == "velora-profile" and all(r["timeline"] for r in saved["rows"])


def test_profile_plot_with_a_bad_suffix_fails_before_the_run(tmp_path):
    result = runner.invoke(app, ["profile", "llama-tiny", "--backend", "estimate", "--plot",
                                 str(tmp_path / "p.jpg")])  # fmt: skip
    assert result.exit_code == 1 and "choose .png, .svg, .html" in result.stderr
    assert not (tmp_path / "profiles").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (Debian's package)")
def test_the_page_renders_in_a_headless_browser(profile_doc, tmp_path):
    page = plots.render(_load(profile_doc), tmp_path / "p.html")
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            page.resolve().as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count("<svg") == 3 and dom.count("<table") >= 4
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,2000",
            f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],  # fmt: skip
        capture_output=True,
        timeout=120,
    )
    assert _png_size(shot.read_bytes()) == (1200, 2000)


@pytest.mark.parametrize("command", [["profile"], ["tune"]])
def test_an_unwritable_plot_fails_before_any_work_and_no_folder_is_made(tmp_path, command):
    # issue 28: a mistyped folder was created silently, an unwritable one failed after the run
    missing = tmp_path / "typo" / "p.png"
    result = runner.invoke(app, [*command, "llama-tiny", "--backend", "estimate", "--plot",
                                 str(missing)])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"cannot write the plot to {missing}: the folder {missing.parent} does not exist" in (
        " ".join(result.stderr.split())
    )
    assert "velora does not create it" in result.stderr
    assert not missing.parent.exists() and not (tmp_path / "profiles").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, [*command, "llama-tiny", "--backend", "estimate", "--plot",
                                 str(afile / "p.png")])  # fmt: skip
    assert result.exit_code == 1 and "is not a folder" in result.stderr
    assert not (tmp_path / "profiles").exists()


def test_a_read_only_folder_is_refused_by_check_output(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    # root may write anywhere, so the permission is faked where the tests run as root
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode)
    )
    with pytest.raises(
        plots.PlotError, match=r"cannot write the plot to .*ro/p.svg: the folder .* is not writable"
    ):
        plots.check_output(folder / "p.svg")
    (folder / "d.svg").mkdir()
    monkeypatch.setattr(os, "access", real)
    with pytest.raises(plots.PlotError, match="it is a folder"):
        plots.check_output(folder / "d.svg")


def test_the_colour_bar_names_what_low_rank_optimizers_are_probed_against_with_spread_ticks():
    from matplotlib.colors import TwoSlopeNorm

    from velora_cli.plots.pareto import probe_reference, spread_ticks

    galore = dict(_candidate("g", "feasible", 2**20, tps=1.0, loss=0.002), optimizer="galore")
    velora = dict(_candidate("v", "feasible", 2**20, tps=1.0, loss=0.001), placement="paper")
    assert probe_reference(_tune_doc("cpu", [galore])) == "the same steps with AdamW"
    assert "or with AdamW for galore/adarankgrad" in probe_reference(
        _tune_doc("cpu", [galore, velora])
    )
    assert probe_reference(_tune_doc("cpu", [velora])) == "the same steps without VeLoRA"
    # a squeezed negative side (-1%..0) and a long positive one: no two ticks closer than 12%
    norm = TwoSlopeNorm(vmin=-0.01, vcenter=0.0, vmax=0.4)
    ticks = spread_ticks(norm, 0.01)
    positions = sorted(float(norm(t)) for t in ticks)
    assert 0.0 in ticks and 0.4 in ticks and len(ticks) >= 2
    assert all(b - a >= 0.12 for a, b in zip(positions, positions[1:], strict=False))
    from velora_cli.plots.kinds import KINDS
    from velora_cli.plots.style import style

    with style():
        fig = KINDS["velora-tune"][0](_tune_doc("cpu", [galore]), None)
    [bar] = [ax for ax in fig.axes if "probe:" in ax.get_xlabel()]
    assert "vs the same steps with AdamW" in bar.get_xlabel()
