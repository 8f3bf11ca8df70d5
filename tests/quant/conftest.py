"""Tiny random Llama checkpoints (HF folders) and a word-level text for the quantization tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 300


def make_tiny_llama(out: Path, num_kv_heads: int = 4, seed: int = 0, logit_scale: float = 1.0) -> Path:
    """Save a random 2-layer Llama (hidden 64, int4pack-friendly shapes) with a word-level tokenizer.

    ``logit_scale`` multiplies lm_head so that greedy choices have clear margins (a random model's
    logits are otherwise nearly flat, and any rounding would flip near-ties).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=1, bos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
        # Uneven input channels, as real models have: what makes activation-aware scaling matter.
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(torch.rand(64) * 3 + 0.1)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", bos_token="t0", unk_token="t2").save_pretrained(out)
    return out


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
