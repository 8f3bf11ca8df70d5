"""A Llama-family decoder (Llama, Mistral, Qwen2) over flattened, variable-length batches.

Every forward pass takes the step's tokens back to back (``input_ids [T]``, ``positions [T]``) with no
padding; sequence boundaries live in the ``AttentionMetadata``. Parameter names follow Hugging Face
checkpoints, except that q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from leanserve.kernels.backend import DecodeOps, LayerOps, ModelOps
from leanserve.model.attention import AttentionMetadata, PagedAttention
from leanserve.model.config import ModelConfig
from leanserve.model.cpu_decode import CpuDecoder
from leanserve.model.layers import (
    Linear,
    LinearFactory,
    RMSNorm,
    RotaryEmbedding,
    cpu_packing_available,
    int8_linear,
    int8_mm_supported,
    pack_cpu_weight,
    packed_linear,
    quantize_int8_per_channel,
)

KVCache = tuple[torch.Tensor, torch.Tensor]

# Quantized models, and fp32 ones served with bf16 decoder weights, get an int8 copy of the LM head for
# decode-sized calls (see quantize_lm_head_int8 and the loader).
# torch's int8 kernel works 4 rows at a time, so its cost steps at 4, 8, 12 rows. ms per call for
# SmolLM2's 49152x576 head on the 2-core host, load ~1 (int8 including the fp32 re-scoring below, against
# the oneDNN-packed fp32 head):
#   rows   1    4    5    8    9   16   32
#   int8  1.2  1.2  2.4  2.5  3.4  4.7  9.1
#   fp32  2.6  2.3  3.0  3.0  3.1  3.5  5.2
# From 9 rows on the fp32 head is faster, and exact: it keeps those calls (prefill with prompt logprobs,
# batches of 9+). Inside a batch-1 decode step the int8 call takes ~1.0 ms, not 0.6 as in a tight loop:
# its 28 MB are evicted between steps and re-read at about the host's copy bandwidth.
INT8_HEAD_MAX_ROWS = 8
# Int8 logits of SmolLM2-AWQ (max ~40) are off by up to ~0.8 (mean 0.06): mostly the weight rounding (bf16
# activations alone: 0.2, the bf16 output: 0.12). That alone moved the argmax at 2-4% of positions (near-
# ties). So each row's 32 best int8 logits are recomputed in fp32 from the plain weight, where there is
# one (a tied head: the embedding table, kept for the lookup anyway); over 6144 positions (Pride and
# Prejudice, Shakespeare, random) the argmax then equalled the fp32 head's at every one and the top 5 did
# too. An untied head's plain weight is gone after packing: there the int8 argmax can flip near-ties.
INT8_HEAD_CANDIDATES = 32

# checkpoint module name -> (our fused module name, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "o_proj": ("o_proj", 0),
    "down_proj": ("down_proj", 0),
}


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, linear: LinearFactory, ops: ModelOps, prefix: str
    ) -> None:
        super().__init__()
        h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = h * d, kvh * d
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = linear(
            config.hidden_size, [h * d, kvh * d, kvh * d], config.attention_bias, f"{prefix}.qkv_proj"
        )
        self.o_proj = linear(h * d, [config.hidden_size], False, f"{prefix}.o_proj")
        self.attn = PagedAttention(h, kvh, d, ops.attention)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(hidden), kv_cache, meta, rotary))

    def attend(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        """From the QKV projection's output to the attention output ``[T, q_size]`` (before o_proj)."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, kv_cache[0], kv_cache[1], meta, (positions, rotary.cos, rotary.sin))
        return out.view(num_tokens, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory, ops: LayerOps, prefix: str) -> None:
        super().__init__()
        self.ops = ops
        if config.hidden_act != "silu":
            raise NotImplementedError(f"activation {config.hidden_act!r} (only silu is supported)")
        inter = config.intermediate_size
        self.intermediate_size = inter
        self.gate_up_proj = linear(
            config.hidden_size, [inter, inter], config.mlp_bias, f"{prefix}.gate_up_proj"
        )
        self.down_proj = linear(inter, [config.hidden_size], config.mlp_bias, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.ops.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, linear: LinearFactory, ops: ModelOps, prefix: str
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, linear, ops, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, linear, ops.layers, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.layers)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.layers)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the MLP output and the residual stream before it: the next layer's norm adds them
        (one fused add + norm instead of a separate add; the first layer has no residual yet)."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attn = self.self_attn(positions, normed, kv_cache, meta, rotary)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed), residual

    def forward_decode(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
        ops: DecodeOps,
    ) -> torch.Tensor:
        """The same layer for a small decode batch with fewer launches: the gating in gate_up, the
        residual adds in o_proj and down_proj (``DecodeOps``; the norms stay kernels of their own).
        ``hidden`` is the residual stream itself (``ops.linear_residual`` may update it in place);
        returns it after the layer."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv = ops.norm_linear(hidden, norm1.weight, norm1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
        out = attn.attend(positions, qkv, kv_cache, meta, rotary)
        hidden = ops.linear_residual(out, attn.o_proj.weight, attn.o_proj.bias, hidden)
        act = ops.norm_gated_linear(hidden, norm2.weight, norm2.eps, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias)
        return ops.linear_residual(act, mlp.down_proj.weight, mlp.down_proj.bias, hidden)

    def dense(self) -> bool:
        """Whether every projection is a plain ``Linear`` with its weight in place (not int4, not packed
        for the CPU): what ``forward_decode`` reads."""
        projections = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return all(isinstance(p, Linear) and p.packed is None for p in projections)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory, ops: ModelOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, linear, ops, f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.layers)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory, ops: ModelOps) -> None:
        """``ops``: the kernels for the device the model will run on (``backend.get_model_ops``)."""
        super().__init__()
        self.config = config
        self.linear_op = ops.linear  # the LM head's matmul (the linear factory gives the Linears theirs)
        self.decode_ops = ops.decode
        self.model = LlamaModel(config, linear, ops)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = self._make_rotary()

    def _make_rotary(self) -> RotaryEmbedding:
        c = self.config
        with torch.device("cpu"):
            return RotaryEmbedding(
                c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling
            )

    def reset_buffers(self, device: torch.device) -> None:
        """Rebuild the rotary tables after the model was materialised from the meta device."""
        self.rotary = self._make_rotary().to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` (normed) for the step's tokens."""
        rows = input_ids.shape[0]
        if 0 < rows <= self.decode_ops.max_rows(input_ids.device) and self._dense_layers():
            hidden = self.model.embed_tokens(input_ids)
            for layer, kv_cache in zip(self.model.layers, kv_caches, strict=False):
                hidden = layer.forward_decode(positions, hidden, kv_cache, meta, self.rotary, self.decode_ops)
            return self.model.norm(hidden)
        if meta.decode_groups is not None and 0 < rows == meta.num_decode_tokens:
            # Only decodes, laid out by the CPU runner: the flat loop of cpu_decode.py, same result.
            if self._cpu_decoder is None:
                self._cpu_decoder = CpuDecoder(self)
            return self._cpu_decoder(input_ids, positions, kv_caches, meta)
        return self.forward_layers(input_ids, positions, kv_caches, meta)

    _cpu_decoder: CpuDecoder | None = None  # built at the first CPU decode step, after loading and packing

    def forward_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``forward`` through the decoder layer modules, whatever the step."""
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=False):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, self.rotary)
        if residual is None:
            return self.model.norm(hidden)
        return self.model.norm(hidden, residual)[0]

    def _dense_layers(self) -> bool:
        """Every layer's projections are plain Linears (``LlamaDecoderLayer.dense``); checked per call: a
        CPU model packs its weights after construction."""
        return all(layer.dense() for layer in self.model.layers)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.int8_lm_head is not None and hidden.numel() <= INT8_HEAD_MAX_ROWS * hidden.shape[-1]:
            return self._int8_logits(hidden)
        if self.packed_lm_head is not None:
            return packed_linear(hidden, self.packed_lm_head, None)
        return self.linear_op(hidden, self.lm_head_weight()).float()

    packed_lm_head: torch.Tensor | None = None
    int8_lm_head: tuple[torch.Tensor, torch.Tensor] | None = None  # (int8 [vocab, hidden], bf16 [vocab])
    weight_bytes: int = 0  # of the checkpoint's tensors as loaded (set by the loader)

    def pack_for_cpu(self, matmul_dtype: torch.dtype = torch.float32) -> bool:
        """Move fp32 matmul weights into oneDNN's blocked layout (CPU only); False if unavailable.

        ``matmul_dtype``: the decoder's linears are packed in it (bf16: half the bytes, and twice the
        arithmetic where the CPU has bf16 instructions; ``EngineConfig.cpu_matmul_dtype`` says why it is
        safe). The LM head stays fp32: its logits are what sampling and logprobs see. A tied model's head
        gets its own packed copy: the embedding lookup needs the plain one.
        """
        if not cpu_packing_available() or self.lm_head_weight().dtype != torch.float32:
            return False
        self._cpu_decoder = None  # it holds the projections as they were
        for module in self.modules():
            if hasattr(module, "pack_for_cpu") and module is not self:
                module.pack_for_cpu(dtype=matmul_dtype)
        self.packed_lm_head = pack_cpu_weight(self.lm_head_weight().detach())
        if not self.config.tie_word_embeddings:
            self.lm_head.weight.data = torch.empty(0)
        return True

    def quantize_lm_head_int8(self) -> bool:
        """Add a per-channel int8 copy of the LM head for calls of up to ``INT8_HEAD_MAX_ROWS`` rows.

        False (nothing added) off CPU, for a non-fp32 head, or a width torch's kernel cannot take. Call it
        before ``pack_for_cpu``, which drops an untied head's plain weight. The copy costs vocab x hidden
        bytes (27 MiB for SmolLM2) beside the packed fp32 head, which larger calls still use.
        """
        weight = self.lm_head_weight()
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
            return False  # (an untied head already packed has an empty plain weight)
        if not int8_mm_supported(weight.shape[1]):
            return False
        self.int8_lm_head = quantize_int8_per_channel(weight.detach())
        return True

    def _int8_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Int8-head logits, each row's ``INT8_HEAD_CANDIDATES`` best re-scored in fp32 when the plain head
        weight is at hand."""
        assert self.int8_lm_head is not None
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        logits = int8_linear(h, *self.int8_lm_head)
        weight = self.lm_head_weight()
        if weight.numel() and logits.shape[-1] > INT8_HEAD_CANDIDATES:
            cand = logits.topk(INT8_HEAD_CANDIDATES, dim=-1).indices  # [rows, K]
            exact = torch.bmm(weight[cand], h.float().unsqueeze(-1)).squeeze(-1)  # [rows, K]
            logits.scatter_(-1, cand, exact)
        return logits.reshape(*shape[:-1], logits.shape[-1])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into this model; fail on anything missing."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        # Every expected (module, param, shard) must arrive exactly once.
        expected: set[tuple[str, str, int]] = set()
        for name, module in modules.items():
            if hasattr(module, "load_shard"):
                # Quantized layers keep int tensors as buffers and name them in checkpoint_tensors.
                names = getattr(module, "checkpoint_tensors", None) or [
                    p for p, _ in module.named_parameters(recurse=False)
                ]
                for param_name in names:
                    for shard in range(len(module.shard_sizes)):
                        expected.add((name, param_name, shard))
            elif not any(True for _ in module.children()):
                for param_name, _ in module.named_parameters(recurse=False):
                    expected.add((name, param_name, 0))
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_path, _, param_name = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in _STACKED:
                fused, shard = _STACKED[leaf]
                target = f"{parent}.{fused}"
                if target not in modules:
                    raise KeyError(f"checkpoint tensor {name} has no place in the model")
                modules[target].load_shard(param_name, shard, tensor)
                key = (target, param_name, shard)
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name} has no place in the model")
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}")
                with torch.no_grad():
                    param.copy_(tensor)
                key = (module_path, param_name, 0)
            expected.discard(key)
        if expected:
            missing = sorted(f"{m}.{p}[{s}]" for m, p, s in expected)
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
