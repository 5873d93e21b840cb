"""What CUDA kernels save and allocate, emulated on meta tensors for the estimate backend.

    step.py            the emulation entered as one context for a step
    attention.py       an attention function whose saved tensors match the GPU's fused SDPA kernels
                       (the kernel torch picks on the named GPU, with and without masks)
    flash_attention_2.py   FlashAttention-2 (the flash-attn package), dense and varlen
    implementations.py     what `--attn` builds a step with on each device
    math_attention.py  SDPA's math path replayed op by op, as it runs on a GPU
    amp.py, dropout.py, rms_norm.py, softmax.py   autocast, fused dropout, fused RMSNorm and the
                       half-to-float softmax, as CUDA runs them

May import: methods and the leaves only (the step in measure/ uses it).
"""
