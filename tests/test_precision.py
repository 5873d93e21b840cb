"""The precision line says what velora really allocates: each rule checked against a real step."""

import importlib.util

import pytest
import torch

from velora_cli.measure.train_step import StepSpec, Strategy, prepare, train_step
from velora_cli.methods.precision import QUANTIZED, describe, describe_modes

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CASES = [
    ("full", "fp32", None),
    ("full", "bf16", None),
    ("full", "fp32", "bf16"),
    ("lora", "bf16", None),
    ("lora", "fp16", None),
    ("lora", "fp32", "bf16"),
    ("qlora", "bf16", None),
    ("qlora", "fp32", None),
]


def observed(mode: str, dtype: str, amp: str | None) -> dict:
    """The dtypes of each part after a real CPU step: parameters, gradients, optimizer state."""
    from velora_cli.methods.quant import is_quantized

    spec = StepSpec("llama-tiny", batch_size=2, seq_len=16, dtype=dtype, amp=amp, mode=mode,
                    strategy=Strategy("all-linear", num_groups=4))  # fmt: skip
    prepared = prepare(spec, "cpu")
    model = prepared.model
    quantized = [m for m in model.modules() if is_quantized(m)]
    packed = {id(m.weight) for m in quantized}
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad and id(p) not in packed]
    with torch.autocast("cpu", dtype=getattr(torch, {"bf16": "bfloat16"}.get(amp, "float16")),
                        enabled=amp is not None):  # fmt: skip
        loss = model(**prepared.micro_batches[0]).loss
    loss.backward()
    grads = {NAMES[p.grad.dtype] for p in trained}
    prepared.optimizer.zero_grad()
    train_step(prepared)  # creates the optimizer state
    state = {
        NAMES[v.dtype]
        for s in prepared.optimizer.state.values()
        for k, v in s.items()
        if torch.is_tensor(v) and k != "step"
    }
    itemsize = {t.dtype.itemsize for t in trained}
    return {
        "trained": {NAMES[p.dtype] for p in trained},
        "frozen": {NAMES[p.dtype] for p in frozen},
        "grads": grads,
        "state": state,
        "compute": {NAMES[m.compute_dtype] for m in quantized},
        # AdamW: two moments per trained value, in the state's dtype
        "state_bytes_ok": prepared.optimizer_bytes()
        == 2 * sum(p.numel() for p in trained) * max(itemsize),
        "grad_bytes_ok": prepared.grad_bytes()
        == sum(p.numel() * p.element_size() for p in trained),
    }


@pytest.mark.parametrize("mode, dtype, amp", CASES)
def test_each_part_is_stored_as_described(mode, dtype, amp):
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("real 4-bit layers need bitsandbytes")
    described = describe(mode, dtype, amp)
    seen = observed(mode, dtype, amp)
    assert seen["trained"] == {described.trained}
    assert seen["grads"] == {described.grads}
    assert seen["state"] == {described.optimizer_state}
    assert seen["state_bytes_ok"] and seen["grad_bytes_ok"]
    if mode == "full":
        assert seen["frozen"] == set() and described.frozen is None
    else:
        assert seen["frozen"] == {described.frozen}
    if mode == "qlora":
        assert described.quantized == QUANTIZED and seen["compute"] == {"bf16"}
    else:
        assert described.quantized is None and seen["compute"] == set()


def test_the_header_line_reads_per_part():
    assert describe("lora", "bf16").text == (
        "frozen base bf16; LoRA adapters fp32, their gradients and optimizer state fp32"
    )
    assert describe("qlora", "bf16").text == (
        "frozen base linears 4-bit NF4 (bf16 compute), embeddings/norms/lm_head bf16; "
        "LoRA adapters fp32, their gradients and optimizer state fp32"
    )
    assert describe("full", "bf16").text == "pure bf16: bf16 weights, gradients and optimizer state"
    assert describe("full", "fp32", "bf16").text == (
        "mixed precision: fp32 master weights, gradients and optimizer state, bf16 autocast"
    )
    assert StepSpec("m", mode="lora", dtype="bf16").precision == describe("lora", "bf16").text
    tune = describe_modes(("full", "qlora"), "bf16")
    assert tune.startswith("full: pure bf16") and " | qlora: frozen base linears 4-bit" in tune
