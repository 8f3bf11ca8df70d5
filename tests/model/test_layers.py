from __future__ import annotations

import pytest
import torch

from leanserve.model.layers import Linear, RotaryEmbedding, cpu_packing_available


@pytest.mark.skipif(not cpu_packing_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 7, 16, 130])
def test_packed_linear_matches_plain(rows: int) -> None:
    torch.manual_seed(rows)
    layer = Linear(48, [32, 16], bias=True)
    x = torch.randn(rows, 48)
    expected = layer(x)
    layer.pack_for_cpu()
    assert layer.weight.numel() == 0  # the plain copy is gone
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_load_shard_places_each_checkpoint_tensor() -> None:
    layer = Linear(4, [2, 3], bias=False)
    layer.load_shard("weight", 1, torch.full((3, 4), 7.0))
    layer.load_shard("weight", 0, torch.full((2, 4), 5.0))
    assert layer.weight[:2].eq(5).all() and layer.weight[2:].eq(7).all()
    with pytest.raises(ValueError):
        layer.load_shard("weight", 0, torch.zeros(3, 4))


def test_rotary_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0)
    theirs = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(16, 128, 10000.0)
    positions = torch.tensor([0, 5, 77, 127])
    q, k = torch.randn(4, 4, 16), torch.randn(4, 2, 16)
    cos, sin = theirs(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = ours(positions, q, k)
    assert torch.allclose(q_ours, q_ref[0].transpose(0, 1), atol=1e-5)
    assert torch.allclose(k_ours, k_ref[0].transpose(0, 1), atol=1e-5)
