"""Tiny random Llama checkpoints (HF folders) and a word-level text for the quantization tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_checkpoint

VOCAB = 300


def make_tiny_llama(out: Path, num_kv_heads: int = 4, seed: int = 0, logit_scale: float = 1.0) -> Path:
    """A random 2-layer Llama (hidden 64, int4pack-friendly shapes), untied, with uneven norm weights.

    ``logit_scale`` multiplies lm_head so that greedy choices have clear margins (a random model's
    logits are otherwise nearly flat, and any rounding would flip near-ties).
    """

    def adjust(model) -> None:
        model.lm_head.weight.mul_(logit_scale)
        # Uneven input channels, as real models have: what makes activation-aware scaling matter.
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(torch.rand(64) * 3 + 0.1)

    # No pad token: a padding row of the embedding would be zeroed at init, and every row should be random.
    return build_tiny_checkpoint(
        out, "llama", seed, adjust=adjust, num_key_value_heads=num_kv_heads, tie_word_embeddings=False,
        pad_token_id=None,
    )


def write_word_text(path: Path, words: int = 6000, seed: int = 0) -> Path:
    """A random walk over the vocabulary, so text has some structure a model could follow."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-5, 6, (words,), generator=g)
    ids = (steps.cumsum(0) % (VOCAB - 3)) + 3
    path.write_text(" ".join(f"t{i}" for i in ids.tolist()))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", logit_scale=8.0)


@pytest.fixture(scope="session")
def gqa_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grouped-query attention (4 q heads share 2 kv heads): v -> o scales are tied per kv group."""
    return make_tiny_llama(tmp_path_factory.mktemp("gqa") / "llama", num_kv_heads=2, seed=1, logit_scale=8.0)


@pytest.fixture(scope="session")
def word_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("text") / "words.txt")
