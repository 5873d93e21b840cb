"""Whose training step is measured: the loss each trainer computes from the model, and what else
it computes from the logits every step.

* ``hf`` (the default, what every step measured before there was a choice): the model's own loss,
  ``model(**batch).loss``, from the full ``[B, L, V]`` logits. transformers' ``Trainer`` computes
  it this way (``Trainer.compute_loss``), and so does a plain PyTorch loop that calls the model
  with ``labels`` (the torchrun export's script): both run this step, so there is no separate
  choice for a plain loop.
* ``trl``: TRL 1.x ``SFTTrainer``'s step. Read in TRL 1.16 (``trainer/sft_trainer.py``
  ``__init__`` and ``compute_loss``, ``trainer/utils.py::add_fused_lm_head``,
  ``kernels/chunked_logprob.py``): ``SFTTrainer`` patches the model's forward with
  ``add_fused_lm_head(base_model, outputs=("log_probs", "entropy", "is_top1"))`` (the base model
  under PEFT) and calls ``model(**inputs, use_cache=False, fused_lm_head=True)``. That forward
  never builds the full logits: it runs the LM head over tiles of at most 4096 tokens × 32768
  vocabulary entries (one scratch tile, whatever the vocabulary), folding each into fp32 running
  statistics; the token log-probabilities, the entropy and whether the label is the argmax come
  back as ``[B, L-1]`` tensors. The loss is ``-log_probs.sum() / label_mask.sum()``; then the
  entropy (detached), the correct-token count, the label count and the attention mask's token
  count are summed for the logged metrics. Where Triton runs (CUDA, XPU) the fold is a Triton
  kernel over the valid positions only; elsewhere (this CPU, and the estimate's meta tensors) it
  is torch ops over every position, which allocate fp32 temporaries of the tile's size.

  This step runs TRL's own ``add_fused_lm_head`` (TRL must be importable): the memory measured
  is that of the code the user's ``SFTTrainer`` runs, in the installed version. On the estimate
  backend the tile fold is torch's, not Triton's: more temporaries than a GPU allocates, so the
  estimate of the head's peak errs high (the safe side); the cpu backend runs the same path as a
  CPU run.

What does not differ between the two is left to the step's other settings (precision,
checkpointing, optimizer): the exports state them explicitly, since ``SFTConfig`` turns
checkpointing and bf16 on by default where ``TrainingArguments`` does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

TRAINERS = ("hf", "trl")
DEFAULT_TRAINER = "hf"
# what SFTTrainer asks of its fused head (TRL 1.16 sft_trainer.py: "is_top1" feeds the logged
# mean_token_accuracy, "entropy" the logged entropy)
TRL_OUTPUTS = ("log_probs", "entropy", "is_top1")


class TrainerUnavailable(ImportError):
    """``--trainer trl`` where TRL cannot be imported (the message says what to install)."""


def trl_version() -> str | None:
    """The installed TRL's version, or None when it cannot be imported."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def patch_model(model: nn.Module, trainer: str) -> None:
    """Make ``model`` compute ``trainer``'s loss, as that trainer does to it before training.

    ``trl``: TRL's ``add_fused_lm_head`` on the base model (under PEFT: ``get_base_model()``, the
    model TRL patches). ``hf``: nothing.

    Raises:
        TrainerUnavailable: ``trl`` without TRL installed.
        ValueError: an unknown trainer, or a model without an output embedding (not a causal LM).
    """
    if trainer == "hf":
        return
    if trainer != "trl":
        raise ValueError(f"--trainer {trainer!r}: choose {'|'.join(TRAINERS)}")
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        raise TrainerUnavailable(
            "--trainer trl measures TRL's SFTTrainer step with TRL's own code, and TRL cannot "
            "be imported here: pip install trl"
        ) from None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.get_output_embeddings() is None:
        raise ValueError(
            f"--trainer trl: {type(base).__name__} has no LM head; TRL's SFTTrainer trains "
            "causal language models"
        )
    add_fused_lm_head(base, outputs=TRL_OUTPUTS)


@contextlib.contextmanager
def _meta_autocast_queries(amp: str | None) -> Iterator[None]:
    """Answer ``torch.is_autocast_enabled("meta")`` / ``torch.get_autocast_dtype("meta")`` as
    CUDA autocast would under ``amp`` (the estimate emulates autocast on meta, which has no
    autocast of its own, and torch raises for it): TRL's head picks its tile dtype from them."""
    import torch

    enabled, dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    halves = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def is_enabled(*args):
        if args and args[0] == "meta":
            return amp is not None
        return enabled(*args)

    def get_dtype(device_type):
        return halves[amp] if device_type == "meta" and amp else dtype(device_type)

    torch.is_autocast_enabled, torch.get_autocast_dtype = is_enabled, get_dtype
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, dtype


def loss_of(
    model: nn.Module, batch: dict[str, Any], trainer: str, amp: str | None = None
) -> torch.Tensor:
    """The loss ``trainer`` computes for one micro-batch, with what it also computes every step.

    Args:
        model: a model prepared by `patch_model` for ``trainer``.
        batch: ``input_ids``, ``attention_mask``, ``labels``.
        trainer: ``hf`` or ``trl``.
        amp: the step's autocast dtype (``bf16``/``fp16``) or None; used on meta only, where
            autocast is emulated.

    Returns:
        The scalar loss to call ``backward`` on (before division by accumulation steps).
    """
    if trainer == "hf":
        return model(**batch).loss
    import torch

    # TRL 1.16 compute_loss: use_cache off, the fused head, loss = -sum(log p) / valid labels
    meta = batch["input_ids"].device.type == "meta"
    with _meta_autocast_queries(amp) if meta else contextlib.nullcontext():
        outputs = model(**batch, use_cache=False, fused_lm_head=True)
    loss = -outputs.log_probs.sum() / torch.as_tensor(outputs.label_mask.sum()).clamp(min=1)
    # the logged metrics (compute_loss, "Entropy and token accuracy" and num_tokens): small
    # reductions, read back as Python numbers where the values are real
    metrics = [
        outputs.label_mask.sum(),
        outputs.entropy.detach().sum(),
        outputs.is_top1.sum(),
        # TRL's num_tokens: the attention mask's sum, or a packed row's length
        batch["attention_mask"].sum()
        if "attention_mask" in batch
        else torch.tensor(batch["position_ids"].size(1)),
    ]
    if not meta:
        _ = [m.item() for m in metrics]
    del outputs, metrics
    return loss
