"""Optimizers that shrink optimizer-state memory: GaLore and AdaRankGrad.

AdamW keeps two moments per parameter (8 bytes each in fp32). Both optimizers here project each
2-D weight gradient G (m×n) onto a low-dimensional subspace of its smaller side, keep Adam's moments
there (max(m,n)×r instead of m×n), and map the Adam step back to the full weight:

    left  (m < n):  Q is m×r,  Ĝ = QᵀG (r×n),  ΔW = Q·Δ̂
    right (m ≥ n):  Q is n×r,  Ĝ = GQ  (m×r),  ΔW = Δ̂·Qᵀ

Every other parameter (embeddings, the output layer, norms, biases) gets plain AdamW, as in GaLore.

``GaLoreAdamW`` (Zhao et al., 2024) is GaLore as its authors' ``galore-torch`` does it: fixed rank
r, Q from a full SVD of the current gradient every ``update_gap`` steps, the moments kept as they
are across a refresh (not transformed), the back-projected step scaled by ``scale``. Ours rather
than ``galore-torch`` (not in our dependencies nor on the GPU image) or transformers'
``galore_adamw`` (which wraps that package): the maths is thirty lines and shares its Adam core with
AdaRankGrad, so the two differ only where the methods differ.

``AdaRankGrad`` (Refael et al., ICLR 2025) adds three things; where the paper's details are not
known to us, the choice made is stated in the class docstring and tested:

* Q from a randomized range finder + small SVD (Halko, Martinsson & Tropp 2011), not a full SVD;
* an adaptive rank per layer: the smallest r keeping a fraction ``eta`` of ‖G‖²_F, capped by
  ``rank`` (so the state shrinks as gradients become low-rank during training);
* a refresh when the projected optimization has converged (the projected gradient stopped
  changing) or after at most ``update_gap`` steps, with the moments carried into the new basis.

At full rank (r = min(m, n)) projecting saves nothing, so both optimizers skip it: Q is the identity
and the update is AdamW's exactly (tested against ``torch.optim.AdamW``).

Memory: ``state_bytes`` counts what the state holds now; ``worst_case_state_bytes`` what it holds
with every layer at ``rank`` (AdaRankGrad's rank is only known after steps; the estimate backend,
on meta tensors, runs every layer at that worst case).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

LOWRANK_OPTIMIZERS = ("galore", "adarankgrad")

# GaLore's settings for pre-training LLaMA (Zhao et al. 2024, Table 2 and §5): projection refreshed
# every 200 steps, update scale α = 0.25; transformers' galore_adamw uses the same defaults.
DEFAULT_UPDATE_GAP = 200
DEFAULT_SCALE = 0.25
# Energy fraction kept by AdaRankGrad's adaptive rank. 0.9: the discarded directions then carry at
# most 10% of the gradient's squared norm, i.e. the projected gradient keeps a cosine of at least
# √0.9 ≈ 0.95 with the full one; lower values shrink the state faster but lose more of each step.
DEFAULT_ETA = 0.9
# Relative change ‖Ĝ_t − m̂_{t−1}‖/‖m̂_{t−1}‖ of the projected gradient from its running mean under
# which the projected optimization counts as converged and the subspace is refreshed early.
DEFAULT_TOLERANCE = 0.5
OVERSAMPLING = 8  # extra sketch columns (HMT §4.2 recommend 5-10)
POWER_ITERATIONS = 2  # HMT §4.5: 1-2 for gradients, whose spectra decay slowly at first


class LowRankError(ValueError):
    """A low-rank optimizer setting that makes no sense (shown as one line)."""


def default_rank(hidden_size: int) -> int:
    """GaLore's rank for a model: a quarter of the hidden size (its paper uses 128 for the
    512-wide LLaMA-60M, 512 for 1B at 2048, 1024 for 7B at 4096)."""
    return max(1, hidden_size // 4)


def param_groups(model: nn.Module, **lowrank_settings: Any) -> list[dict[str, Any]]:
    """The trainable parameters split as GaLore splits them.

    Args:
        model: the model to train.
        **lowrank_settings: group options for the projected group (e.g. ``rank``).

    Returns:
        Two groups: 2-D weights of every module except embeddings and the output layer, with
        ``lowrank=True``; every other trainable parameter, with plain AdamW.
    """
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded.add(id(output.weight))
    projected, plain = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 2 and id(param) not in excluded:
            projected.append(param)
        else:
            plain.append(param)
    groups = [{"params": projected, "lowrank": True, **lowrank_settings}]
    if plain:
        groups.append({"params": plain, "lowrank": False})
    return groups


class _ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose ``lowrank`` groups take their step in a subspace of each weight's gradient.

    Subclasses choose the subspace (``_new_basis``) and what happens to the moments when it
    changes (``_carry``). Bias correction is kept per subspace direction (``mass1``/``mass2``: the
    total EMA weight each moment entry has accumulated, 1 − βᵗ for a direction seen since step 1),
    so a direction that enters the subspace late is corrected as a fresh one instead of being
    divided by a bias correction it never had.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        rank: int = 128,
        update_gap: int = DEFAULT_UPDATE_GAP,
        scale: float = DEFAULT_SCALE,
        seed: int = 0,
    ) -> None:
        errors = []
        if lr < 0 or eps < 0 or weight_decay < 0:
            errors.append("lr, eps and weight_decay must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            errors.append(f"betas must be in [0, 1), got {betas}")
        if rank < 1:
            errors.append(f"--rank must be >= 1, got {rank}")
        if update_gap < 1:
            errors.append(f"--update-gap must be >= 1, got {update_gap}")
        if scale <= 0:
            errors.append(f"scale must be > 0, got {scale}")
        if errors:
            raise LowRankError("; ".join(errors))
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            lowrank=False,
        )
        super().__init__(params, defaults)
        self.seed = seed
        self._refresh_all = False

    def refresh_on_next_step(self) -> None:
        """Make the next ``step()`` refresh every subspace (the costliest step: the profiler
        measures it so the peak it reports holds for every step)."""
        self._refresh_all = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refresh_all, self._refresh_all = self._refresh_all, False
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if group["lowrank"] and p.ndim == 2:
                    self._lowrank_step(p, group, self.state[p], refresh_all)
                else:
                    self._plain_step(p, group, self.state[p])
        return loss

    # -- the Adam core ---------------------------------------------------------------------------

    def _plain_step(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """AdamW as ``torch.optim.AdamW`` computes it (decoupled weight decay first)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1 = 1 - beta1 ** state["step"]
        bias2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)

    def _lowrank_step(self, p: torch.Tensor, group: dict, state: dict, refresh_all: bool) -> None:
        grad = p.grad
        if not state:
            state["step"] = 0
            state["since_refresh"] = 0
            state["left"] = p.shape[0] < p.shape[1]  # a bool: load_state_dict mangles strings
        state["step"] += 1
        reason = self._refresh_reason(state, group, refresh_all)
        projected = None
        if reason is None:
            projected = _project(grad, state.get("basis"), state["left"])
            if self._converged(state, projected, group):
                reason, projected = "converged", None
        if reason is not None:
            old = state.get("basis")
            basis = self._new_basis(grad, group, state)
            self._carry(state, old, basis, p)
            state["since_refresh"] = 0
            state["refreshes"] = state.get("refreshes", 0) + 1
            projected = _project(grad, state.get("basis"), state["left"])
        state["since_refresh"] += 1

        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(projected, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
        for key, beta in (("mass1", beta1), ("mass2", beta2)):
            state[key].mul_(beta).add_(1 - beta)
        axis = 1 if state["left"] else 0  # mass is per row (left) / column (right)
        mass1 = state["mass1"].unsqueeze(axis)
        mass2_sqrt = state["mass2"].sqrt().unsqueeze(axis)
        direction = (exp_avg / mass1) / (exp_avg_sq.sqrt() / mass2_sqrt).add_(group["eps"])
        del projected
        update = _project_back(direction, state.get("basis"), state["left"])
        del direction
        scale = group["scale"] if state.get("basis") is not None else 1.0
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    # -- what subclasses decide ------------------------------------------------------------------

    def _refresh_reason(self, state: dict, group: dict, refresh_all: bool) -> str | None:
        if "exp_avg" not in state:
            return "first step"
        if refresh_all:
            return "forced"
        if state["since_refresh"] >= group["update_gap"]:
            return "update gap"
        return None

    def _converged(self, state: dict, projected: torch.Tensor, group: dict) -> bool:
        return False

    def _new_basis(self, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor | None:
        raise NotImplementedError

    def _carry(self, state: dict, old: torch.Tensor | None, new: torch.Tensor | None, p) -> None:
        """Install ``new`` as the basis and make the moments match it (first call: zeros)."""
        raise NotImplementedError

    # -- memory ----------------------------------------------------------------------------------

    def ranks(self) -> dict[int, int]:
        """id(param) -> current rank of each projected parameter that has state (full = min)."""
        out = {}
        for group in self.param_groups:
            if not group["lowrank"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "exp_avg" in state:
                    out[id(p)] = state["rank"]
        return out

    def state_bytes(self) -> int:
        """Bytes of every tensor in the state now (moments, bases, masses, kept gradients)."""
        seen, total = set(), 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    key = id(value.untyped_storage())
                    if key not in seen:
                        seen.add(key)
                        total += value.untyped_storage().nbytes()
        return total

    def worst_case_state_bytes(self) -> int:
        """Bytes of the state with every projected weight at its group's ``rank`` (the most an
        adaptive rank can reach), whatever the ranks are now."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                size = p.element_size()
                if not (group["lowrank"] and p.ndim == 2):
                    total += 2 * p.numel() * size
                    continue
                small, large = sorted(p.shape)
                mass = 8 if p.dtype == torch.float64 else 4
                r = min(group["rank"], small)
                if r >= small:  # full rank: identity basis, per-direction masses
                    total += 2 * p.numel() * size + 2 * small * mass
                    continue
                moments = 2 * large * r * size
                total += moments + small * r * size + 2 * r * mass
        return total


class GaLoreAdamW(_ProjectedAdamW):
    """GaLore (Zhao et al. 2024): fixed rank, full-SVD projection, moments kept across refreshes.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
        >>> opt = GaLoreAdamW(param_groups(model, rank=4), lr=1e-2)
        >>> model(torch.randn(5, 64)).sum().backward(); opt.step()
        >>> sorted(opt.ranks().values())
        [4, 4]
    """

    def _new_basis(self, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor | None:
        small = min(grad.shape)
        r = min(group["rank"], small)
        state["rank"] = r
        if r >= small:
            return None
        # GaLore: torch.linalg.svd in fp32 (half types unsupported), cast back to the weight dtype.
        u, _, vh = torch.linalg.svd(grad.to(_work_dtype(grad)), full_matrices=False)
        basis = u[:, :r] if state["left"] else vh[:r].T
        return basis.to(grad.dtype).contiguous()

    def _carry(self, state: dict, old, new, p) -> None:
        state["basis"] = new
        if "exp_avg" in state:
            return  # GaLore keeps its moments as they are: same shape, now read in the new basis
        shape = _projected_shape(p.shape, state["rank"], state["left"], new is None)
        _fresh_moments(state, shape, p, state["left"])


class AdaRankGrad(_ProjectedAdamW):
    """AdaRankGrad (Refael et al., ICLR 2025): adaptive-rank projected AdamW with moment transport.

    What is done, step by step, for a 2-D weight whose gradient is G:

    1. **Subspace** (on the first step, after ``update_gap`` steps, or on convergence): a
       randomized range finder (HMT Alg. 4.4: Gaussian sketch of ``rank + 8`` columns, 2 power
       iterations with QR between them), then the SVD of the small matrix B = PᵀG, P an
       orthonormal basis of the sketch (G's transpose for a right-side weight).
    2. **Rank**: the smallest r whose leading singular values keep ``eta`` of ‖G‖²_F (the exact
       norm, not the sketch's), capped by ``rank``; at r = min(m, n) Q is the identity.
    3. **Convergence**: after projecting, if ‖Ĝ_t − m̂_{t−1}‖_F < ``tolerance``·‖m̂_{t−1}‖_F the
       projected problem has stopped moving and the subspace is refreshed right away (the
       gradient is re-projected into the new one). m̂_{t−1} is Adam's bias-corrected first moment,
       the running mean of the projected gradients. Our choice: comparing with it rather than
       with Ĝ_{t−1} alone needs no copy of Ĝ_{t−1} (a third max(m,n)×r tensor: +50% state at
       the rank cap) and is less noisy than one previous minibatch. ``tolerance`` 0.5 from
       measurement (benchmarks/optimizer_probe.py: llama-60m from scratch, 300 steps of 2×128
       tokens): the per-step median of this ratio over the 56 projected weights had deciles
       1.8-5.9 (minibatch noise dominates the mean), so 0.5 refreshes only weights whose
       projected gradient has clearly settled (22 early refreshes in 300 steps, against 56 on
       the first step and 52 at the 200-step gap), and ``update_gap`` bounds a stale subspace.
    4. **Moment transport** on a refresh, with R = Q_newᵀ·Q_old (r_new × r_old, the old basis
       vectors' coordinates in the new basis):
       m ← R·m (exact: the mean of the new coordinates is the rotated mean of the old ones,
       restricted to the old subspace); v ← (R∘R)·v, i.e. each new coordinate's second moment is
       the R²-weighted sum of the old ones. That is exact for the diagonal second moment Adam
       already assumes (uncorrelated coordinates): Var(Σⱼ Rᵢⱼ gⱼ) = Σⱼ Rᵢⱼ² Var(gⱼ). Unlike
       |R|·v it keeps the total when the old subspace lies in the new one (columns of R∘R sum to
       1) and, like it, stays non-negative. (Right-side weights use the transposes.) The
       bias-correction masses move with ‖Rᵢ‖², the share of new direction i inside the old
       subspace: a direction entirely new starts as in a fresh Adam (first step of size lr), one
       already there keeps its history. When Q does not change, R = I and every quantity is
       unchanged (tested).
    5. The Adam step is taken in the subspace, projected back with Q, scaled by ``scale`` and
       applied with decoupled weight decay on the full weight.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
        >>> opt = AdaRankGrad(param_groups(model, rank=16), lr=1e-2)
        >>> model(torch.randn(5, 64)).sum().backward(); opt.step()
        >>> all(r <= 16 for r in opt.ranks().values())
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        eta: float = DEFAULT_ETA,
        tolerance: float = DEFAULT_TOLERANCE,
        **kwargs: Any,
    ) -> None:
        """As ``GaLoreAdamW`` (lr, betas, eps, weight_decay, rank, update_gap, scale, seed),
        plus ``eta`` and ``tolerance``."""
        if not 0.0 < eta <= 1.0:
            raise LowRankError(f"--eta must be in (0, 1], got {eta}")
        if tolerance < 0:
            raise LowRankError(f"tolerance must be >= 0, got {tolerance}")
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            group.setdefault("eta", eta)
            group.setdefault("tolerance", tolerance)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _converged(self, state: dict, projected: torch.Tensor, group: dict) -> bool:
        if _no_values(projected):
            return False  # no values to compare (the estimate forces a refresh instead)
        axis = 1 if state["left"] else 0
        mean = state["exp_avg"] / state["mass1"].clamp_min(1e-30).unsqueeze(axis)  # m̂_{t−1}
        work = _work_dtype(projected)
        before = torch.linalg.vector_norm(mean, dtype=work)
        change = torch.linalg.vector_norm(projected - mean, dtype=work)
        state["relative_change"] = float(change / before) if before > 0 else float("inf")
        return state["relative_change"] < group["tolerance"]

    def _new_basis(self, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor | None:
        small = min(grad.shape)
        cap = min(group["rank"], small)
        a = grad if state["left"] else grad.T  # its column space is the one kept
        sketch = min(cap + OVERSAMPLING, small)
        u, s = self._top_subspace(a, sketch)  # (rows(a), sketch), (sketch,)
        if _no_values(grad) or group["eta"] >= 1.0:
            r = cap  # meta: no values, the worst case (the estimate is an upper bound); η=1: all
        else:
            total = torch.linalg.vector_norm(grad, dtype=_work_dtype(grad)).square()
            kept = torch.cumsum(s.square(), 0)
            reach = int(torch.searchsorted(kept, group["eta"] * total).item()) + 1
            r = max(1, min(cap, reach))
        state["rank"] = r
        if r >= small:
            return None
        return u[:, :r].to(grad.dtype).contiguous()

    def _top_subspace(self, a: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading left singular vectors and values of ``a`` (HMT randomized range finder)."""
        rows, cols = a.shape
        work = _work_dtype(a)  # QR and SVD have no half kernels: the small factors go to fp32
        omega = torch.randn(cols, width, generator=self._generator(a.device), device=a.device)
        y = a @ omega.to(a.dtype)  # (rows, width)
        for _ in range(POWER_ITERATIONS):
            q = torch.linalg.qr(y.to(work)).Q.to(a.dtype)
            y = a @ (a.T @ q)
        q = torch.linalg.qr(y.to(work)).Q  # (rows, width), orthonormal
        b = (q.to(a.dtype).T @ a).to(work)  # (width, cols)
        ub, s, _ = torch.linalg.svd(b, full_matrices=False)
        return q @ ub, s

    def _generator(self, device: torch.device) -> torch.Generator | None:
        from torch._guards import active_fake_mode

        if device.type == "meta" or active_fake_mode() is not None:  # no values to draw
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _carry(self, state: dict, old, new, p) -> None:
        state["basis"] = new
        if "exp_avg" not in state:
            shape = _projected_shape(p.shape, state["rank"], state["left"], new is None)
            _fresh_moments(state, shape, p, state["left"])
            return
        rotation = _rotation(old, new)
        if rotation is None:
            return
        rotation = rotation.to(state["exp_avg"].dtype)
        squared = rotation.square()
        if state["left"]:  # moments (r, n): rows are directions
            state["exp_avg"] = rotation @ state["exp_avg"]
            state["exp_avg_sq"] = squared @ state["exp_avg_sq"]
        else:  # moments (m, r): columns are directions
            state["exp_avg"] = state["exp_avg"] @ rotation.T
            state["exp_avg_sq"] = state["exp_avg_sq"] @ squared.T
        # Each new direction inherits the old directions' masses weighted by R²: ‖Rᵢ‖²·w when the
        # old masses are all w, 0 for a direction outside the old subspace.
        for key in ("mass1", "mass2"):
            state[key] = squared.to(state[key].dtype) @ state[key]


def make_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    rank: int,
    update_gap: int = DEFAULT_UPDATE_GAP,
    eta: float = DEFAULT_ETA,
    scale: float = DEFAULT_SCALE,
    seed: int = 0,
) -> _ProjectedAdamW:
    """``GaLoreAdamW`` or ``AdaRankGrad`` over ``model``'s trainable parameters.

    Raises:
        LowRankError: an unknown name or a setting out of range.
    """
    groups = param_groups(model)
    kwargs = dict(lr=lr, rank=rank, update_gap=update_gap, scale=scale, seed=seed)
    if name == "galore":
        return GaLoreAdamW(groups, **kwargs)
    if name == "adarankgrad":
        return AdaRankGrad(groups, eta=eta, **kwargs)
    raise LowRankError(
        f"unknown low-rank optimizer {name!r}; choose {'|'.join(LOWRANK_OPTIMIZERS)}"
    )


# -- helpers ---------------------------------------------------------------------------------------


def _project(grad: torch.Tensor, basis: torch.Tensor | None, left: bool) -> torch.Tensor:
    if basis is None:
        return grad
    return basis.T @ grad if left else grad @ basis  # (r, n) | (m, r)


def _project_back(low: torch.Tensor, basis: torch.Tensor | None, left: bool) -> torch.Tensor:
    if basis is None:
        return low
    return basis @ low if left else low @ basis.T  # (m, n)


def _projected_shape(shape: torch.Size, r: int, left: bool, full: bool) -> tuple[int, int]:
    if full:
        return tuple(shape)
    return (r, shape[1]) if left else (shape[0], r)


def _fresh_moments(state: dict, shape: tuple[int, int], p: torch.Tensor, left: bool) -> None:
    state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
    state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
    directions = shape[0] if left else shape[1]
    state["mass1"] = torch.zeros(directions, dtype=_work_dtype(p), device=p.device)
    state["mass2"] = torch.zeros(directions, dtype=_work_dtype(p), device=p.device)


def _no_values(t: torch.Tensor) -> bool:
    """Meta and fake tensors (the per-rank estimate, velora_cli.parallel) have no values."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 tensors (half types have no QR/SVD kernels and lose the norm)."""
    return torch.promote_types(t.dtype, torch.float32)


def _rotation(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """R = Q_newᵀ·Q_old (None: both the identity); an identity basis is passed as None."""
    if old is None and new is None:
        return None
    if old is None:
        return new.T
    if new is None:
        return old
    return new.T @ old
