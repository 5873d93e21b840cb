"""Accuracy proxies for a VeLoRA strategy: gradient fidelity and a short training probe.

VeLoRA's forward is exact; only the weight gradient of a wrapped layer is approximate (it is
formed from x̂, the projection of each sub-token of x onto v). Two cheap proxies of what that costs:

* ``gradient_fidelity``: one batch, the model built twice from the same seed (exact and with the
  strategy), one forward/backward each; per wrapped layer, the cosine similarity and relative
  error of the VeLoRA weight gradient against the exact one.
* ``training_probe``: K optimizer steps on real text from identical initial weights, identical data
  order and seed; the held-out loss after K steps. ``compare`` turns two probes into the relative
  loss increase the tuner gates on (issue 4, §3: ``--max-loss-increase``, default 1%).

The training probe is a proxy, not a training run: it uses its own small batch (default 2×128
tokens, not the profiled batch), a single batch per step (the spec's gradient accumulation is not
used: micro-batching changes memory, not the maths) and K=24 steps. Built-in architectures have
random weights, so it then measures from-scratch training dynamics; with ``weights=True`` it
measures fine-tuning from the checkpoint. The numbers are deterministic: the same call on the same
CPU gives the same numbers bit for bit (seeded data, init and LoRA; here 1 and 2 torch threads
gave identical bits too, which other CPUs' kernels need not). On CUDA, kernels with atomic
accumulation (e.g. attention backward) may change the last bits from run to run.

What K=24 from scratch can and cannot tell (llama-60m, byte-level text, measured on a 2-core CPU):
the held-out loss falls from 10.4 (uniform over 32000 ids) to 3.45, i.e. the model learns which
ids occur and how often; the blocks' contextual skill barely starts. Every VeLoRA strategy tried
landed within ±0.5% of the baseline there (paper M=D/32 +0.03%, all-linear M=D/32 −0.20%,
all-linear M=D/4 −0.41%, even all-linear M=D −0.42%), so the gate catches strategies that break
or slow training, not small differences in final quality. At K=16 the loss is still mid-descent,
where a little delay reads as a large change (all-linear M=D/32 +2.8%, paper +0.01%) and verdicts
flip with K: hence 24. Gradient fidelity is the sharper signal at random init (mean cosine
0.24-0.72 there: sub-tokens of random weights share no direction, the case VeLoRA compresses
worst).

A low-rank optimizer (galore, adarankgrad) approximates AdamW's step instead of the gradient: its
probe is compared with the AdamW baseline of the same mode, on the same steps and data, each
optimizer at its own learning rate (``DEFAULT_LR``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

from velora_cli.measure.train_step import Strategy, prepare, torch_dtype
from velora_cli.search.data import load_texts, split_batches, tokenize

if TYPE_CHECKING:
    import torch

    from velora_cli.measure.train_step import Prepared, StepSpec

# Defaults sized for a tune on llama-60m on a 2-core CPU: one probe step at 2×128 takes ≈0.8 s
# there (2 threads, idle machine; ≈1.1 s on 1 thread), a default probe ≈20-30 s, so a baseline and
# 3-5 finalists stay within ~2-3 minutes. K=24 rather than 16: see the module docstring.
DEFAULT_STEPS = 24
DEFAULT_BATCH_SIZE = 2
DEFAULT_SEQ_LEN = 128
DEFAULT_EVAL_BATCHES = 4
# AdamW at 1e-3 (GaLore/VeLoRA pre-train LLaMA-60M at 1e-3) with a short warmup and cosine decay
# moves a from-scratch llama-60m's held-out loss from 10.4 to 3.45 in 24 steps; SGD (momentum
# 0.9) needs a larger step: 1e-2 gives 10.4 -> 4.06, 1e-1 diverges.
# GaLore and AdaRankGrad: GaLore's paper pre-trains LLaMA at 1e-2 with update scale 0.25 (an
# effective 2.5e-3 on the projected step), AdamW at 1e-3.
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2, "galore": 1e-2, "adarankgrad": 1e-2}
MIN_LR_FACTOR = 0.1  # cosine decay ends at lr/10 (GaLore's and nanoGPT's choice)
MLM_PROBABILITY = 0.15  # masked-LM probes mask this share of positions (BERT's recipe)
_MAX_CHARS = 1_000_000  # probe text read at most (unless a probe needs more)
_FROM_SCRATCH = "random weights: the probe measures from-scratch training dynamics"
_LORA_B_STD = 0.02  # gradient fidelity fills LoRA's zero-initialized B with this (see there)


class ProbeError(ValueError):
    """A probe that cannot run as asked (e.g. zero steps); the message says what to change."""


# -- gradient fidelity --------------------------------------------------------------------------


def gradient_fidelity(
    spec: StepSpec,
    *,
    device: str = "cpu",
    data: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-layer similarity of the VeLoRA weight gradients to the exact ones, on one batch.

    The model is built twice from the same seed, once without any strategy and once with
    ``spec.strategy`` applied exactly as :func:`~velora_cli.measure.train_step.prepare` applies
    it; each runs one forward/backward on the first training batch of the probe data. With init
    ``batch_average_once`` (the default), v is set from this very batch, as it would be from the
    first batch of a real run. In LoRA mode the compared gradient is that of the adapter's A
    weight; LoRA's B starts at zero, which makes A's gradient zero, so both models get the same
    seeded random B (std 0.02) first.

    Args:
        spec: the step to probe (its model, precision, mode and strategy are used; its batch
            shape is not).
        device: where to run (``cpu`` or ``cuda``).
        data: probe text, as for :func:`velora_cli.search.data.load_texts` (None: built-in text).
        batch_size: sequences in the batch.
        seq_len: tokens per sequence.
        seed: seed of LoRA's initialization and of the ``random`` init of v.

    Returns:
        ``{"layers": {name: {"cosine": c, "rel_error": e}}, "cosine_min": ..., "cosine_mean":
        ..., "rel_error_max": ..., "batch_size", "seq_len", "data", "tokenization"}``, where
        e = ‖g_velora − g_exact‖ / ‖g_exact‖ (computed in float64) and names are the wrapped
        layers' qualified names. A strategy without VeLoRA approximates nothing: no layers,
        cosines 1.0, error 0.0.

    Raises:
        DataError: the probe data cannot be read or is too short.
        SpecError, ModelError, PlacementError: the spec cannot be built.
    """
    import torch

    probe_spec = _probe_spec(spec, batch_size, seq_len, seed)
    exact = _build(probe_spec.with_strategy(Strategy()), device, seed)
    approx = _build(probe_spec, device, seed)
    if approx.spec.mode == "lora":
        for prepared in (exact, approx):
            _randomize_lora_b(prepared.model, seed)
    inputs = _probe_inputs(probe_spec, data, n_train=1, n_eval=0, seed=seed)
    batch = {k: v.to(device) for k, v in inputs["train"][0].items()}
    for prepared in (exact, approx):
        with _autocast(prepared):
            loss = prepared.model(**batch).loss
        loss.backward()

    exact_params = dict(exact.model.named_parameters())
    approx_params = dict(approx.model.named_parameters())
    layers = {}
    for name in approx.wrapped:
        g_v = approx_params[f"{name}.weight"].grad.detach().double().flatten()
        g_e = exact_params[f"{name}.weight"].grad.detach().double().flatten()
        norm_e, norm_v = torch.linalg.vector_norm(g_e), torch.linalg.vector_norm(g_v)
        if norm_e == 0 and norm_v == 0:
            cosine, rel_error = 1.0, 0.0
        else:
            cosine = float(g_v @ g_e / (norm_v * norm_e)) if norm_v * norm_e > 0 else 0.0
            diff = float(torch.linalg.vector_norm(g_v - g_e))
            rel_error = diff / float(norm_e) if norm_e > 0 else math.inf
        layers[name] = {"cosine": cosine, "rel_error": rel_error}
    cosines = [layer["cosine"] for layer in layers.values()]
    return {
        "layers": layers,
        "cosine_min": min(cosines, default=1.0),
        "cosine_mean": sum(cosines) / len(cosines) if cosines else 1.0,
        "rel_error_max": max((layer["rel_error"] for layer in layers.values()), default=0.0),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "data": inputs["data"],
        "tokenization": inputs["tokenization"],
    }


def _randomize_lora_b(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
            if name.rsplit(".", 2)[-2:-1] == ["lora_B"] and hasattr(module, "weight"):
                noise = torch.randn(module.weight.shape, generator=gen) * _LORA_B_STD
                module.weight.copy_(noise.to(module.weight.dtype))


# -- training probe -----------------------------------------------------------------------------


def training_probe(
    spec: StepSpec,
    *,
    steps: int = DEFAULT_STEPS,
    data: str | None = None,
    seed: int = 0,
    lr: float | None = None,
    warmup_steps: int | None = None,
    probe_batch_size: int = DEFAULT_BATCH_SIZE,
    probe_seq_len: int = DEFAULT_SEQ_LEN,
    eval_batches: int = DEFAULT_EVAL_BATCHES,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train ``steps`` optimizer steps with ``spec.strategy`` and report the held-out loss.

    The model is built as :func:`~velora_cli.measure.train_step.prepare` builds it (same seeded
    weights for every strategy, same precision and mode) and trained with the spec's optimizer
    on consecutive ``probe_batch_size × probe_seq_len`` windows of the probe text, one batch per
    step, in the same order for every strategy; the held-out batches come from the end of the
    text and never overlap the training ones. The baseline is the same call with ``Strategy()``
    (and AdamW for a low-rank optimizer); :func:`compare` gives the relative loss increase. Gradient checkpointing is applied as the
    strategy says (it does not change the numbers); the spec's batch size and gradient
    accumulation are not used (the probe is a proxy with its own, smaller batch).

    Args:
        spec: the step to probe: model, precision, mode, optimizer, init and strategy.
        steps: optimizer steps K (each one batch).
        data: probe text, as for :func:`velora_cli.search.data.load_texts` (None: built-in text).
        seed: seed of LoRA's initialization and of the ``random`` init of v (replaces
            ``spec.seed``). Weights are seeded by :func:`velora_cli.models.build_model`.
        lr: peak learning rate; None: the optimizer's ``DEFAULT_LR`` (1e-3 for AdamW, 1e-2 for
            SGD, galore and adarankgrad).
        warmup_steps: linear warmup from lr/warmup to lr, then cosine decay to lr/10 at step K;
            None: K/8, at least 1.
        probe_batch_size: sequences per step.
        probe_seq_len: tokens per sequence.
        eval_batches: held-out batches (of the same shape) averaged for the loss.
        device: where to run (``cpu`` or ``cuda``).

    Returns:
        A dict with ``loss`` (mean held-out loss after K steps), ``initial_loss`` (the same
        before training, to check the loss moved), ``train_losses`` (K values, one per step),
        ``steps``, ``strategy`` (its label), ``data`` and ``tokenization`` (one-line
        descriptions), ``from_scratch`` (True for random weights) and ``note`` (saying the probe
        then measures from-scratch training dynamics, else None), ``optimizer`` (its name),
        ``optimizer_label`` (with its settings), ``lr``, ``warmup_steps``,
        ``batch_size``, ``seq_len``, ``eval_batches``, ``threads`` (torch's CPU thread count, on
        which the last bits of CPU results may depend) and ``seconds`` (wall time of the call).

    Raises:
        ProbeError: steps < 1 or eval_batches < 1.
        DataError: the probe data cannot be read or is too short for the request.
        SpecError, ModelError, PlacementError: the spec cannot be built.
    """
    import torch

    start = time.perf_counter()
    if steps < 1 or eval_batches < 1:
        raise ProbeError(
            f"a training probe needs at least 1 step and 1 held-out batch, got steps={steps}, "
            f"eval_batches={eval_batches}"
        )
    probe_spec = _probe_spec(spec, probe_batch_size, probe_seq_len, seed)
    lr = DEFAULT_LR[probe_spec.optimizer] if lr is None else lr
    warmup = max(1, steps // 8) if warmup_steps is None else max(1, warmup_steps)
    inputs = _probe_inputs(probe_spec, data, n_train=steps, n_eval=eval_batches, seed=seed)
    prepared = _build(probe_spec, device, seed)
    optimizer = prepared.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(steps, warmup))
    held_out = [{k: v.to(device) for k, v in b.items()} for b in inputs["eval"]]

    initial_loss = _held_out_loss(prepared, held_out)
    train_losses = []
    for batch in inputs["train"]:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(prepared):
            loss = prepared.model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            break  # diverged: the held-out loss below is inf/nan and the strategy fails the gate
    final_loss = _held_out_loss(prepared, held_out)
    from_scratch = not probe_spec.weights
    return {
        "loss": final_loss,
        "initial_loss": initial_loss,
        "train_losses": train_losses,
        "steps": steps,
        "strategy": probe_spec.strategy.label,
        "data": inputs["data"],
        "tokenization": inputs["tokenization"],
        "from_scratch": from_scratch,
        "note": _FROM_SCRATCH if from_scratch else None,
        "optimizer": probe_spec.optimizer,
        "optimizer_label": probe_spec.optimizer_label,
        "lr": lr,
        "warmup_steps": warmup,
        "batch_size": probe_batch_size,
        "seq_len": probe_seq_len,
        "eval_batches": eval_batches,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }


def _lr_factor(steps: int, warmup: int):
    """Step i's learning-rate factor: linear warmup, then cosine decay to MIN_LR_FACTOR at K.

    The decay makes the last steps small, so the final held-out loss reflects where training
    went rather than the last step's jitter (at constant 1e-3 the loss of a from-scratch
    llama-60m still jumps by ±0.2 from step to step).
    """

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i + 1 - warmup) / max(1, steps - warmup)  # (0, 1]
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def compare(probe: dict[str, Any], baseline: dict[str, Any]) -> float:
    """Relative change of the held-out loss against the baseline: 0.01 means +1%.

    Args:
        probe: a :func:`training_probe` result with a strategy or a low-rank optimizer.
        baseline: the same call with ``Strategy()`` (with AdamW for a low-rank optimizer).

    Returns:
        ``(probe["loss"] - baseline["loss"]) / baseline["loss"]``; ``inf`` when the probe's loss
        is not finite (diverged) and the baseline's is.

    Raises:
        ProbeError: the two were run with different settings (steps, data, shapes, or learning
            rate with the same optimizer: different optimizers each train at their own), so
            their losses are not comparable, or the baseline's loss is not finite or not
            positive.
    """
    keys = ("steps", "data", "tokenization", "batch_size", "seq_len", "eval_batches")
    if probe.get("optimizer") == baseline.get("optimizer"):
        keys += ("lr",)
    differ = [k for k in keys if probe.get(k) != baseline.get(k)]
    if differ:
        raise ProbeError(
            f"probe and baseline differ in {', '.join(differ)}; run both with the same settings"
        )
    base = baseline["loss"]
    if not math.isfinite(base) or base <= 0:
        raise ProbeError(f"baseline held-out loss is {base}; the probe cannot be compared to it")
    if not math.isfinite(probe["loss"]):
        return math.inf
    return (probe["loss"] - base) / base


# -- shared pieces ------------------------------------------------------------------------------


def _probe_spec(spec: StepSpec, batch_size: int, seq_len: int, seed: int) -> StepSpec:
    """The spec at probe shapes: one batch per step (no accumulation), the probe's seed."""
    return dataclasses.replace(
        spec, batch_size=batch_size, seq_len=seq_len, grad_accum_steps=1, seed=seed
    )


def _build(spec: StepSpec, device: str, seed: int) -> Prepared:
    """prepare(), with the global RNG seeded (peft draws LoRA's A from it), the caller's kept."""
    import torch

    target = torch.device(device)
    forked = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        return prepare(spec, device)


def _autocast(prepared: Prepared):
    import torch

    if not prepared.spec.amp:
        return contextlib.nullcontext()
    return torch.autocast(prepared.device.type, dtype=torch_dtype(prepared.spec.amp))


def _held_out_loss(prepared: Prepared, batches: list[dict[str, torch.Tensor]]) -> float:
    import torch

    prepared.model.eval()  # VeLoRA layers are plain linears in eval mode: v is not touched
    try:
        with torch.no_grad(), _autocast(prepared):
            losses = [prepared.model(**batch).loss.item() for batch in batches]
    finally:
        prepared.model.train()
    return sum(losses) / len(losses)


def _probe_inputs(spec: StepSpec, data: str | None, *, n_train: int, n_eval: int, seed: int):
    """Token batches for the probe: ``{"train": [...], "eval": [...], "data", "tokenization"}``.

    Causal LMs get ``labels = input_ids`` (the model shifts them); masked LMs get 15% of the
    positions masked (seeded) and labels only there.
    """
    from velora_cli.models import resolve_model

    model_spec = resolve_model(spec.model, trust_remote_code=spec.trust_remote_code)
    vocab_size = model_spec.config.get_text_config().vocab_size
    need = spec.batch_size * spec.seq_len * (n_train + n_eval)
    # A large dataset is not read whole: a fixed cap well above any probe's need (the default
    # text, 465K characters, is read whole), not one derived from K, so that the held-out batches
    # at the end of the text are the same whatever the number of steps.
    texts, data_desc = load_texts(data, max_chars=max(_MAX_CHARS, 8 * need))
    ids, tok_desc = tokenize(texts, model_spec, vocab_size)
    train, held_out = split_batches(ids, spec.batch_size, spec.seq_len, n_train, n_eval)
    if model_spec.task == "masked-lm":
        mask_id = _mask_token_id(model_spec, vocab_size)
        # separate generators: the held-out masks do not depend on the number of steps
        mask_train, mask_held_out = (_masked_batch_maker(mask_id, s) for s in (seed, seed + 1))
        train = [mask_train(b) for b in train]
        held_out = [mask_held_out(b) for b in held_out]
    else:
        train = [{"input_ids": b, "labels": b} for b in train]
        held_out = [{"input_ids": b, "labels": b} for b in held_out]
    return {"train": train, "eval": held_out, "data": data_desc, "tokenization": tok_desc}


def _mask_token_id(model_spec, vocab_size: int) -> int:
    """The tokenizer's mask token, or the last vocabulary id (never a byte) for byte-level."""
    if model_spec.tokenizer_path is not None:
        with contextlib.suppress(Exception):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                model_spec.tokenizer_path, local_files_only=True
            )
            if tokenizer.mask_token_id is not None:
                return int(tokenizer.mask_token_id)
    return vocab_size - 1


def _masked_batch_maker(mask_id: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)

    def make(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        masked = torch.rand(ids.shape, generator=gen) < MLM_PROBABILITY  # (B, T)
        masked[:, 0] |= ~masked.any(dim=1)  # every row predicts at least one token
        return {
            "input_ids": ids.masked_fill(masked, mask_id),
            "labels": ids.masked_fill(~masked, -100),
        }

    return make
