"""GaLore and AdaRankGrad (velora_cli.methods.lowrank) against references and their documented choices."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

from velora_cli.methods import lowrank
from velora_cli.methods.lowrank import (
    AdaRankGrad,
    GaLoreAdamW,
    LowRankError,
    _rotation,
    make_optimizer,
    param_groups,
)


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 12), nn.GELU(), nn.Linear(12, 30)).to(dtype)


def _train(model, optimizer, steps=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 20, generator=gen, dtype=next(model.parameters()).dtype)
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()


def _single(shape, optimizer_cls, **kwargs):
    weight = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    return weight, optimizer_cls([{"params": [weight], "lowrank": True}], **kwargs)


def _low_rank_grad(shape, rank, gen):
    m, n = shape
    a = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    return a @ torch.randn(rank, n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    "cls, extra", [(AdaRankGrad, {"eta": 1.0}), (GaLoreAdamW, {})], ids=["adarankgrad", "galore"]
)
def test_full_rank_is_adamw_exactly(cls, extra):
    """At r = min(m, n) the projection is skipped: the steps are torch.optim.AdamW's."""
    model, reference = _mlp(), _mlp()
    ours = cls(param_groups(model, rank=1000), lr=1e-2, weight_decay=0.1, **extra)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    _train(model, ours)
    _train(reference, theirs)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} differs")
    assert set(ours.ranks().values()) == {12}  # both weights at their full rank min(m, n)


def test_galore_projects_onto_top_singular_subspace_and_scales():
    """GaLore's first step: Q = top-r left singular vectors (m < n), Adam's first step (±1 per
    entry) in that basis, projected back and scaled by α."""
    gen = torch.Generator().manual_seed(0)
    weight, opt = _single((8, 20), GaLoreAdamW, rank=3, lr=0.1, scale=0.5, weight_decay=0.0)
    weight.grad = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    opt.step()
    u, _, _ = torch.linalg.svd(weight.grad)
    q = opt.state[weight]["basis"]
    assert q.shape == (8, 3) and opt.state[weight]["exp_avg"].shape == (3, 20)
    torch.testing.assert_close(q @ q.T, u[:, :3] @ u[:, :3].T)  # same subspace
    low = q.T @ weight.grad
    expected = -0.1 * 0.5 * q @ (low / (low.abs() + 1e-8))
    torch.testing.assert_close(weight.detach(), expected)


def test_galore_keeps_moments_across_a_refresh():
    gen = torch.Generator().manual_seed(0)
    weight, opt = _single((30, 10), GaLoreAdamW, rank=4, update_gap=2)
    for step in range(3):
        weight.grad = torch.randn(30, 10, generator=gen, dtype=torch.float64)
        before = opt.state[weight]["exp_avg"].clone() if step == 2 else None
        opt.step()
    state = opt.state[weight]
    assert state["left"] is False and state["basis"].shape == (10, 4)
    assert state["refreshes"] == 2  # steps 1 and 3
    # right side: moments are (m, r); after the refresh the old values are reused as they are
    new_low = weight.grad @ state["basis"]
    torch.testing.assert_close(state["exp_avg"], 0.9 * before + 0.1 * new_low)


def test_rank_adapts_down_on_a_low_rank_gradient_stream():
    """Gradients of rank 10, then rank 2: the rank follows at each refresh, the state shrinks."""
    gen = torch.Generator().manual_seed(1)
    weight, opt = _single((40, 60), AdaRankGrad, rank=16, eta=0.99, update_gap=3, tolerance=0.0)
    seen = []
    for step in range(7):
        weight.grad = _low_rank_grad((40, 60), 10 if step < 3 else 2, gen)
        opt.step()
        seen.append((opt.state[weight]["rank"], opt.state_bytes()))
    assert [r for r, _ in seen] == [10, 10, 10, 2, 2, 2, 2]
    assert seen[-1][1] < seen[0][1]
    # exact-rank gradients: the subspace is the gradient's column space
    q = opt.state[weight]["basis"]
    residual = weight.grad - q @ (q.T @ weight.grad)
    assert residual.norm() < 1e-8 * weight.grad.norm()


def test_rank_keeps_the_energy_fraction():
    """With a decaying spectrum the rank is the smallest keeping η of ‖G‖²."""
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(80, 50, generator=gen, dtype=torch.float64))
    s = 0.7 ** torch.arange(50, dtype=torch.float64)
    weight, opt = _single((50, 80), AdaRankGrad, rank=40, eta=0.9)
    weight.grad = u @ torch.diag(s) @ v.T
    opt.step()
    energy = torch.cumsum(s.square(), 0) / s.square().sum()
    assert opt.state[weight]["rank"] == int((energy < 0.9).sum()) + 1  # 4 for 0.7ᵏ


def test_range_finder_matches_the_svd_subspace():
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(200, 64, generator=gen))
    a = u @ torch.diag(0.85 ** torch.arange(64.0)) @ v.T
    opt = AdaRankGrad([nn.Parameter(torch.zeros(1, 1))], rank=8)
    found, values = opt._top_subspace(a, 16)
    top = u[:, :8]
    cosines = torch.linalg.svdvals(top.T @ found[:, :8])  # cosines of the principal angles
    assert cosines.min() > 0.999, cosines
    torch.testing.assert_close(values[:8], 0.85 ** torch.arange(8.0), rtol=1e-3, atol=1e-4)


def test_moment_transport_is_the_identity_when_the_subspace_does_not_change():
    gen = torch.Generator().manual_seed(4)
    weight, opt = _single((12, 30), AdaRankGrad, rank=5, eta=1.0)
    for _ in range(3):
        weight.grad = torch.randn(12, 30, generator=gen, dtype=torch.float64)
        opt.step()
    state = opt.state[weight]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "mass1", "mass2")}
    opt._carry(state, state["basis"], state["basis"].clone(), weight)
    for key, value in before.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-15, msg=key)


def test_moment_transport_permutes_and_starts_new_directions_fresh():
    """R = Q_newᵀQ_old: a permuted basis permutes the moments; a direction outside the old
    subspace gets zero moments and zero mass, so its first step is a fresh Adam step (±lr)."""
    eye = torch.eye(6, dtype=torch.float64)
    old, new = eye[:, [0, 1, 2]], eye[:, [2, 0, 5]]  # direction 5 is new
    weight, opt = _single((6, 4), AdaRankGrad, rank=3, lr=0.1, weight_decay=0.0, scale=1.0)
    state = opt.state[weight]
    state.update(
        left=True,
        basis=old,
        rank=3,
        exp_avg=torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4], dtype=torch.float64),
        exp_avg_sq=torch.tensor([[4.0] * 4, [5.0] * 4, [6.0] * 4], dtype=torch.float64),
        mass1=torch.full((3,), 0.5, dtype=torch.float64),
        mass2=torch.full((3,), 0.25, dtype=torch.float64),
    )
    opt._carry(state, old, new, weight)
    assert state["exp_avg"][:, 0].tolist() == [3.0, 1.0, 0.0]
    assert state["exp_avg_sq"][:, 0].tolist() == [6.0, 4.0, 0.0]
    assert state["mass1"].tolist() == [0.5, 0.5, 0.0]
    assert state["mass2"].tolist() == [0.25, 0.25, 0.0]
    # A fresh direction's first update: m̂ = g, v̂ = g², so the step is lr·sign(g) along it.
    state.update(step=10, since_refresh=0)
    weight.grad = torch.zeros(6, 4, dtype=torch.float64)
    weight.grad[5] = 3.0
    opt.step()
    torch.testing.assert_close(weight.detach()[5], torch.full((4,), -0.1, dtype=torch.float64))


def test_rotation_identity_cases():
    q = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64)).Q
    assert _rotation(None, None) is None
    torch.testing.assert_close(_rotation(q, q), torch.eye(3, dtype=torch.float64))
    assert _rotation(None, q).shape == (3, 7) and _rotation(q, None).shape == (7, 3)


def test_converged_projection_triggers_an_early_refresh():
    """A gradient that equals its running mean (relative change below the tolerance) refreshes
    the subspace early; an unrelated one does not."""
    gen = torch.Generator().manual_seed(5)
    weight, opt = _single((10, 25), AdaRankGrad, rank=4, update_gap=100, tolerance=0.5)
    grad = torch.randn(10, 25, generator=gen, dtype=torch.float64)
    for _ in range(3):
        weight.grad = grad.clone()
        opt.step()
    assert opt.state[weight]["refreshes"] == 3  # first step, then on each unchanged gradient
    weight.grad = torch.randn(10, 25, generator=gen, dtype=torch.float64)
    opt.step()
    assert opt.state[weight]["refreshes"] == 3  # a new, unrelated gradient: keep the subspace


@pytest.mark.parametrize("cls", [AdaRankGrad, GaLoreAdamW])
def test_state_bytes_match_the_shapes_and_the_worst_case(cls):
    model = _mlp(torch.float32)
    opt = cls(param_groups(model, rank=4), lr=1e-3)
    _train(model, opt, steps=1)
    expected = 0
    for p in model.parameters():
        if p.ndim != 2:
            expected += 2 * p.numel() * 4
            continue
        small, large = sorted(p.shape)
        r = opt.state[p]["rank"]
        expected += 2 * large * r * 4 + small * r * 4 + 2 * r * 4  # moments, Q, masses
    assert opt.state_bytes() == expected
    if cls is GaLoreAdamW:
        assert opt.worst_case_state_bytes() == expected  # fixed rank: the worst case is now
    else:
        assert opt.worst_case_state_bytes() >= expected
    assert all("prev" not in s for s in opt.state.values())  # no copy of Ĝ_{t−1} kept


def test_meta_runs_at_the_rank_cap():
    """Without values (meta), every weight takes the cap: the state is the worst case."""
    with torch.device("meta"):
        model = _mlp(torch.float32)
    opt = AdaRankGrad(param_groups(model, rank=4), lr=1e-3)
    x = torch.empty(16, 20, device="meta")
    model(x).sum().backward()
    opt.step()
    assert set(opt.ranks().values()) == {4}
    assert opt.state_bytes() == opt.worst_case_state_bytes()


def test_tracker_counts_the_state_as_optimizer(llama):
    """The memory tracker files every state tensor (moments, bases, masses) under optimizer."""
    from velora_cli.measure.tracker import MemoryTracker

    model = llama
    opt = make_optimizer("adarankgrad", model, lr=1e-3, rank=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with MemoryTracker(model, opt, round_to=1) as tracker:
        snapshot = tracker.snapshot()
    assert snapshot["optimizer"] == opt.state_bytes()


def test_deterministic():
    results = []
    for _ in range(2):
        model = _mlp(torch.float32)
        opt = AdaRankGrad(param_groups(model, rank=4), lr=1e-2, seed=7)
        _train(model, opt, steps=5)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_param_groups_leave_embeddings_and_the_output_layer_to_adamw(llama):
    model = llama
    projected, plain = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    projected_names = {names[id(p)] for p in projected["params"]}
    assert projected["lowrank"] and not plain["lowrank"]
    assert all(n.endswith("proj.weight") for n in projected_names)
    assert not any("embed" in n or "lm_head" in n for n in projected_names)
    assert len(projected_names) == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "--rank"),
        ({"update_gap": 0}, "--update-gap"),
        ({"eta": 0.0}, "--eta"),
        ({"eta": 1.5}, "--eta"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LowRankError, match=message):
        AdaRankGrad([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_make_optimizer_rejects_unknown_names():
    with pytest.raises(LowRankError, match="galore|adarankgrad"):
        make_optimizer("lion", _mlp(), lr=1e-3, rank=4)


def test_state_dict_round_trip():
    model = _mlp(torch.float32)
    opt = AdaRankGrad(param_groups(model, rank=4), lr=1e-2)
    _train(model, opt, steps=2)
    clone = copy.deepcopy(model)
    opt2 = AdaRankGrad(param_groups(clone, rank=4), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares tensors
    _train(model, opt, steps=1, seed=9)
    _train(clone, opt2, steps=1, seed=9)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_docstring_examples_run():
    assert doctest.testmod(lowrank).failed == 0
