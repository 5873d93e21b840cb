"""Which layers VeLoRA wraps: architecture-aware presets, glob patterns, apply and remove.

A layer's *role* (q, k, v, o, gate, up, down, or fused qkv / gate_up) is read from its qualified
name, which is how Llama/Mistral/Qwen2, BERT/RoBERTa, ViT and GPT-2 name their block layers.
Presets select roles, and only inside transformer blocks (a path with a numeric ModuleList index:
``model.layers.3.mlp.down_proj``), so embeddings, ``lm_head`` and classifier heads are never
selected by a preset. Explicit glob patterns select whatever linear layers they match.

Memory truth (REFERENCE.md §2): compressing one consumer of a shared input frees nothing while its
siblings still save that input. Llama's q/k/v share one input and gate/up another; only the down
projection's input belongs to one layer. ``shared_input_note`` tells the profiler about this.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from torch import nn

from .quant import is_quantized
from .velora import (
    VeLoRAConv1D,
    VeLoRALinear,
    is_velora,
    resolve_sub_token_size,
)

DEFAULT_NUM_GROUPS = 32  # paper Table 5b: M = D/32 is the sweet spot

# (role, suffix globs on the qualified name), checked in order, first match wins: specific
# names first (BERT's ``attention.output.dense`` is its o projection, ``output.dense`` alone its down
# projection), the bare ``*.dense`` (GPT-NeoX/Phi attention output) last.
ROLE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("o", ("*.attention.output.dense",)),
    ("down", ("*.output.dense",)),
    ("up", ("*.intermediate.dense",)),
    ("qkv", ("*.c_attn", "*.qkv_proj", "*.query_key_value", "*.Wqkv")),
    ("gate_up", ("*.gate_up_proj",)),
    ("q", ("*.q_proj", "*.query")),
    ("k", ("*.k_proj", "*.key")),
    ("v", ("*.v_proj", "*.value")),
    ("o", ("*.o_proj", "*.attn.c_proj", "*.out_proj")),
    ("gate", ("*.gate_proj", "*.w1")),
    ("up", ("*.up_proj", "*.mlp.c_fc", "*.fc1", "*.w3")),
    ("down", ("*.down_proj", "*.mlp.c_proj", "*.fc2", "*.w2")),
    ("o", ("*.dense",)),
)

PRESETS: dict[str, frozenset[str]] = {
    # paper §5.4: value projection + MLP down projection. Where v is fused into one qkv layer
    # (GPT-2's c_attn) the fused layer stands in for it.
    "paper": frozenset({"v", "qkv", "down"}),
    "qkv": frozenset({"q", "k", "v", "qkv"}),
    "attn": frozenset({"q", "k", "v", "o", "qkv"}),
    "mlp": frozenset({"gate", "up", "down", "gate_up"}),
    "down": frozenset({"down"}),
    "all-linear": frozenset({"*"}),
}

# Roles whose layers read the same input tensor inside one block.
SHARED_INPUTS: tuple[frozenset[str], ...] = (frozenset({"q", "k", "v"}), frozenset({"gate", "up"}))

_BLOCK_INDEX = re.compile(r"(^|\.)\d+\.")


class PlacementError(ValueError):
    """A placement that names no preset, matches no layer, or is otherwise unusable."""


FROZEN_REASON = "selects only layers that do not train"  # FrozenPlacementError's message


class FrozenPlacementError(PlacementError):
    """A placement whose layers all exist but none trains (e.g. ``mlp`` on a model whose LoRA
    adapters sit on attention only): a strategy that cannot apply to this model, not a typo."""


def layer_role(name: str) -> str | None:
    """The role of a block layer from its qualified name, or None when unknown."""
    for role, globs in ROLE_RULES:
        if any(fnmatch.fnmatchcase(name, g) for g in globs):
            return role
    return None


def in_block(name: str) -> bool:
    """True when the module lives inside a repeated transformer block (numbered ModuleList)."""
    return bool(_BLOCK_INDEX.search(name))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _frozen(module: nn.Module) -> bool:
    """A layer whose weight does not train (a LoRA model's base layer without an adapter, or
    one the user froze): it forms no weight gradient, so VeLoRA has nothing to compress there
    (a VeLoRA layer with a frozen weight runs as a plain linear)."""
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.requires_grad


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers VeLoRA could wrap, by qualified name.

    Plain ``nn.Linear`` and GPT-2 ``Conv1D`` layers that train, and peft LoRA layers (whose
    adapters' A projections are wrapped); modules nested inside a LoRA layer, layers already
    wrapped, frozen layers and 4-bit (qlora) base layers are skipped.
    """
    found: dict[str, nn.Module] = {}
    # the LoRA layer met last: named_modules walks depth first, so its submodules (and only
    # they) come right after it, before the next LoRA layer (one prefix, not all of them: the
    # test against every prefix met so far took seconds on a 7B model)
    skip = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if _is_lora_layer(module):
            found[name] = module
            skip = name + "."
        elif is_velora(module) or is_quantized(module) or _frozen(module):  # no weight grad
            continue
        elif isinstance(module, nn.Linear) or _is_conv1d(module):
            found[name] = module
    return found


def parse_placement(layers: str | list[str] | tuple[str, ...]) -> tuple[frozenset[str], list[str]]:
    """Split a ``layers`` argument into preset roles and explicit patterns.

    A string is a preset or ``+``-combination of presets (``"qkv+down"``); a list holds glob
    patterns on qualified names (``"*.mlp.down_proj"``) or plain substrings (``"proj"``).
    """
    if isinstance(layers, str):
        roles: set[str] = set()
        for part in layers.split("+"):
            part = part.strip()
            if part not in PRESETS:
                raise PlacementError(
                    f"unknown placement {part!r}; presets: {', '.join(PRESETS)} (combine with '+'),"
                    " or pass a list of glob patterns such as ['*.mlp.down_proj']"
                )
            roles |= PRESETS[part]
        return frozenset(roles), []
    patterns = [str(p) for p in layers]
    if not patterns:
        raise PlacementError("empty list of layer patterns")
    return frozenset(), patterns


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def select_layers(model: nn.Module, layers: str | list[str] = "paper") -> dict[str, nn.Module]:
    """The layers a placement selects, by qualified name (not yet wrapped).

    Raises:
        PlacementError: unknown preset, or nothing matched (the message lists example names).
    """
    roles, patterns = parse_placement(layers)
    candidates = candidate_layers(model)
    chosen = {}
    for name, module in candidates.items():
        if patterns:
            if any(_matches(name, p) for p in patterns):
                chosen[name] = module
        elif in_block(name) and ("*" in roles or layer_role(name) in roles):
            chosen[name] = module
    if not chosen:
        frozen = _frozen_matches(model, roles, patterns)
        if frozen:
            raise FrozenPlacementError(
                f"placement {layers!r} {FROZEN_REASON} ({len(frozen)} frozen, e.g. "
                f"{frozen[0]}): no weight gradient, nothing for VeLoRA to compress; in LoRA "
                "modes choose a placement that covers the adapters (--lora-targets)"
            )
        examples = ", ".join(list(candidates)[:6]) or "none"
        raise PlacementError(
            f"placement {layers!r} matched no linear layer in {type(model).__name__}; "
            f"its linear layers include: {examples}"
        )
    return chosen


def _frozen_matches(model: nn.Module, roles: frozenset[str], patterns: list[str]) -> list[str]:
    """The frozen plain linears a placement would select if frozen layers counted."""
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or _is_conv1d(module))
        and _frozen(module)
        and not is_quantized(module)
        and not name.endswith(".base_layer")  # inside a LoRA layer: the adapter is the candidate
        and (
            any(_matches(name, p) for p in patterns)
            if patterns
            else in_block(name) and ("*" in roles or layer_role(name) in roles)
        )
    ]


def _size_for(name: str, value: int | Mapping[str, int] | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    for pattern, size in value.items():
        if _matches(name, pattern):
            return int(size)
    raise PlacementError(
        f"no entry of {dict(value)!r} matches layer {name}; add a pattern for it (e.g. '*')"
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _wrap(module: nn.Module, *, sub_token_size: int, init: str, seed: int) -> nn.Module:
    if _is_conv1d(module):
        return VeLoRAConv1D.from_conv1d(module, sub_token_size=sub_token_size, init=init, seed=seed)
    return VeLoRALinear.from_linear(module, sub_token_size=sub_token_size, init=init, seed=seed)


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.in_features


def apply_velora(
    model: nn.Module,
    layers: str | list[str] = "paper",
    sub_token_size: int | Mapping[str, int] | None = None,
    num_groups: int | Mapping[str, int] | None = None,
    init: str = "batch_average_once",
    seed: int = 0,
) -> list[str]:
    """Replace the selected linear layers of ``model`` by VeLoRA layers, in place.

    Args:
        model: any torch module; Hugging Face models get architecture-aware presets.
        layers: a preset (``paper``, ``qkv``, ``attn``, ``mlp``, ``down``, ``all-linear``, or a
            ``+`` combination such as ``qkv+down``) or a list of glob patterns on qualified
            module names (plain strings match as substrings).
        sub_token_size: M, an int or a mapping pattern -> int (layers differ in width).
        num_groups: D / M instead of M, an int or a mapping pattern -> int. With neither given,
            num_groups = 32 (the paper's M = D/32).
        init: ``batch_average_once`` (paper default), ``batch_average`` or ``random``.
        seed: seed of the ``random`` init (each layer gets seed + its index).

    Returns:
        The qualified names of the wrapped layers. For peft LoRA layers the wrapped modules are
        the adapters' A projections (``...q_proj.lora_A.default``).

    Raises:
        PlacementError: unknown preset, nothing matched, a size mapping misses a layer, or the
            placement selects layers that are VeLoRA layers already (`remove_velora` first).
        SubTokenSizeError: a sub-token size or group count that does not divide a layer's width.
    """
    if sub_token_size is not None and num_groups is not None:
        raise PlacementError("give sub_token_size or num_groups, not both")
    if sub_token_size is None and num_groups is None:
        num_groups = DEFAULT_NUM_GROUPS
    already = _already_wrapped(model, layers)
    if already:
        name, module = next(iter(already.items()))
        more = f" and {len(already) - 1} more" if len(already) > 1 else ""
        raise PlacementError(
            f"placement {layers!r} selects layers that are VeLoRA layers already ({name}, "
            f"sub_token_size {module.sub_token_size}{more}); call remove_velora(model) first "
            "to apply them with new settings"
        )
    selected = select_layers(model, layers)

    # Expand LoRA layers into their adapters' A projections (the paper's fine-tuning placement).
    targets: dict[str, nn.Module] = {}
    for name, module in selected.items():
        if _is_lora_layer(module):
            for adapter, lora_a in module.lora_A.items():
                if isinstance(lora_a, nn.Linear) and not is_velora(lora_a):
                    targets[f"{name}.lora_A.{adapter}"] = lora_a
        else:
            targets[name] = module

    # Validate every layer before touching the model: all or nothing.
    sizes = {}
    for name, module in targets.items():
        sizes[name] = resolve_sub_token_size(
            _in_features(module),
            sub_token_size=_size_for(name, sub_token_size),
            num_groups=_size_for(name, num_groups),
            layer=name,
        )
    for index, (name, module) in enumerate(targets.items()):
        _set_submodule(
            model, name, _wrap(module, sub_token_size=sizes[name], init=init, seed=seed + index)
        )
    return list(targets)


def _already_wrapped(model: nn.Module, layers: str | list[str]) -> dict[str, nn.Module]:
    """The VeLoRA layers of ``model`` that ``layers`` would select (a LoRA adapter's wrapped A
    projection counts as its LoRA layer), by qualified name."""
    roles, patterns = parse_placement(layers)
    found = {}
    for name, module in velora_layers(model).items():
        owner = name.split(".lora_A.")[0]  # ...q_proj.lora_A.default -> ...q_proj
        if patterns:
            hit = any(_matches(owner, p) for p in patterns)
        else:
            hit = in_block(owner) and ("*" in roles or layer_role(owner) in roles)
        if hit:
            found[name] = module
    return found


def remove_velora(model: nn.Module) -> list[str]:
    """Put plain ``nn.Linear`` / ``Conv1D`` layers back, with the same parameters.

    Returns:
        The qualified names of the layers restored.
    """
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, VeLoRALinear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, VeLoRAConv1D):
            _set_submodule(model, name, module.to_conv1d())
        else:
            continue
        restored.append(name)
    return restored


def velora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The VeLoRA layers in ``model``, by qualified name."""
    return {name: m for name, m in model.named_modules() if is_velora(m)}


def shared_input_note(model: nn.Module, names: list[str] | dict[str, nn.Module]) -> str | None:
    """Say which selected layers free nothing because an unselected sibling saves their input.

    Siblings are layers of the same block (same parent module) whose roles read one input
    (``SHARED_INPUTS``: q/k/v, gate/up). Returns one line such as
    ``"v_proj's input is still saved by q_proj, k_proj: compressing it frees nothing"``, or None.
    """
    selected = set(names)
    candidates = candidate_layers(model)
    notes: dict[str, set[str]] = {}
    for name in selected:
        parent, _, leaf = name.rpartition(".")
        role = layer_role(name)
        group = next((g for g in SHARED_INPUTS if role in g), None)
        if group is None:
            continue
        grand = parent.rpartition(".")[0]  # q/k/v live in self_attn, gate/up in mlp
        holders = {
            other.rpartition(".")[2]
            for other in candidates
            if other not in selected
            and other.rpartition(".")[0] in (parent, grand)
            and layer_role(other) in group
        }
        if holders:
            notes.setdefault(leaf, set()).update(holders)
    if not notes:
        return None
    parts = [
        f"{leaf}'s input is still saved by {', '.join(sorted(h))}"
        for leaf, h in sorted(notes.items())
    ]
    return "; ".join(parts) + ": compressing it frees nothing there"
