"""CPU time of the depth synthesis (`velora_cli.shortcut.synthesis.synthesize`) against another
revision's, on the same inputs, in one process; their outputs must be equal.

    python benchmarks/synthesis_speed.py                      # against HEAD~ (git show)
    python benchmarks/synthesis_speed.py --against e4decfc --repeat 3
    python benchmarks/synthesis_speed.py --args "profile meta-llama/Llama-2-7b --backend estimate"

The inputs are what a real command hands to `synthesize`: the command (``--args``, default the
7B QLoRA profile) runs once in this process with `synthesize` wrapped to keep every call's
records. Then each revision's module (the other one loaded from ``git show REV:...``) writes
every call ``--repeat`` times, with the cyclic collector off as in an estimate row
(`velora_cli.gcpause`); CPU time is ``time.process_time``. Every result (trace and op counts)
must equal the other revision's, ``==`` and ``repr``, or the script says which call differs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = "velora_cli/shortcut/synthesis.py"
DEFAULT = "profile meta-llama/Llama-2-7b --backend estimate --mode qlora -b 1 -s 512 --no-save"


def recorded_calls(args: str) -> list[tuple]:
    """Every (records, depth, period, kwargs) the command hands to `synthesize`."""
    from velora_cli.cli import app
    from velora_cli.shortcut import shortcuts

    calls = []
    synthesize = shortcuts.synthesize

    def keep(records, depth, period, **kwargs):
        calls.append((records, depth, period, kwargs))
        return synthesize(records, depth, period, **kwargs)

    shortcuts.synthesize = keep
    try:
        app([*shlex.split(args), "--format", "json", "-o", str(Path(tempfile.mkdtemp()) / "d")],
            standalone_mode=False)  # fmt: skip
    finally:
        shortcuts.synthesize = synthesize
    return calls


def module_at(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "synthesis_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("synthesis_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(module, calls: list[tuple], repeat: int) -> tuple[float, list]:
    gc.disable()
    start = time.process_time()
    for _ in range(repeat):
        out = [module.synthesize(r, d, p, **kw) for r, d, p, kw in calls]
    seconds = time.process_time() - start
    gc.enable()
    return seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD~", help="the other revision (git)")
    parser.add_argument("--args", default=DEFAULT, help="the velora command to take inputs from")
    parser.add_argument("--repeat", type=int, default=1)
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from velora_cli.shortcut import synthesis

    calls = recorded_calls(opts.args)
    other = module_at(opts.against)
    before, expected = timed(other, calls, opts.repeat)
    after, got = timed(synthesis, calls, opts.repeat)
    for n, (a, b) in enumerate(zip(expected, got, strict=True)):
        if a != b or repr(a) != repr(b):
            sys.exit(f"call {n} (depth {calls[n][1]}): the outputs differ")
    print(f"{len(calls)} calls x {opts.repeat} from `velora {opts.args}`: "
          f"{opts.against} {before:.2f} s CPU, this tree {after:.2f} s CPU "
          f"({before / after:.2f}x); outputs equal")  # fmt: skip


if __name__ == "__main__":
    main()
