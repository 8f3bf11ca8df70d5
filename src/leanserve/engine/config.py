"""Engine settings: what to load, on what, and how much memory and batching to allow."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str | None = None  # a checkpoint folder, a .gguf file, or None for the embedded model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU; on CUDA bf16, fp16 for AWQ) | float32 | bfloat16 | float16
    block_size: int = 16
    # KV cache budget: an int is bytes; a float in (0, 1] is a fraction of the free device memory.
    kv_cache_memory: float | int = 0.9
    max_num_seqs: int = 64
    # Tokens in one step, prefill chunks included. None: 256 on CPU, where a step is compute-bound
    # and a smaller budget interleaves prompts with decodes (TTFT p50 at 16 concurrent streams fell
    # from 2.3 s at 2048 to 0.6 s at 256, with higher throughput); 2048 on CUDA.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; default: all cores
    cache_dir: str | None = None  # where converted checkpoints (GGUF -> safetensors) are kept
    seed: int = 0
    # CPU, fp32 models: the dtype the decoder's float linears are kept in for oneDNN (the LM head, norms,
    # attention and the residual stream stay fp32). "auto": bfloat16 where the CPU multiplies bf16 in
    # hardware, else float32. On the 2-core host bf16 weights cut the forward of a batch-1 decode step by
    # 24%, of a batch-16 one by 25% and of a 256-token mixed step by 33%, at a held-out perplexity of
    # 26.044 against fp32's 26.058 (top-1 agreement 99.2%, mean KL 0.0002; benchmarks/cpu_bf16.py).
    # bf16 also gives the model the int8 LM head for small calls (model/loader.py). "float32" is exact fp32:
    # the mode held to transformers' outputs token for token.
    cpu_matmul_dtype: str = "auto"
    # CUDA only: decode-only steps of up to this many sequences replay captured CUDA graphs (see
    # model/cuda_graphs.py); enforce_eager turns them off.
    enforce_eager: bool = False
    max_cuda_graph_batch: int = 256
    # Batching: "continuous" or "static" (admit only when the previous batch is done), and the
    # adaptive batching window (see engine/batch_window.py).
    batching: str = "continuous"
    max_batch_wait_ms: float = 20.0
    adaptive_batch_wait: bool = True

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_max_num_batched_tokens(self, device: torch.device) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 2048 if device.type == "cuda" else 256

    def resolve_dtype(self, device: torch.device, awq: bool = False) -> torch.dtype:
        """``awq``: the checkpoint's linears are AWQ int4 (their scales are fp16)."""
        if self.dtype == "auto":
            # A whole bf16 model on the CPU (plain bf16 weights, bf16 norms and attention) took 41.5 ms for
            # a batch-16 decode step's forward on the 2-core host, against fp32's 24.9: only the packed
            # matmuls gain from bf16 (cpu_matmul_dtype: 18.7 ms).
            if device.type != "cuda":
                return torch.float32
            # AWQ checkpoints are made and served in fp16 (AutoAWQ writes torch_dtype float16, as vLLM
            # runs them), and the int4 GEMV's fp16-pair math takes fp16 activations only.
            return torch.float16 if awq else torch.bfloat16
        return getattr(torch, self.dtype)

    def resolve_cpu_matmul_dtype(self, device: torch.device, dtype: torch.dtype) -> torch.dtype:
        """What ``cpu_matmul_dtype`` means for a model of ``dtype`` on ``device`` (only fp32 models on the
        CPU are repacked; anything else keeps its own dtype)."""
        from leanserve.model import layers

        if device.type != "cpu" or dtype != torch.float32:
            return dtype
        if self.cpu_matmul_dtype == "auto":
            native = layers.cpu_has_native_bf16() and layers.cpu_bf16_matmul_supported()
            return torch.bfloat16 if native else torch.float32
        if self.cpu_matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"cpu_matmul_dtype must be auto, float32 or bfloat16, not {self.cpu_matmul_dtype!r}")
        if self.cpu_matmul_dtype == "bfloat16" and not layers.cpu_bf16_matmul_supported():
            raise ValueError("cpu_matmul_dtype=bfloat16: this torch build's oneDNN cannot run bf16 matmuls here")
        return getattr(torch, self.cpu_matmul_dtype)
