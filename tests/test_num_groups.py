"""Default sub-token choices per model: they divide every targeted width, around the paper's 32."""

import pytest

from velora_cli.measure.train_step import StepSpec
from velora_cli.methods.placement import PlacementError
from velora_cli.profiling.num_groups import choose_num_groups, default_num_groups


@pytest.mark.parametrize(
    ("widths", "expected"),
    [
        ((4096, 11008), (64, 32, 16)),  # Llama-2-7b: the paper's choices
        ((512, 1376), (32, 16, 8)),  # llama-60m: 1376 = 2^5 * 43, so 64 fits no down_proj
        ((768, 3072), (64, 32, 16)),  # gpt2
        ((64, 96), (32, 16, 8)),
        ((24, 48), (8, 4, 2)),  # nothing reaches 32: the three largest
        ((12,), (4, 2, 1)),
        ((43 * 3,), (43, 3, 1)),  # odd widths: every divisor, the largest <= 32 in the middle
        ((7,), (7, 1)),
    ],
)
def test_choose_num_groups(widths, expected):
    chosen = choose_num_groups(widths)
    assert chosen == expected
    assert all(w % g == 0 for w in widths for g in chosen)


def test_choose_num_groups_needs_widths():
    with pytest.raises(ValueError, match="no layer widths"):
        choose_num_groups([])


def test_defaults_of_the_default_model_fit_every_row():
    from velora_cli.profiling.profiler import (
        DEFAULT_PLACEMENTS,
        plan_strategies,
        validate_strategies,
    )

    spec = StepSpec("llama-60m", batch_size=1, seq_len=8)
    groups, line = default_num_groups(spec, list(DEFAULT_PLACEMENTS))
    assert groups == (32, 16, 8) and "(512, 1376)" in line
    rows = plan_strategies(list(DEFAULT_PLACEMENTS), num_groups=list(groups))
    assert validate_strategies(spec, rows) == {}  # nothing left out, nothing failing


def test_lora_defaults_read_the_adapters_widths():
    spec = StepSpec("llama-tiny", batch_size=1, seq_len=8, mode="lora")
    groups, _ = default_num_groups(spec, ["paper"])
    assert groups == (64, 32, 16)  # widths 64 and 192 (llama-tiny)


def test_a_placement_that_matches_nothing_is_one_error():
    with pytest.raises(PlacementError, match="matched no linear layer"):
        default_num_groups(StepSpec("llama-tiny"), [["*.no_such_layer"]])
