"""The velora format: the tuned configuration itself (`VeloraConfig.to_dict`), for
`velora_cli.apply_config`, `velora_cli.make_optimizer` and `velora_cli.VeloraCallback`."""

from __future__ import annotations

from velora_cli.configs import VeloraConfig
from velora_cli.exports import Export


def export(config: VeloraConfig) -> Export:
    """``{"format": "velora-config", "version": 1, ...}``: every field, nothing to refuse."""
    return Export(config.to_dict())
