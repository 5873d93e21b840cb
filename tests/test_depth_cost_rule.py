"""The depth shortcut's cost rule (`shortcuts.shallow_runs_pay` on `depth.step_units`): the
shortcut steps the model at 2, 3 and 4 blocks (times the checkpointing period) instead of once at
the real depth, so it is taken only where those three steps dispatch fewer ops than the real one.

Checked against the ops really stepped (the tracker's op count of each step, two micro-batches,
AdamW): llama-60m (8 blocks, where the three shallow steps cost more) and a tiny 32-block llama
(Llama-2-7b's depth, where they cost less), with and without checkpointing.
"""

import pytest
from transformers import LlamaConfig

from velora_cli.estimate.backend import EstimateBackend
from velora_cli.measure.train_step import StepSpec, Strategy
from velora_cli.models import resolve_model
from velora_cli.shortcut.depth import decoder_stack, shallow_model_spec, step_units
from velora_cli.shortcut.shortcuts import SHALLOW_UNITS, shallow_runs_pay


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost-rule") / "llama32"
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=256,
    ).save_pretrained(path)  # fmt: skip
    return str(path)


def stepped_ops(backend, spec, model_spec, depth):
    """Ops the tracked step dispatches at ``depth`` blocks, and the rule's units there."""

    def body(prepared):
        _row, trace, _ = backend.tracked(prepared, breakdown=False)
        return trace.ops, step_units(prepared.model, decoder_stack(prepared.model, depth))

    return backend.fast_path().models.run(spec, shallow_model_spec(model_spec, depth), body)


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize(("model", "pays"), [("llama-60m", False), ("llama32", True)])
def test_the_rule_picks_the_run_that_steps_fewer_ops(llama32, model, pays, gc):
    name = llama32 if model == "llama32" else model
    spec = StepSpec(model=name, batch_size=1, seq_len=32, strategy=Strategy(gc=gc))
    backend = EstimateBackend(trace_fields=False, step_time=False)
    model_spec = resolve_model(name)
    depth = model_spec.config.num_hidden_layers
    real, units = stepped_ops(backend, spec, model_spec, depth)
    shallow = [stepped_ops(backend, spec, model_spec, u)[0] for u in SHALLOW_UNITS]
    assert (sum(shallow) < real) == pays  # what the ops say...
    assert shallow_runs_pay(depth, 1, *units) == pays  # ...and what the rule says, unstepped
    # the units are affine in depth as the ops are, and outside/per block in about their ratio
    fixed, per_block = units
    ops_per_block = shallow[1] - shallow[0]
    ops_fixed = shallow[0] - 2 * ops_per_block
    assert shallow[2] - shallow[1] == ops_per_block
    assert abs(fixed / per_block - ops_fixed / ops_per_block) < 0.2, (units, shallow)
    method = backend.measure(spec)["estimate_method"]
    if pays:
        assert method.startswith("extrapolated from 2, 3, 4 blocks"), method
    else:
        assert method == (
            "full depth (8 blocks: shallow enough to run in full (the runs at 2, 3, 4 blocks "
            "would step more ops))"
        )


def test_the_rule_counts_the_checkpointing_period():
    # 32 blocks, 7 + 19 units (llama's): every block and every 2 pay, every 4 (8, 12, 16) not
    assert shallow_runs_pay(32, 1, 7, 19)
    assert shallow_runs_pay(32, 2, 7, 19)
    assert not shallow_runs_pay(32, 4, 7, 19)
    assert not shallow_runs_pay(8, 1, 7, 19)
    assert shallow_runs_pay(10, 1, 7, 19) and not shallow_runs_pay(10, 1, 10, 19)
