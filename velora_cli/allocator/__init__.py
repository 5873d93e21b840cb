"""What a GPU must hold beyond the tensors: PyTorch's CUDA caching allocator, modelled.

    caching.py         the allocator model (pools, rounding, segments, best fit, split/merge,
                       expandable segments, the OOM retry), read from CUDACachingAllocator.cpp
    blocks.py          its bookkeeping: segments and blocks
    replay.py          allocation traces replayed through it (`simulate`): the inlined loop every
                       estimate runs, and the reference that calls malloc/free per event
    config.py          its constants and ``PYTORCH_CUDA_ALLOC_CONF``, parsed as torch parses it
    device_memory.py   a step's allocation trace replayed as the cuda backend's schedule runs it
                       (after loading, with the loader's transients: LoadPlan): allocated,
                       reserved, fragmentation, device (reserved + CUDA context)
    kernel_scratch.py  buffers GPU kernels take inside one op (flash backward, embedding backward)

May import: measure (the tracker's trace) and the leaves; not timing, the estimate or above.
"""
