"""The estimate backend: the training step on meta tensors, composed with the CUDA emulation,
the allocator model, the roofline and the shortcuts; no allocation, no GPU.

    backend.py  `EstimateBackend`: one row per step, the reference path and the fast one
    beside.py   the estimate for the GPU a real cuda row ran on, and its signed errors
    pool.py     a second process estimating a list of rows from its far end (tune, profile)

May import: shortcut, timing, allocator, measure, emulation, methods and the leaves.
"""
