"""The estimate's shortcuts, each tested equal to the reference path it replaces.

    shortcuts.py    the fast path: reused meta models, cached meta kernels, depth extrapolation
    meta_cache.py   meta models built once and reused from row to row
    depth.py        a model's stack of decoder blocks, as the depth shortcut sees it
    extrapolate.py  from three shallow steps to the deep one, exact or refused
    record.py       what the depth shortcut records of one shallow step
    synthesis.py    the deep step's allocation trace and op counts, synthesized

May import: timing, allocator, measure, emulation, methods and the leaves; never the estimate
backend (it hands itself in).
"""
