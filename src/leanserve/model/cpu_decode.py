"""Decode-only steps on the CPU, as one flat loop over the decoder's layers.

A batch-1 decode step of the INT4 embedded model on the 2-core host spent ~2.5 ms of its ~6.9 ms forward
in the four int4 matmuls of each layer. Most of the rest went to ~60 small torch ops, nine
``nn.Module`` calls and a dozen Python frames per layer, at about a microsecond each. This loop computes
what the layers' ``forward`` computes, with the same ops in the same order (the hidden states are equal
bit for bit; tested), minus the work that only the layering costs:

- the rotary factors are built once per step, not once per layer;
- queries and keys are rotated as the one slice of the QKV output they already are (no cat, no split);
- the KV write skips its check for padding slots: the CPU runner never pads a step;
- the projections' ``forward`` is called directly, not through ``nn.Module.__call__``.

Measured on that host by ``benchmarks/cpu_decode.py`` (same inputs, alternated), the forward of the INT4
model went 6.9 -> 5.4 ms at batch 1 and 21.0 -> 19.4 ms at batch 16; of the fp32 one, 17.1 -> 15.4 ms at
batch 1.
``LlamaForCausalLM.forward`` takes this path for every step made only of decodes that the CPU runner
describes (``AttentionMetadata.decode_groups``); prefill chunks and CUDA steps take the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from leanserve.kernels import reference
from leanserve.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from leanserve.model.llama import KVCache, LlamaForCausalLM


class _Layer(NamedTuple):
    """One decoder layer's parts as the loop calls them (a tuple: unpacked once per layer and step)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv_proj: Callable[[torch.Tensor], torch.Tensor]
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    gate_up_proj: Callable[[torch.Tensor], torch.Tensor]
    down_proj: Callable[[torch.Tensor], torch.Tensor]
    attend: Callable[..., torch.Tensor]  # PagedAttention.decode


class CpuDecoder:
    """The model's layers, read once: build it after the weights are loaded and packed (the model does,
    at its first decode step)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        config = model.config
        self.eps = config.rms_norm_eps
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                layer.self_attn.qkv_proj.forward,
                layer.self_attn.o_proj.forward,
                layer.mlp.gate_up_proj.forward,
                layer.mlp.down_proj.forward,
                layer.self_attn.attn.decode,
            )
            for layer in model.model.layers
        ]
        self.final_norm = model.model.norm.weight

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (normed) of ``T`` decodes, one token each."""
        rms_norm, silu_and_mul, eps = reference.rms_norm, reference.silu_and_mul, self.eps
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        rotary = self.model.rotary
        factors = reference.rotary_factors(positions, rotary.cos, rotary.sin)
        slots = meta.slot_mapping
        rows = input_ids.shape[0]
        hidden = self.model.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=False):
            if residual is None:
                residual, normed = hidden, rms_norm(hidden, layer.input_norm, eps)
            else:
                normed, residual = rms_norm(hidden, layer.input_norm, eps, residual)
            qkv = layer.qkv_proj(normed)
            rotated = reference.rotate(qkv[:, : (h + kvh) * d].view(rows, h + kvh, d), factors)
            value = qkv[:, (h + kvh) * d :].view(rows, kvh, d)
            reference.write_kv_cache(rotated[:, h:], value, k_cache, v_cache, slots, padded=False)
            out = layer.attend(rotated[:, :h], k_cache, v_cache, meta).reshape(rows, h * d)
            normed, residual = rms_norm(layer.o_proj(out), layer.post_attention_norm, eps, residual)
            hidden = layer.down_proj(silu_and_mul(layer.gate_up_proj(normed)))
        if residual is None:
            return rms_norm(hidden, self.final_norm, eps)
        return rms_norm(hidden, self.final_norm, eps, residual)[0]
