"""The causal-LM loss as the run's transformers release computed it from the logits, and the
K/V that release's GPTBigCode kept in training (`holds_presents`).

The model's own loss (``model(**batch).loss``, the ``hf`` trainer's step) is computed by the
installed transformers. Earlier releases computed it differently, and the logits are the step's
widest tensors, so the difference is often the step's peak. Read in transformers' own files
(wheels from PyPI: ``transformers/loss/loss_utils.py`` and the models' ``modeling_*.py``), per
logit of a bf16 model (B x L x V of them):

* installed (4.49 on, 5.x): ``ForCausalLMLoss`` upcasts (``logits.float()``), pads the *labels*
  by one ``-100`` and shifts them, and gives the fp32 logits to ``cross_entropy`` as they are.
  Its forward holds the model's bf16 logits, the fp32 copy and the fp32 log-softmax (2+4+4
  bytes); its backward the log-softmax, its incoming gradient and its result (4+4+4). Nothing
  is patched.
* ``shifted_fp32`` (``ForCausalLMLoss`` of 4.46-4.48, called by Llama and Mixtral from 4.46,
  by Mistral and Granite from 4.48): the same upcast, then ``logits[..., :-1, :].contiguous()``,
  an fp32 copy of every position but the last, into ``cross_entropy``. The model's forward still
  holds its bf16 logits: 2+4+4+4 bytes in the forward.
* ``inline_fp32`` (the causal LMs' own inline loss before they called ``loss_function``: Llama,
  Mistral, Mixtral 4.39-4.45, Mistral and Granite to 4.47): ``logits = logits.float()`` replaces
  the bf16 logits (freed; the output carries the fp32 ones), then the same shifted fp32 copy:
  4+4+4 bytes in the forward, as much as the backward.
* ``shifted_native`` (GPTBigCode through 4.48: ``GPTBigCodeForCausalLM.forward`` computed
  ``lm_logits[..., :-1, :].contiguous()`` into ``CrossEntropyLoss()`` without ``float()``; 4.49
  moved it to ``self.loss_function``): the shifted copy and the log-softmax stay bf16, 2+2+2 bytes
  in the forward and in the backward, instead of 4+4+4. On bigcode/gpt_bigcode-santacoder
  (V = 49,153) at 8 x 2048 tokens that is 4.83 GB less at the loss.

Read: ``loss_utils.py`` of 4.46.3, 4.47.1, 4.48.1 (shifted copy) and 4.49.0, 4.50.0, 4.52.4,
4.54.0 (labels padded); ``modeling_gpt_bigcode.py`` of 4.44.2, 4.45.2, 4.46.3, 4.47.1, 4.48.1
(inline, no upcast) and 4.49.0 (``self.loss_function``); ``modeling_{llama,mistral,mixtral}.py``
of 4.39.3, 4.43.3, 4.44.2, 4.45.2, 4.46.3, 4.47.1, 4.48.1 and ``modeling_granite.py`` of 4.45.2,
4.46.3, 4.47.1, 4.48.1. Releases between two read ones that agree are taken to agree; a model
type or release not read (before 4.39, or another architecture before 4.49) keeps the installed
model's loss, and `loss_path` says so by returning None.

GPTBigCode 4.39-4.52 also kept each block's ``present`` (a view of its ``c_attn`` output)
whenever the config's ``use_cache`` was on (its default), gradient checkpointing or not, until
the model's output was dropped (`holds_presents`): under reentrant checkpointing, where the
blocks save nothing, santacoder's 24 blocks at 8 x 2048 tokens hold 24 x 16384 x 2304 x 2 =
1.81 GB more at the loss.

The path is patched in by wrapping the model's ``forward``: the installed forward runs without
``labels`` (its logits, no loss), then the release's loss is computed from its output, so the
layers up to the logits, and everything after the loss, stay the installed model's. The cpu
backend runs the same patched model as the estimate traces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

LOSS_PATHS = ("shifted_fp32", "inline_fp32", "shifted_native")
# the first release whose ForCausalLMLoss pads the labels instead of copying the shifted logits,
# and in which GPTBigCode calls self.loss_function (read in 4.49.0's wheel)
PADDED_FROM = (4, 49)
# the earliest release read; before it the installed model's loss is kept
READ_FROM = (4, 39)
# model type -> the first release whose causal LM called self.loss_function (4.46-4.48's
# ForCausalLMLoss: shifted_fp32); before it, the model's own inline loss
_LOSS_FUNCTION_FROM: dict[str, tuple[int, int]] = {
    "llama": (4, 46),
    "mixtral": (4, 46),
    "mistral": (4, 48),
    "granite": (4, 48),
    "gpt_bigcode": PADDED_FROM,
}
# model type -> its inline loss before it called self.loss_function
_INLINE = {
    "llama": "inline_fp32",
    "mixtral": "inline_fp32",
    "mistral": "inline_fp32",
    "granite": "inline_fp32",
    "gpt_bigcode": "shifted_native",
}


class VersionError(ValueError):
    """A transformers version that is not ``MAJOR.MINOR[.PATCH...]``."""


def release(version: str) -> tuple[int, int]:
    """``"4.48.1"`` -> ``(4, 48)``; local and dev suffixes are ignored (``"4.49.0.dev0"``).

    Raises:
        VersionError: not ``MAJOR.MINOR[...]`` with numeric major and minor.
    """
    parts = version.strip().split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise VersionError(
            f"transformers version {version!r}: give MAJOR.MINOR[.PATCH], e.g. 4.48.1"
        ) from None


def loss_path(model_type: str | None, transformers_version: str | None) -> str | None:
    """The causal-LM loss path of ``model_type`` under ``transformers_version``.

    Returns:
        One of `LOSS_PATHS`, or None where the installed model's loss is the release's (4.49
        on, no version given) or the release's was not read (see the module's list).

    Raises:
        VersionError: a malformed version.
    """
    if transformers_version is None:
        return None
    version = release(transformers_version)
    model_type = model_type or ""
    if version >= PADDED_FROM or version < READ_FROM or model_type not in _INLINE:
        return None
    if version >= _LOSS_FUNCTION_FROM[model_type]:
        return "shifted_fp32"
    return _INLINE[model_type]


def unread(
    model_type: str | None, transformers_version: str | None, task: str = "causal-lm"
) -> str | None:
    """What a user planning for ``transformers_version`` should know when the step cannot take
    that release's loss: a release before 4.49 whose causal-LM loss (``model_type``'s, or any
    before 4.39) was not read keeps the installed model's, which may hold other bytes at the
    logits; None when the loss is the release's, or the head (``task``) is not a causal LM,
    whose loss the release's version does not change in the step."""
    if task != "causal-lm":
        return None
    if transformers_version is None or release(transformers_version) >= PADDED_FROM:
        return None
    if loss_path(model_type, transformers_version) is not None:
        return None
    return (
        f"--transformers-version {transformers_version}: the loss of {model_type or 'this model'} "
        f"in that release was not read (velora reads 4.39-4.48 for "
        f"{', '.join(sorted(_INLINE))}); the step takes the installed transformers' loss, whose "
        "logits copies may differ from that release's"
    )


def shifted_bytes(batch: int, seq_len: int, vocab: int, itemsize: int) -> int:
    """Bytes of one ``[B, L-1, V]`` tensor: the shifted copy of the logits, or the log-softmax,
    its gradient and its result, each of which the shifted paths allocate once."""
    return batch * (seq_len - 1) * vocab * itemsize


def shifted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The releases' loss, written from their description above (not their code): the logits of
    every position but the last, copied, against the labels of every position but the first;
    the mean over the labels that are not ``ignore_index``, or the sum over
    ``num_items_in_batch`` (4.46-4.48's ``fixed_cross_entropy`` when the Trainer passed it)."""
    import torch.nn.functional as F

    shifted = logits[..., :-1, :].contiguous()  # (B, L-1, V): the copy these releases made
    targets = labels[..., 1:].contiguous().to(shifted.device)  # (B, L-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        shifted.view(-1, shifted.size(-1)),
        targets.view(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def holds_presents(model_type: str | None, transformers_version: str | None) -> bool:
    """Whether the release's forward kept each layer's K/V (``presents``) in training.

    GPTBigCode 4.39-4.52 (read: 4.39.3, 4.43.3, 4.44.2, 4.45.2, 4.48.1, 4.49.0, 4.50.0, 4.51.3,
    4.52.4) appended every block's ``present`` to ``presents`` whenever ``use_cache`` was on,
    gradient checkpointing or not, and returned them as ``past_key_values``; 4.53.0 turned the
    cache off under checkpointing (``GradientCheckpointingLayer``). ``present`` is ``key_value``,
    a view of the block's ``c_attn`` output (``c_attn(h).split((embed_dim, 2 * kv_dim))`` with
    multi-query attention), so the whole (B, L, embed_dim + 2 kv_dim) projection stays allocated
    until the model's output is dropped: through the loss, where the forward's peak is.
    """
    if transformers_version is None or model_type != "gpt_bigcode":
        return False
    return READ_FROM <= release(transformers_version) < (4, 53)


def _forward_with(path: str | None, forward, projections: list):
    """``forward`` (the installed model's) computing its loss by ``path`` (None: its own), and
    holding the output of every module in ``projections`` in its output's ``past_key_values``
    (`holds_presents`)."""

    def hold(module, inputs, output):
        held.append(output)  # (B, L, E + 2 kv): the storage a release's `present` viewed

    held: list = []

    def patched(*args: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any):
        # hooks only around this call: a checkpointed block's recompute in the backward holds
        # nothing, as the release's recomputed presents were dropped
        handles = [module.register_forward_hook(hold) for module in projections]
        try:
            if path is None:  # the installed loss
                outputs = forward(*args, labels=labels, **kwargs)
            else:  # no labels: the installed logits, no loss
                outputs = forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if held:
            outputs["past_key_values"] = tuple(held)
            held.clear()
        if labels is None or path is None:
            return outputs
        if path == "inline_fp32":  # logits = logits.float(): the half logits are let go
            outputs["logits"] = outputs.logits.float()
            logits = outputs.logits
        elif path == "shifted_fp32":  # ForCausalLMLoss's local upcast; the output keeps the half
            logits = outputs.logits.float()
        else:  # shifted_native: the logits' own dtype
            logits = outputs.logits
        outputs["loss"] = shifted_cross_entropy(logits, labels, num_items_in_batch)
        return outputs

    return patched


def apply_loss_path(
    model: nn.Module, task: str, transformers_version: str | None, use_cache: bool = False
) -> str | None:
    """Make ``model`` compute its causal-LM loss as ``transformers_version`` did, and hold what
    that release's forward held (`holds_presents`, where the config's ``use_cache`` is on).

    Args:
        model: the model the step trains (under PEFT, its base model is patched).
        task: the model's task (`models.TASKS`); only ``causal-lm`` is patched.
        transformers_version: the release of the run planned; None: the installed one.
        use_cache: the model config's ``use_cache`` as the run had it (velora builds every
            model with it off; GPTBigCodeConfig's default is on).

    Returns:
        The loss path patched in (one of `LOSS_PATHS`), or None where the model keeps its own
        loss.
    """
    if task != "causal-lm":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    path = loss_path(model_type, transformers_version)
    projections = []
    if use_cache and holds_presents(model_type, transformers_version):
        projections = [
            module
            for name, module in base.named_modules()
            if name.endswith("attn.c_attn") and not name.endswith("crossattention.c_attn")
        ]
    if path is not None or projections:
        base.forward = _forward_with(path, base.forward, projections)
    return path
