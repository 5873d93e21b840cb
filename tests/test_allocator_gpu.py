"""The allocator model against the real CUDA caching allocator (skips itself without CUDA).

Each trace is replayed with ``torch.empty(n, dtype=uint8, device="cuda")`` in a fresh process
(a clean allocator; ``PYTORCH_CUDA_ALLOC_CONF`` is read once, at CUDA initialisation) and the
peaks ``torch.cuda`` reports are compared with `allocator.simulate` on the same events.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from velora_cli.allocator.config import parse_alloc_conf
from velora_cli.allocator.replay import ALLOC, EMPTY_CACHE, FREE, RESET_PEAK, simulate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

M = 1 << 20

REPLAY = """
import json, sys, torch
events = json.loads(sys.stdin.read())
live = {}
torch.cuda.init()
for kind, key, n in events:
    if kind == "alloc":
        live[key] = torch.empty(n, dtype=torch.uint8, device="cuda")
    elif kind == "free":
        del live[key]
    elif kind == "empty_cache":
        torch.cuda.empty_cache()
    elif kind == "reset_peak":
        torch.cuda.reset_peak_memory_stats()
print(json.dumps([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]))
"""


def on_gpu(events, conf: str = "") -> tuple[int, int]:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": conf}
    proc = subprocess.run(
        [sys.executable, "-c", REPLAY], input=json.dumps(events), capture_output=True,
        text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    allocated, reserved = json.loads(proc.stdout.strip().splitlines()[-1])
    return allocated, reserved


def random_trace(seed: int, n: int = 600) -> list:
    rng, live, events = random.Random(seed), [], []
    for i in range(n):
        if live and rng.random() < 0.45:
            events.append((FREE, live.pop(rng.randrange(len(live))), 0))
        else:
            size = rng.choice(
                [rng.randint(1, 2 * M), rng.randint(M, 12 * M), rng.randint(10 * M, 90 * M)]
            )
            events.append((ALLOC, i, size))
            live.append(i)
        if i == n // 2:
            events += [(EMPTY_CACHE, 0, 0), (RESET_PEAK, 0, 0)]
    return events


HAND = {
    "split": [(ALLOC, 1, 3 * M), (ALLOC, 2, 4 * M), (ALLOC, 3, 12 * M)],
    "fragmented": [(ALLOC, k, 5 * M) for k in range(4)]
    + [(FREE, 0, 0), (FREE, 2, 0), (ALLOC, 9, 8 * M)],
    "growing": [
        (ALLOC, 1, 30 * M),
        (FREE, 1, 0),
        (ALLOC, 2, 32 * M),
        (FREE, 2, 0),
        (ALLOC, 3, 34 * M),
    ],  # fmt: skip
    "small": [(ALLOC, k, 300_000) for k in range(7)],
    # a best-fit tie between equal free blocks of two segments (test_allocator.py's TIE): the
    # model's reserved is 100 MiB if cudaMalloc places the later segment below the earlier one
    # (caching.SEGMENTS_GROW_DOWN), 150 MiB if above
    "tie": [
        (ALLOC, 1, 60 * M),
        (ALLOC, 2, 40 * M),
        (FREE, 1, 0),
        (ALLOC, 3, 20 * M),
        (FREE, 2, 0),
        (ALLOC, 4, 12 * M),
        (FREE, 3, 0),
        (ALLOC, 5, 50 * M),
    ],
}


@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "max_split_size_mb:64"])
@pytest.mark.parametrize("name", [*HAND, "random-0", "random-1"])
def test_model_matches_the_cuda_allocator(name, conf):
    events = HAND[name] if name in HAND else random_trace(int(name.split("-")[1]))
    model = simulate(events, parse_alloc_conf(conf))
    allocated, reserved = on_gpu(events, conf)
    assert (model.peak_allocated_bytes, model.peak_reserved_bytes) == (allocated, reserved), (
        f"{name} [{conf or 'default'}]: model allocated/reserved {model.peak_allocated_bytes}/"
        f"{model.peak_reserved_bytes}, CUDA {allocated}/{reserved}"
    )
