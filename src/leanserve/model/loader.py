"""Build a model from a Hugging Face checkpoint folder (safetensors, sharded or not)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from leanserve.kernels.backend import get_model_ops
from leanserve.model.config import ModelConfig
from leanserve.model.layers import LinearFactory, default_linear_factory
from leanserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    return files


def iterate_weights(model_dir: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(model_dir)
    names = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.extend((path, key) for key in f.keys())
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor", disable=not progress)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
                bar.update()
    bar.close()


def linear_factory_for(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, linear_op: Callable[..., torch.Tensor]
) -> LinearFactory:
    """The checkpoint's linear layers; plain ones multiply with ``linear_op`` (``ModelOps.linear``)."""
    quant = config.quantization
    if quant is None:
        return default_linear_factory(dtype, linear_op)
    if quant.get("quant_method") == "awq":
        from leanserve.quant.awq_linear import awq_linear_factory

        return awq_linear_factory(quant, dtype, device, linear_op)
    raise NotImplementedError(f"quantization method {quant.get('quant_method')!r} is not supported")


def load_model(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    pack_weights: bool = True,
    cpu_matmul_dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Load a checkpoint for inference. ``pack_weights=False`` keeps plain ``weight`` tensors on CPU,
    for code that reads or rewrites them (quantization); serving wants the packed, faster layout, with
    the decoder's float linears in ``cpu_matmul_dtype`` (``LlamaForCausalLM.pack_for_cpu``)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    ops = get_model_ops(device)
    linear = linear_factory_for(config, dtype, device, ops.linear)
    # Build on the meta device so no time goes into random init of weights we overwrite anyway.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, linear, ops)
    model = model.to_empty(device=device)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    model.reset_buffers(device)
    model.load_weights(iterate_weights(model_dir, progress))
    if hasattr(linear, "finalize"):
        linear.finalize(model)
    model.eval().requires_grad_(False)
    model.weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # The int8 LM head (llama.py, INT8_HEAD_MAX_ROWS) is for models that are already approximate: quantized
    # checkpoints, and fp32 ones served with bf16 decoder weights. Outside the 32 logits per row it re-scores,
    # it moves logits by up to ~0.8, which shows in sampling at temperature > 0 and in logprobs: mean KL
    # 0.0012 on SmolLM2, against AWQ's own 0.105. Exact fp32 (cpu_matmul_dtype float32) is the reference we
    # hold to transformers' outputs, so there the head stays exact.
    approximate = config.quantization is not None or cpu_matmul_dtype != torch.float32
    int8_head = pack_weights and device.type == "cpu" and approximate and model.quantize_lm_head_int8()
    packed = pack_weights and device.type == "cpu" and model.pack_for_cpu(cpu_matmul_dtype)
    logger.info(
        "loaded %s: %.1f MB of weights on %s (%s%s%s)", model_dir.name, model.weight_bytes / 1e6, device,
        dtype, f", oneDNN-packed matmul weights ({str(cpu_matmul_dtype).removeprefix('torch.')})" if packed else "",
        ", int8 LM head for decode-sized calls" if int8_head else "",
    )
    return model
