"""Shared test setup: hermetic (no hub), CPU, tiny models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no helper process for estimates unless a test asks for one (tests/test_estimate_pool.py):
# the suite already runs on every core (pytest-xdist)
os.environ.setdefault("VELORA_ESTIMATE_WORKERS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny test models gain nothing from two, and two OpenMP threads stall badly when
# anything else shares a 2-core machine (a 13 ms step measured at 0.5-1 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _profiles_in_tmp(monkeypatch, tmp_path_factory):
    """Every test saves its documents in a folder of its own, never in the repository's
    ``profiles/``: the suite runs on several workers at once (pytest-xdist), and a test that
    looks up "the latest tune" must not find another test's."""
    monkeypatch.setenv("VELORA_PROFILES_DIR", str(tmp_path_factory.mktemp("profiles")))


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=128,
        use_cache=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 16), generator=gen)


@pytest.fixture
def mha_dir(tmp_path):
    """A local checkpoint dir of a tiny Llama with as many kv heads as heads, so the fused
    attention kernels (CPU, and those the estimate predicts for a GPU) save alike."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=256,
    ).save_pretrained(tmp_path / "mha")
    return str(tmp_path / "mha")
